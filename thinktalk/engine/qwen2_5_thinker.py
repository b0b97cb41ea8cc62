"""One Qwen2.5-Omni stream's thinker: its media through the encoders one item per call, its prompt's prefill, then
one decode step per call, each returning what the talker is fed for the token it consumed.

    run = Qwen25ThinkerRun(thinker, prompt, max_new_tokens)
    while run.pending: run.encode_one()         audio clip / image / video -> its embeddings at its pad rows
    logits = run.prefill()                      (vocab,) at the prompt's last token
    logits, part = run.step(token)              feeds `token` back: next logits, and the reply part
                                                (final hidden state + embedding of `token`, (hidden,))

Each stream has a KV cache of its own (prompt + budget slots): Qwen2.5-Omni streams are not batched with each other
yet (engine/qwen2_5_scheduler.py). The talker's prompt reads `prompt_hidden` (the final hidden states over the
prompt) and `token_embeds` (the prompt's embeddings with media rows zeroed, as the reference hands them over).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import Cancelled
from ..layers.kv_cache import LayerCaches
from ..models.qwen2_5.thinker import Qwen25Thinker
from ..processing.multimodal import PreparedPrompt
from ..processing.prompt import PromptError
from ..processing.qwen2_5_positions import qwen2_5_rope_positions
from .encoding import PlaceholderIds, media_rows


class Qwen25ThinkerRun:
    def __init__(self, thinker: Qwen25Thinker, prompt: PreparedPrompt, max_new_tokens: int,
                 should_stop: Callable[[], bool] | None = None):
        self.thinker, self.prompt, self.should_stop = thinker, prompt, should_stop
        weight = thinker.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.ids = torch.tensor(prompt.token_ids, dtype=torch.long, device=self.device)
        layout = thinker.cfg.layout
        self.todo = media_rows(prompt, PlaceholderIds(layout.audio_token_id, layout.image_token_id,
                                                      layout.video_token_id, layout.spatial_merge_size))
        media = torch.zeros(self.ids.numel(), dtype=torch.bool, device=self.device)
        for item in self.todo:
            media[item.rows.to(self.device)] = True
        self.media_rows = media  # (P,) bool: what the talker's prompt takes no embedding from
        with torch.inference_mode():
            self.embeds = thinker.embed(self.ids).clone()  # (P, hidden); media rows get the encoders' outputs
        self.token_embeds = self.embeds.masked_fill(media.unsqueeze(-1), 0.0)
        length = self.ids.numel()
        self.cache = LayerCaches(thinker.cfg.text, 1, length + max_new_tokens, self.dtype, self.device)
        self.slot = 0  # cache slots filled
        self.rope_delta = 0
        self.prompt_hidden: torch.Tensor | None = None  # (P, hidden) once prefilled

    @property
    def pending(self) -> bool:
        return bool(self.todo)

    @torch.inference_mode()
    def encode_one(self) -> None:
        """The next media item through its encoder (Cancelled first if the stream was cancelled meanwhile)."""
        if self.should_stop is not None and self.should_stop():
            raise Cancelled()
        item = self.todo.pop(0)
        if item.kind == "audio":
            features = self.prompt.audios[item.index].features.to(self.device, self.dtype)
            out = self.thinker.audio_tower([features])[0]
        else:
            source = (self.prompt.images if item.kind == "image" else self.prompt.videos)[item.index]
            out = self.thinker.visual(source.patches.to(self.device, self.dtype),
                                      torch.tensor([source.grid_thw], dtype=torch.long))
        if out.shape[0] != item.rows.numel():
            raise PromptError(f"{item.kind} {item.index}: {item.rows.numel()} placeholder tokens but the encoder "
                              f"produced {out.shape[0]}")
        self.embeds[item.rows.to(self.device)] = out.to(self.dtype)

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """The whole prompt into the cache (one pass) -> logits (vocab,) at its last token."""
        assert not self.todo and self.slot == 0, "media still to encode, or prefilled already"
        positions, self.rope_delta = qwen2_5_rope_positions(self.prompt.token_ids, self.prompt.layout,
                                                            self.thinker.cfg.layout, self.prompt.use_audio_in_video)
        length = self.ids.numel()
        out = self.thinker(self.embeds.unsqueeze(0), positions.to(self.device).unsqueeze(1), cache=self.cache,
                           slots=torch.arange(length, device=self.device).unsqueeze(0), key_len=length,
                           logits_at=torch.tensor([length - 1], device=self.device))
        self.prompt_hidden = out.hidden[0]
        self.slot = length
        self.embeds = None  # in the cache now
        return out.logits[0]

    @torch.inference_mode()
    def step(self, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed `token` -> (logits (vocab,) of the next token, the reply part of `token` (hidden,))."""
        assert self.slot < self.cache.max_len, "the thinker's cache is full"
        embed = self.thinker.embed(torch.tensor([[token]], device=self.device))
        positions = torch.full((3, 1, 1), self.slot + self.rope_delta, device=self.device)
        out = self.thinker(embed, positions, cache=self.cache, slots=torch.tensor([[self.slot]], device=self.device),
                           key_len=self.slot + 1)
        self.slot += 1
        return out.logits[0, -1], out.hidden[0, 0] + embed[0, 0]
