"""Qwen2.5-Omni's talker: a dense decoder that speaks what the thinker writes, one codec token per step.

    inputs at the thinker's width (batch, seq, embedding_size)
      -> thinker_to_talker_proj -> (batch, seq, hidden)
      -> model: [attention (biased q/k/v) + SwiGLU] * num_layers -> RMSNorm -> codec_head -> logits (.., codec vocab)

What it is fed (the "dual track": thinker text and its own codes, summed per position):
  prompt, P thinker prompt positions + 2:
      i < P:   thinker final hidden state[i] + thinker token embedding[i] (zero at audio/image/video placeholders)
      P:       thinker embedding of the voice's bos token                      + codec embedding of codec_pad
      P + 1:   reply part 0                                                     + codec embedding of codec_bos
  step k >= 1: codec embedding of the code chosen at step k - 1 + reply part k
  reply part j = thinker hidden state + thinker embedding of the j-th reply token, for every reply token that was
  fed back to the thinker (all but the last generated one); then the embedding of tts_text_end once, then that of
  tts_text_pad for as long as the talker speaks.
Positions are TM-RoPE ids computed from the thinker's prompt ids + [voice bos, first reply token] with the talker's
own layout (processing/qwen2_5_positions.py); a step at cache slot s sits at s + rope_delta on all three axes.
The codec embedding is at the thinker's width too (embed_tokens: (codec vocab, embedding_size)).

Module names match the checkpoint keys under `talker.`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...config import DecoderConfig
from ...config_qwen2_5 import Qwen25TalkerConfig
from ...layers.decoder import DecoderStack

if TYPE_CHECKING:
    from ...layers.kv_cache import LayerCaches


class TalkerTextModel(DecoderStack):
    """The talker's decoder stack plus its codec embedding, which is at the thinker's width."""

    def __init__(self, cfg: DecoderConfig, embedding_size: int):
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, embedding_size)


@dataclass
class TalkerPrompt:
    inputs: torch.Tensor  # (P + 2, embedding_size): prefill inputs before thinker_to_talker_proj
    positions: torch.Tensor  # (3, P + 2) TM-RoPE ids
    rope_delta: int  # a step at cache slot s sits at position s + rope_delta


@dataclass
class ReplyFeed:
    """The text track after the prompt: reply parts as the thinker makes them, then tts_text_end once, then
    tts_text_pad forever. `next_part()` is None while the thinker has not yet made the part the talker needs (text
    leads speech: the caller waits, or runs the thinker first)."""

    eos: torch.Tensor  # (embedding_size,) thinker embedding of tts_text_end
    pad: torch.Tensor  # (embedding_size,) thinker embedding of tts_text_pad
    parts: deque = field(default_factory=deque)
    finished: bool = False  # the thinker's reply is complete: no more parts will come
    eos_sent: bool = False

    def push(self, part: torch.Tensor) -> None:
        """One more reply part, (embedding_size,): thinker hidden state + embedding of a token fed back to it."""
        if self.finished:
            raise ValueError("the reply is finished: no more text parts can be pushed")
        self.parts.append(part)

    def finish(self) -> None:
        self.finished = True

    def next_part(self) -> torch.Tensor | None:
        if self.parts:
            return self.parts.popleft()
        if not self.finished:
            return None
        if not self.eos_sent:
            self.eos_sent = True
            return self.eos
        return self.pad


@dataclass
class TalkerState:
    """One utterance's decode state: the KV cache the caller made for it and where it stands."""

    cache: "LayerCaches"
    length: int  # cache slots filled
    rope_delta: int


def talker_prompt_inputs(thinker_embeds: torch.Tensor, thinker_hidden: torch.Tensor, media: torch.Tensor,
                         voice_bos: torch.Tensor, first_part: torch.Tensor, codec_pad: torch.Tensor,
                         codec_bos: torch.Tensor) -> torch.Tensor:
    """The prompt's inputs (P + 2, embedding_size), as the module doc lays them out.

    thinker_embeds, thinker_hidden: (P, E) the thinker's token embeddings and final hidden states over its prompt;
    media: (P,) bool, the placeholder positions (their embedding does not count); voice_bos, first_part, codec_pad,
    codec_bos: (E,)."""
    text = thinker_hidden + thinker_embeds.masked_fill(media.unsqueeze(-1), 0.0)
    tail = torch.stack((voice_bos + codec_pad, first_part + codec_bos))
    return torch.cat((text, tail.to(text.dtype)))


class Qwen25Talker(nn.Module):
    def __init__(self, cfg: Qwen25TalkerConfig):
        super().__init__()
        self.cfg = cfg
        self.thinker_to_talker_proj = nn.Linear(cfg.embedding_size, cfg.text.hidden_size, bias=True)
        self.model = TalkerTextModel(cfg.text, cfg.embedding_size)
        self.codec_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def embed_codec(self, ids: torch.Tensor) -> torch.Tensor:
        """Codec ids -> (.., embedding_size) inputs (at the thinker's width, summed with the text track)."""
        return self.model.embed_tokens(ids)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, *, mask: torch.Tensor | None = None,
                cache: "LayerCaches | None" = None, slots: torch.Tensor | None = None,
                key_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (batch, seq, embedding_size); positions (3, batch, seq). -> (hidden (batch, seq, hidden),
        codec logits (batch, seq, vocab) in float32, as the reference returns them)."""
        hidden, _ = self.model.run_layers(self.thinker_to_talker_proj(inputs), positions, mask=mask, cache=cache,
                                          slots=slots, key_len=key_len)
        return hidden, self.codec_head(hidden).float()

    def start(self, prompt: TalkerPrompt, cache: "LayerCaches") -> tuple[TalkerState, torch.Tensor]:
        """Prefill one utterance's prompt into `cache` (batch 1, empty). -> (state, logits (vocab,) of code 0)."""
        length = prompt.inputs.shape[0]
        if length > cache.max_len:
            raise ValueError(f"a talker prompt of {length} positions does not fit a cache of {cache.max_len}")
        device = prompt.inputs.device
        slots = torch.arange(length, device=device).unsqueeze(0)
        _, logits = self(prompt.inputs.unsqueeze(0), prompt.positions.unsqueeze(1).to(device), cache=cache,
                         slots=slots, key_len=length)
        return TalkerState(cache=cache, length=length, rope_delta=prompt.rope_delta), logits[0, -1]

    def step(self, state: TalkerState, code: torch.Tensor, text_part: torch.Tensor) -> torch.Tensor:
        """One decode step: the code chosen last (0-d long) and this step's text part (embedding_size,).
        -> logits (vocab,) of the next code; the state advances by one slot."""
        if state.length >= state.cache.max_len:
            raise ValueError(f"the talker's cache of {state.cache.max_len} slots is full")
        device = text_part.device
        inputs = (self.embed_codec(code.view(1, 1)) + text_part.view(1, 1, -1)).to(text_part.dtype)
        slots = torch.full((1, 1), state.length, device=device)
        positions = torch.full((3, 1, 1), state.length + state.rope_delta, device=device)
        _, logits = self(inputs, positions, cache=state.cache, slots=slots, key_len=state.length + 1)
        state.length += 1
        return logits[0, -1]
