"""The step loop for Qwen2.5-Omni checkpoints: the same contract as engine/scheduler.py (`submit(spec)` from any
thread, `iterate()` on one, events to each stream's sink, `cancel()` from anywhere), so Omni.generate / stream /
submit, the server's worker and the Realtime socket drive it unchanged.

Each `iterate()` does ONE unit of work for every admitted stream (at most `concurrent` of them, oldest first;
the others wait in order):
    1. take new submissions, drop cancelled streams, admit waiting ones while there is room
    2. encoding    one media item through its encoder
       prefill     the whole prompt (Started, then the first TextDelta)
       running     one thinker decode step (a TextDelta; its reply part goes to the talker), and for a spoken
                   reply the talker's prefill once part 0 exists, else ONE talker step + Token2Wav for every
                   codec token whose text part exists (an AudioChunk whenever Token2Wav finishes a block)
    3. a finished stream: Done; a waiting one takes its place at the next iteration
Text leads speech by construction: talker step k needs the reply part the thinker's step k made.

Not yet for Qwen2.5-Omni (concurrent streams interleave their units, each exact, but share no steps):
  - batching: each stream runs its own batch-1 thinker, talker and Token2Wav with caches of its own, so N
    concurrent streams cost N times the steps (Omni.enable_batching is a RequestError; the server interleaves);
  - chunked prefill, the conversation prefix cache, compiled or CUDA-graph decode steps;
  - quantize-on-load and quantized checkpoints (Omni.from_pretrained refuses them for this family).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import SamplingConfig
from ..config_qwen2_5 import Qwen25OmniConfig
from ..errors import Cancelled
from ..events import AudioChunk, Done, Event, GenerationResult, Started, TextDelta, Usage
from ..layers.sampler import Sampler
from ..models.qwen2_5.omni import Qwen25OmniModel
from ..processing.multimodal import PreparedPrompt
from .qwen2_5_speech import Qwen25SpeechPlan, Qwen25SpeechRun
from .qwen2_5_thinker import Qwen25ThinkerRun
from .scheduler import LOG_LENGTH, StepRecord
from .stream import Cancellable, Phase, report_failure



@dataclass
class Qwen25StreamSpec:
    """What a request needs, resolved against the checkpoint (built by qwen2_5_omni.Qwen25Omni)."""

    prompt: PreparedPrompt
    sampling: SamplingConfig
    seed: int | None
    stops: frozenset[int]
    speech: Qwen25SpeechPlan | None
    detokenize: Callable[[int, bool], str]  # (token, final) -> the text it completes (never broken UTF-8)
    result: Callable[["Qwen25Stream"], GenerationResult]  # the Done event's result, once everything is produced
    sink: Callable[[Event], None]


@dataclass
class Qwen25Stream(Cancellable):
    spec: Qwen25StreamSpec
    id: int = 0
    phase: Phase = Phase.WAITING
    thinker: Qwen25ThinkerRun | None = None
    sampler: Sampler | None = None
    tokens: list[int] = field(default_factory=list)
    text_done: bool = False
    speech: Qwen25SpeechRun | None = None
    audio: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    silent: bool = False  # a spoken reply that ended before the talker could start (no reply part)
    error: BaseException | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def speaking(self) -> bool:
        return self.spec.speech is not None and not self.silent and (self.speech is None or not self.speech.done)


class Qwen25Scheduler:
    def __init__(self, model: Qwen25OmniModel, cfg: Qwen25OmniConfig, concurrent: int = 1):
        assert concurrent >= 1, concurrent
        self.model, self.cfg, self.concurrent = model, cfg, concurrent
        self.shared = None  # no shared thinker rows (see the module doc)
        self.speaker = None
        self.waiting: collections.deque[Qwen25Stream] = collections.deque()
        self.running: list[Qwen25Stream] = []  # admitted, oldest first: each gets one unit per iteration
        self._submitted: collections.deque[Qwen25Stream] = collections.deque()
        self._lock = threading.Lock()
        self._ids = 0
        self.iteration = 0
        self.log: collections.deque[StepRecord] = collections.deque(maxlen=LOG_LENGTH)
        self.prefilled_positions = 0
        self.encoded_items = 0

    # -- any thread ----------------------------------------------------------------------------------------------

    def submit(self, spec: Qwen25StreamSpec) -> Qwen25Stream:
        with self._lock:
            self._ids += 1
            stream = Qwen25Stream(spec, id=self._ids)
            self._submitted.append(stream)
        return stream

    @property
    def busy(self) -> bool:
        with self._lock:
            queued = bool(self._submitted)
        return queued or bool(self.waiting or self.running)

    @property
    def active(self) -> int:
        return len(self.running)

    # -- the scheduler's thread ----------------------------------------------------------------------------------

    def iterate(self) -> bool:
        with self._lock:
            self.waiting.extend(self._submitted)
            self._submitted.clear()
        self.drop_cancelled()
        while self.waiting and len(self.running) < self.concurrent:
            self.running.append(self.waiting.popleft())
        if not self.running:
            return False
        self.iteration += 1
        for stream in list(self.running):
            try:
                self._work(stream)
            except Cancelled:
                self._release(stream)
            except Exception as error:  # noqa: BLE001 (the stream's own failure, reported on it)
                self._fail(stream, error)
        return True

    def run_until_done(self, stream: Qwen25Stream) -> None:
        while stream.phase is not Phase.DONE:
            self.iterate()

    def drop_cancelled(self) -> None:
        with self._lock:
            for stream in [s for s in self._submitted if s.cancelled]:
                self._submitted.remove(stream)
                stream.phase = Phase.DONE
        for stream in [s for s in list(self.waiting) + self.running if s.cancelled]:
            self._release(stream)

    def _record(self, kind: str, stream: Qwen25Stream, positions: int = 0) -> None:
        self.log.append(StepRecord(self.iteration, kind, (stream.id,), positions))

    def _work(self, stream: Qwen25Stream) -> None:
        spec = stream.spec
        if stream.phase is Phase.WAITING:
            budget = spec.sampling.max_new_tokens
            stream.thinker = Qwen25ThinkerRun(self.model.thinker, spec.prompt, budget, lambda: stream.cancelled)
            stream.phase = Phase.ENCODING
        if stream.phase is Phase.ENCODING and stream.thinker.pending:
            stream.thinker.encode_one()
            self.encoded_items += 1
            self._record("encode", stream)
            return
        if stream.phase is Phase.ENCODING:
            self._prefill(stream)
            return
        if not stream.text_done:
            self._decode(stream)
        if stream.speaking:
            self._speak(stream)
        if stream.text_done and not stream.speaking:
            self._finish(stream)

    def _prefill(self, stream: Qwen25Stream) -> None:
        spec, run = stream.spec, stream.thinker
        stream.sampler = Sampler(spec.sampling, 1, self.cfg.thinker.text.vocab_size, run.device, seed=spec.seed)
        stream.sampler.observe(run.ids.unsqueeze(0))  # prompt tokens count for the repetition penalty
        logits = run.prefill()
        self.prefilled_positions += stream.prompt_tokens
        self._record("prefill", stream, stream.prompt_tokens)
        stream.phase = Phase.RUNNING
        spec.sink(Started(stream.prompt_tokens, 0))
        self._push_token(stream, int(stream.sampler(logits.unsqueeze(0))[0]))

    def _decode(self, stream: Qwen25Stream) -> None:
        logits, part = stream.thinker.step(stream.tokens[-1])
        self._record("decode", stream)
        token = int(stream.sampler(logits.unsqueeze(0))[0])
        if stream.spec.speech is not None:
            if stream.speech is None:
                stream.speech = Qwen25SpeechRun(self.model, stream.spec.speech, stream.thinker, stream.tokens[0],
                                                part)
                self._record("talker_prefill", stream, stream.prompt_tokens + 2)
            elif not stream.speech.done:  # a talker that has ended needs no more text
                stream.speech.push_part(part)
        self._push_token(stream, token)

    def _push_token(self, stream: Qwen25Stream, token: int) -> None:
        spec = stream.spec
        stream.tokens.append(token)
        stream.text_done = token in spec.stops or len(stream.tokens) >= spec.sampling.max_new_tokens
        if stream.text_done:
            stream.thinker.cache = None  # the reply's text is complete: its cache is not needed any more
            if stream.speech is not None:
                text = len(stream.tokens) - (1 if token in spec.stops else 0)
                stream.speech.text_finished(text)
        piece = spec.detokenize(token, stream.text_done)
        if piece:
            spec.sink(TextDelta(piece, [token]))

    def _speak(self, stream: Qwen25Stream) -> None:
        speech = stream.speech
        if speech is None:
            stream.silent = stream.text_done  # the reply ended before its first part existed: nothing to say
            return
        if not speech.can_step:
            return  # its text part is not written yet
        wave = speech.step()
        self._record("talker_step", stream)
        if wave.size:
            stream.audio.append(wave)
            stream.spec.sink(AudioChunk(wave, stream.samples, self.cfg.token2wav.sample_rate))
            stream.samples += wave.size

    def _finish(self, stream: Qwen25Stream) -> None:
        result = stream.spec.result(stream)
        self._release(stream)
        stream.spec.sink(Done(result))

    def _fail(self, stream: Qwen25Stream, error: BaseException) -> None:
        report_failure(stream, error, self._release)

    def _release(self, stream: Qwen25Stream) -> None:
        stream.thinker = stream.sampler = stream.speech = None  # their caches go with them
        for queue in (self.waiting, self.running):
            if stream in queue:
                queue.remove(stream)
        stream.phase = Phase.DONE


def reply_result(stream: Qwen25Stream, tokenizer_decode: Callable[[list[int]], str], vocab_size: int,
                 sample_rate: int) -> GenerationResult:
    """The Done event's result: text, tokens, finish reasons, and the speech (wave and codes) when asked for."""
    reply, stops = stream.tokens, stream.spec.stops
    stopped = bool(reply) and reply[-1] in stops
    text_ids = [t for t in (reply[:-1] if stopped else reply) if t < vocab_size]
    result = GenerationResult(text=tokenizer_decode(text_ids), token_ids=list(reply),
                              finish_reason="stop" if stopped else "length", usage=Usage(stream.prompt_tokens,
                                                                                         len(reply), 0))
    if stream.spec.speech is not None:
        speech = stream.speech
        audio = np.concatenate(stream.audio) if stream.audio else np.zeros(0, dtype=np.float32)
        codes = torch.tensor([speech.codes]) if speech is not None and speech.codes else None
        reason = speech.finish_reason if speech is not None else "stop"
        result = dataclasses.replace(result, audio=audio, sample_rate=sample_rate, codes=codes,
                                     speech_finish_reason=reason)
    return result
