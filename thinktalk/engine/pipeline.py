"""The streaming reply: thinker -> talker -> Code2Wav, interleaved so that speech starts after one text token.

    thinker prefill, token 0 ........................... TextDelta
    talker prefill (needs token 0) -> frame 0 -> Code2Wav ... AudioChunk (the first audio)
    loop: talker step k needs reply token k+1: the thinker decodes until it has it (TextDelta each), then
          the talker advances and completes frame k+1 -> Code2Wav (an AudioChunk every `chunk_frames` frames)
    after codec EOS the thinker finishes its text; Done carries the whole result.
Text always leads speech. Stopping the iteration early (closing the generator) drops every cache with it and gives
the leased rows of the shared decode batch (thinker) and the shared talker batch back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..config import OmniConfig, SamplingConfig
from ..models.omni import OmniModel
from ..models.code2wav import Code2WavStream
from ..processing.multimodal import PreparedPrompt
from .decode_batch import SharedDecodeBatch
from .graphs import StepMode
from .multimodal_inputs import multimodal_prefill_inputs
from .sampler import Sampler
from .talker_batch import SharedTalkerBatch, TalkerLease
from .talker_prompt import TalkerPrefill, build_talker_prefill
from .talker_session import TalkerSession
from .thinker_runner import PrefillInputs, ThinkerRunner


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class AudioChunk:
    audio: np.ndarray  # float32 mono samples
    offset: int  # index of the chunk's first sample in the whole reply's waveform
    sample_rate: int


@dataclass(frozen=True)
class SpeechOptions:
    speaker_id: int
    sampling: SamplingConfig
    chunk_frames: int = 1  # frames per Code2Wav call (and per AudioChunk)
    seed: int | None = None
    step_mode: StepMode | None = None  # how the talker steps run (engine/graphs.py); None = device default


@dataclass
class ReplyTrace:
    """What the pipeline produced, for the caller's final result."""

    token_ids: list[int] = field(default_factory=list)
    codes: list[torch.Tensor] = field(default_factory=list)  # per frame (groups,)
    audio: list[np.ndarray] = field(default_factory=list)


class TokenSource(Protocol):
    """Where a reply's thinker tokens come from: a row of the shared decode batch, or a private runner."""

    kept: torch.Tensor | None  # (1, seq, hidden) hidden states the prefill kept for the talker, or None

    def next_token(self) -> int:
        """The reply's next token; the first comes from the prefill."""

    def close(self) -> None:
        """Frees what the source holds; safe to call more than once."""


class PrivateDecode:
    """A reply's own batch-1 runner: no shared batch, or the request does not fit it."""

    def __init__(self, thinker, inputs: PrefillInputs, sampler: Sampler, budget: int):
        self.runner = ThinkerRunner(thinker, 1, inputs.embeds.shape[1] + budget)
        self.sampler = sampler
        logits, self.kept = self.runner.prefill(inputs)
        self.last = sampler(logits)
        self.fresh = True  # the prefill's token is not taken yet

    def next_token(self) -> int:
        if self.fresh:
            self.fresh = False
        else:
            self.last = self.sampler(self.runner.decode_step(self.last))
        return int(self.last)

    def close(self) -> None:
        """Nothing shared to give back: the cache goes with this object."""


class ThinkerStream:
    """The thinker's side of one reply: prefill, then one token per `next()`, stopping at a stop id or budget.

    With a SharedDecodeBatch the reply leases one of its rows (released when the thinker is done or `close()` is
    called); without one, or when no row is free or the reply would not fit a row, it runs a private runner. The
    tokens are the same either way."""

    def __init__(self, model: OmniModel, prompt: PreparedPrompt, sampling: SamplingConfig, seed: int | None,
                 stops: set[int], keep_hidden: int | None, batch: SharedDecodeBatch | None = None):
        thinker = model.thinker
        with torch.inference_mode():
            self.inputs = multimodal_prefill_inputs(thinker, [prompt])
        self.inputs.keep_hidden = keep_hidden
        sampler = Sampler(sampling, 1, thinker.cfg.text.vocab_size, thinker.model.embed_tokens.weight.device,
                          seed=seed)
        sampler.observe(self.inputs.token_ids)
        self.budget, self.stops = sampling.max_new_tokens, stops
        lease = batch.lease(self.inputs, sampler, self.budget, stops) if batch is not None else None
        self.source: TokenSource = lease if lease is not None else PrivateDecode(thinker, self.inputs, sampler,
                                                                                 self.budget)
        self.leased = lease is not None
        self.accepted_hidden = self.source.kept
        self.tokens: list[int] = []
        self.done = False
        self._take()

    def _take(self) -> None:
        token = self.source.next_token()
        self.tokens.append(token)
        self.done = token in self.stops or len(self.tokens) >= self.budget
        if self.done:
            self.source.close()  # a leased row is free for the next request while this reply still speaks

    def next(self) -> int:
        assert not self.done
        self._take()
        return self.tokens[-1]

    def close(self) -> None:
        self.source.close()

    def is_final(self, index: int) -> bool:
        """Reply token `index` is the last one the thinker writes."""
        return self.done and index == len(self.tokens) - 1


def stream_reply(model: OmniModel, cfg: OmniConfig, prompt: PreparedPrompt, sampling: SamplingConfig,
                 seed: int | None, stops: set[int], speech: SpeechOptions | None,
                 detokenize, trace: ReplyTrace, batch: SharedDecodeBatch | None = None,
                 talker_batch: SharedTalkerBatch | None = None) -> Iterator[TextDelta | AudioChunk]:
    """Yields TextDelta and AudioChunk events; fills `trace`. `detokenize(token_id, final) -> str`.
    `batch` / `talker_batch`: decode the text / speech in a row of this shared batch when one is free (closing the
    iterator frees the rows)."""
    keep = cfg.talker.accept_hidden_layer if speech is not None else None
    thinker = ThinkerStream(model, prompt, sampling, seed, stops, keep, batch)
    try:
        yield from _text(thinker, 0, detokenize, trace)
        if speech is not None and not (thinker.done and thinker.tokens[0] in stops):
            yield from _speak(model, cfg, prompt, thinker, speech, detokenize, trace, talker_batch)
        while not thinker.done:
            thinker.next()
            yield from _text(thinker, len(thinker.tokens) - 1, detokenize, trace)
    finally:
        thinker.close()


def _text(thinker: ThinkerStream, index: int, detokenize, trace: ReplyTrace) -> Iterator[TextDelta]:
    token = thinker.tokens[index]
    trace.token_ids.append(token)
    piece = detokenize(token, thinker.is_final(index))
    if piece:
        yield TextDelta(piece, [token])


def _speak(model: OmniModel, cfg: OmniConfig, prompt: PreparedPrompt, thinker: ThinkerStream,
           speech: SpeechOptions, detokenize, trace: ReplyTrace,
           talker_batch: SharedTalkerBatch | None) -> Iterator[TextDelta | AudioChunk]:
    talker, embed = model.talker, model.thinker.embed
    inputs = thinker.inputs
    with torch.inference_mode():
        first = embed(torch.tensor([thinker.tokens[0]], device=inputs.embeds.device))[0]
        prefill = build_talker_prefill(talker, cfg, inputs.token_ids[0], inputs.embeds[0], thinker.accepted_hidden[0],
                                       prompt.layout, prompt.use_audio_in_video, first, speech.speaker_id, embed)
    lease = talker_batch.lease(prefill, speech.sampling, speech.seed) if talker_batch is not None else None
    session = lease or TalkerSession(talker, cfg, prefill, speech.sampling, speech.seed, speech.step_mode)
    try:
        yield from _frames(model, cfg, session, thinker, speech, prefill, detokenize, trace)
    finally:
        session.close()  # a leased row is free for the next spoken reply


def _frames(model: OmniModel, cfg: OmniConfig, session: TalkerSession | TalkerLease, thinker: ThinkerStream,
            speech: SpeechOptions, prefill: TalkerPrefill, detokenize,
            trace: ReplyTrace) -> Iterator[TextDelta | AudioChunk]:
    """Frame after frame: complete -> Code2Wav -> the text the next talker step reads -> advance.
    A frame's audio leaves before the thinker writes (the first audio after one text token); otherwise after the
    advance, which on a shared talker batch only deposits the input: the step then runs at this reply's next turn,
    together with every reply that deposited meanwhile (no event between advance and the next frame: no sharing)."""
    talker, embed = model.talker, model.thinker.embed
    tts_eos, tts_pad = prefill.text_embeds[1], prefill.text_embeds[2]
    vocoder = Code2WavStream(model.code2wav)
    pending: list[torch.Tensor] = []
    sample_rate, offset = cfg.code2wav.sample_rate, 0
    step = 0
    while not session.finished:
        codes, codec_sum = session.complete()
        trace.codes.append(codes[0])
        pending.append(codes)
        audio: list[AudioChunk] = []
        if len(pending) >= speech.chunk_frames:
            chunk = _vocode(vocoder, pending)
            trace.audio.append(chunk)
            audio.append(AudioChunk(chunk, offset, sample_rate))
            offset += chunk.size
        # The step after frame `step` reads reply token step + 1: write text until the thinker has it.
        if len(thinker.tokens) <= step + 1 and not thinker.done:
            yield from audio
            audio = []
        written: list[TextDelta] = []
        while len(thinker.tokens) <= step + 1 and not thinker.done:
            thinker.next()
            written.extend(_text(thinker, len(thinker.tokens) - 1, detokenize, trace))
        text = _text_for_step(thinker, step + 1, embed, tts_eos, tts_pad, talker)
        session.advance(codec_sum, text)
        yield from audio
        yield from written
        step += 1
    if pending:
        chunk = _vocode(vocoder, pending)
        trace.audio.append(chunk)
        yield AudioChunk(chunk, offset, sample_rate)


def _text_for_step(thinker: ThinkerStream, index: int, embed, tts_eos, tts_pad, talker) -> torch.Tensor:
    """Reply token `index` projected for the talker; tts_eos in place of the final token; tts_pad past it."""
    if index >= len(thinker.tokens):
        return tts_pad.unsqueeze(0)
    if thinker.is_final(index):
        return tts_eos.unsqueeze(0)
    with torch.inference_mode():
        token = torch.tensor([thinker.tokens[index]], device=tts_pad.device)
        return talker.text_projection(embed(token))


def _vocode(vocoder: Code2WavStream, pending: list[torch.Tensor]) -> np.ndarray:
    with torch.inference_mode():
        codes = torch.stack(pending, dim=-1)  # (1, groups, frames)
        samples = vocoder.feed(codes)
    pending.clear()
    return samples[0].float().cpu().numpy()
