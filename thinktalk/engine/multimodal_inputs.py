"""Prepared multimodal prompts -> PrefillInputs for the Thinker.

Per prompt:
    ids --embed_tokens--> (seq, hidden)
    audio features --audio_tower--> placed at the <|audio_pad|> rows, in order
    image / video patches --visual--> placed at the <|image_pad|> / <|video_pad|> rows, in order
    deepstack features (one set per deepstack level) kept with the rows they belong to, added after the
    thinker's first decoder layers by a hook (out of place, so hidden states kept for the talker are the ones
    before the addition, as in the reference)
    TM-RoPE positions and the rope delta from processing.positions
Rows are right-padded into one batch (see ThinkerRunner for why padding never leaks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.thinker import Thinker
from ..processing.multimodal import PreparedPrompt
from ..processing.positions import rope_positions
from .thinker_runner import PrefillInputs


@dataclass
class EncodedPrompt:
    token_ids: torch.Tensor  # (seq,)
    embeds: torch.Tensor  # (seq, hidden), media embeddings in place
    positions: torch.Tensor  # (3, seq) float
    rope_delta: float
    visual_rows: torch.Tensor  # (n_visual,) long: rows holding image or video tokens, ascending
    deepstack: list[torch.Tensor]  # per level: (n_visual, hidden), aligned with visual_rows


def _place(embeds: torch.Tensor, rows: torch.Tensor, features: torch.Tensor, what: str) -> None:
    if rows.numel() != features.shape[0]:
        raise ValueError(f"{what}: {rows.numel()} placeholder tokens but the encoder produced {features.shape[0]}")
    embeds[rows] = features.to(embeds.dtype)


def encode_prompt(thinker: Thinker, prompt: PreparedPrompt) -> EncodedPrompt:
    cfg = thinker.cfg
    param = thinker.model.embed_tokens.weight  # device and dtype (an embedding is never quantized)
    ids = torch.tensor(prompt.token_ids, dtype=torch.long, device=param.device)
    embeds = thinker.embed(ids).clone()
    if prompt.audios:
        features = thinker.audio_tower([a.features.to(param.device, param.dtype) for a in prompt.audios])
        _place(embeds, (ids == cfg.audio_token_id).nonzero().squeeze(1), torch.cat(features), "audio")
    image_rows = (ids == cfg.image_token_id).nonzero().squeeze(1)
    video_rows = (ids == cfg.video_token_id).nonzero().squeeze(1)
    levels = len(cfg.vision.deepstack_visual_indexes)
    deep_by_kind = []
    for items, rows, what in ((prompt.images, image_rows, "image"), (prompt.videos, video_rows, "video")):
        if not items:
            continue
        # The patches stay where the processor made them: the encoder moves one group of frames at a time.
        patches = items[0].patches if len(items) == 1 else torch.cat([item.patches for item in items])
        grids = torch.tensor([item.grid_thw for item in items], dtype=torch.long)
        out = thinker.visual(patches, grids)
        _place(embeds, rows, out.embeds, what)
        deep_by_kind.append((rows, out.deepstack))
    visual_rows = torch.cat([image_rows, video_rows]).sort().values
    deepstack = []
    for level in range(levels if deep_by_kind else 0):
        joint = embeds.new_zeros(visual_rows.numel(), embeds.shape[-1])
        for rows, features in deep_by_kind:  # scatter each kind into its rows' slots of the joint order
            joint[torch.searchsorted(visual_rows, rows)] = features[level].to(joint.dtype)
        deepstack.append(joint)
    positions, delta = rope_positions(prompt.token_ids, prompt.layout, cfg, prompt.use_audio_in_video)
    return EncodedPrompt(ids, embeds, positions.to(param.device), delta, visual_rows, deepstack)


class DeepstackHook:
    """After decoder layer i < levels, adds level i's visual features at the visual rows of each batch row.

    `cols` are positions in the hidden states the hook is called with: the whole prompt, or for a prefill chunk
    the window of it that `window` returns (positions shifted so that the chunk's first is 0).
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, levels: list[torch.Tensor]):
        self.rows, self.cols, self.levels = rows, cols, levels  # (n,), (n,), [(n, hidden)]

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if layer >= len(self.levels) or self.rows.numel() == 0:
            return hidden
        return hidden.index_put((self.rows, self.cols), self.levels[layer].to(hidden.dtype), accumulate=True)

    def window(self, start: int, end: int) -> DeepstackHook:
        """The hook for prompt positions [start, end): the features that fall there, at positions - start."""
        inside = ((self.cols >= start) & (self.cols < end)).nonzero().squeeze(1)
        return DeepstackHook(self.rows[inside], self.cols[inside] - start, [level[inside] for level in self.levels])


def multimodal_prefill_inputs(thinker: Thinker, prompts: list[PreparedPrompt]) -> PrefillInputs:
    encoded = [encode_prompt(thinker, prompt) for prompt in prompts]
    device, batch = thinker.model.embed_tokens.weight.device, len(encoded)
    longest = max(e.token_ids.numel() for e in encoded)
    hidden = encoded[0].embeds.shape[-1]
    token_ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
    embeds = encoded[0].embeds.new_zeros(batch, longest, hidden)
    positions = torch.zeros(3, batch, longest, device=device)
    for row, e in enumerate(encoded):
        n = e.token_ids.numel()
        token_ids[row] = e.token_ids[-1]  # padding repeats a token the row has (harmless to repetition penalty)
        token_ids[row, :n], embeds[row, :n], positions[:, row, :n] = e.token_ids, e.embeds, e.positions
    lengths = torch.tensor([e.token_ids.numel() for e in encoded], dtype=torch.long, device=device)
    deltas = torch.tensor([e.rope_delta for e in encoded], dtype=torch.float32, device=device)
    hook = None
    if any(e.deepstack for e in encoded):
        levels = max(len(e.deepstack) for e in encoded)
        rows = torch.cat([torch.full_like(e.visual_rows, r) for r, e in enumerate(encoded) if e.deepstack])
        cols = torch.cat([e.visual_rows for e in encoded if e.deepstack])
        stacked = [torch.cat([e.deepstack[level] for e in encoded if e.deepstack]) for level in range(levels)]
        hook = DeepstackHook(rows, cols, stacked)
    return PrefillInputs(token_ids, embeds, positions, lengths, deltas, after_layer=hook)
