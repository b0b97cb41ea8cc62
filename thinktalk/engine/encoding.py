"""A prompt's media through the encoders, one item per call, so the scheduler can run decode steps in between; the
items a cached conversation prefix already holds are never encoded again.

    job = PromptEncoding(thinker, prompt, cached=P)
    while job.pending: job.run_one()            audio clip / image / video -> its embeddings at its pad rows
    inputs = job.inputs(keep_hidden)            PrefillInputs (batch 1) for prompt positions [job.cached, seq)

Placeholder rows: the k-th audio item fills the next `token_count` <|audio_pad|> rows, in order (a video's sound
track included), the k-th image the next <|image_pad|> rows, the k-th video the next <|video_pad|> rows. An item
whose rows all lie before the cached prefix's end is skipped: the cached K/V already hold what it contributed
(deepstack features included). `usable_prefix` moves a prefix's end back to the start of an item it would cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..processing.prompt import PromptError
from ..models.thinker import Thinker
from ..processing.multimodal import PreparedPrompt
from ..processing.positions import rope_positions
from .multimodal_inputs import DeepstackHook
from .thinker_runner import PrefillInputs


@dataclass(frozen=True)
class MediaRows:
    kind: str  # "audio", "image", "video"
    index: int  # the item's index among its kind
    rows: torch.Tensor  # (n,) its placeholder rows, ascending


@dataclass(frozen=True)
class PlaceholderIds:
    """The prompt tokens a family's media items fill, and its vision merge (merge x merge patches a token)."""

    audio: int
    image: int
    video: int
    spatial_merge_size: int


def media_rows(prompt: PreparedPrompt, ids: PlaceholderIds) -> list[MediaRows]:
    """Every media item's placeholder rows, from the token ids and the items' token counts (the k-th item of a kind
    fills the next rows of its placeholder token)."""
    tokens = torch.tensor(prompt.token_ids, dtype=torch.long)
    merge = ids.spatial_merge_size ** 2
    found = []
    for kind, token, counts in (("audio", ids.audio, [a.token_count for a in prompt.audios]),
                                ("image", ids.image, [_grid_tokens(i.grid_thw, merge) for i in prompt.images]),
                                ("video", ids.video, [_grid_tokens(v.grid_thw, merge) for v in prompt.videos])):
        rows = (tokens == token).nonzero().squeeze(1)
        if rows.numel() != sum(counts):
            raise PromptError(f"the prompt has {rows.numel()} {kind} placeholder tokens but its {kind} inputs need "
                              f"{sum(counts)}")
        start = 0
        for index, count in enumerate(counts):
            found.append(MediaRows(kind, index, rows[start:start + count]))
            start += count
    return found


def _grid_tokens(grid: tuple[int, int, int], merge: int) -> int:
    t, h, w = grid
    return t * h * w // merge


def usable_prefix(length: int, items: list[MediaRows]) -> int:
    """The longest prefix <= length that cuts no media item (an item's rows all before or all from its end)."""
    for item in sorted(items, key=lambda m: int(m.rows[0]) if m.rows.numel() else 0):
        if item.rows.numel() and int(item.rows[0]) < length <= int(item.rows[-1]):
            length = int(item.rows[0])
    return length


class PromptEncoding:
    def __init__(self, thinker: Thinker, prompt: PreparedPrompt, cached: int = 0,
                 should_stop: Callable[[], bool] | None = None):
        self.thinker, self.prompt, self.should_stop = thinker, prompt, should_stop
        param = thinker.model.embed_tokens.weight  # device and dtype (an embedding is never quantized)
        self.device, self.dtype = param.device, param.dtype
        self.ids = torch.tensor(prompt.token_ids, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self.embeds = thinker.embed(self.ids).clone()
        cfg = thinker.cfg
        items = media_rows(prompt, PlaceholderIds(cfg.audio_token_id, cfg.image_token_id, cfg.video_token_id,
                                                  cfg.vision.spatial_merge_size))
        self.cached = usable_prefix(cached, items)
        self.todo = [m for m in items if m.rows.numel() and int(m.rows[0]) >= self.cached]
        self.deepstack: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # (rows, per-level features)
        self.encoded_items = 0

    @property
    def pending(self) -> bool:
        return bool(self.todo)

    @torch.inference_mode()
    def run_one(self) -> None:
        """The next item through its encoder; `should_stop` is asked between the encoder's groups (errors.Cancelled
        when it says so: a long clip or video stops part-way once its request is cancelled)."""
        item, should_stop = self.todo.pop(0), self.should_stop
        rows = item.rows.to(self.device)
        if item.kind == "audio":
            features = self.prompt.audios[item.index].features.to(self.device, self.dtype)
            out = self.thinker.audio_tower([features], should_stop=should_stop)[0]
        else:
            source = (self.prompt.images if item.kind == "image" else self.prompt.videos)[item.index]
            grids = torch.tensor([source.grid_thw], dtype=torch.long)
            visual = self.thinker.visual(source.patches, grids, should_stop=should_stop)
            out = visual.embeds
            self.deepstack.append((rows, visual.deepstack))
        if out.shape[0] != rows.numel():
            raise PromptError(f"{item.kind} {item.index}: {rows.numel()} placeholder tokens but the encoder produced "
                              f"{out.shape[0]}")
        self.embeds[rows] = out.to(self.dtype)
        self.encoded_items += 1

    def inputs(self, keep_hidden: int | None) -> PrefillInputs:
        """The whole prompt as batch-1 PrefillInputs (a prefill runs it from position `cached` on)."""
        assert not self.todo, "media still to encode"
        cfg = self.thinker.cfg
        positions, delta = rope_positions(self.prompt.token_ids, self.prompt.layout, cfg,
                                          self.prompt.use_audio_in_video)
        hook = None
        if self.deepstack:
            rows = torch.cat([r for r, _ in self.deepstack])
            order = rows.argsort()
            levels = [torch.cat([features[level] for _, features in self.deepstack])[order]
                      for level in range(len(self.deepstack[0][1]))]
            hook = DeepstackHook(torch.zeros_like(rows), rows[order], levels)
        seq = self.ids.numel()
        return PrefillInputs(self.ids.unsqueeze(0), self.embeds.unsqueeze(0),
                             positions.to(self.device).unsqueeze(1), torch.tensor([seq], device=self.device),
                             torch.tensor([delta], dtype=torch.float32, device=self.device), after_layer=hook,
                             keep_hidden=keep_hidden)
