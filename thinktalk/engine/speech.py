"""The scheduler's speech turn: every speaking stream's talker and Code2Wav work of one iteration, batched.

Per stream, one codec frame per turn at most:
    first token known          talker prefill (a TalkerBatch row, or a private TalkerSession) -> code0 of frame 0
    deposited                  ONE talker step for every deposited row -> the next code0
    code0 fresh                ONE code-predictor pass for every fresh row -> the frame's 16 codes
    a chunk of frames ready    Code2Wav (batched across streams, engine/vocoder.py) -> AudioChunk
    frame made                 its next input (codec sum + the embedding of reply token `frames`, tts_eos for the
                               thinker's final token, tts_pad once the text is spent) as soon as that token exists
A stream's speech ends at codec EOS, at its frame budget, or (when the request set no budget) at the runaway
guard's bound: requests.guard_frames(text tokens) once the thinker is done. Text always leads speech: step k reads
reply token k + 1, so the talker never waits for a token the thinker has already written.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import OmniConfig
from ..events import AudioChunk
from ..models.code2wav import Code2WavStream
from ..models.omni import OmniModel
from ..requests import guard_frames
from .stream import SpeechSide, SpeechState, Stream
from .talker_batch import TalkerBatch
from .talker_prompt import build_talker_prefill
from .talker_session import TalkerSession, talker_samplers
from .vocoder import vocode_batch


class Speaker:
    def __init__(self, model: OmniModel, cfg: OmniConfig, options, record: Callable):
        self.model, self.cfg, self.options, self.record = model, cfg, options, record
        rows = options.rows if options.talker_rows is None else options.talker_rows
        length = options.talker_max_len or options.max_len + cfg.talker_sampling.max_new_tokens
        self.batch = TalkerBatch(model.talker, cfg, rows, length) if rows else None
        self.owners: dict[int, Stream] = {}  # batch row -> its stream

    def turn(self, streams: list[Stream], fail: Callable[[Stream, BaseException], None]) -> None:
        for stream in [s for s in streams if s.speech.state is SpeechState.WAITING_PREFILL and s.thinker.tokens]:
            self._guarded(stream, fail, self._prefill)
        self._steps(streams, fail)
        self._passes(streams, fail)
        ready = [s for s in streams if s.speech.pending and (len(s.speech.pending) >= s.speech.params.chunk_frames
                                                             or s.speech.state is SpeechState.DONE)]
        self._vocode(ready, fail)
        for stream in [s for s in streams if s.speech.state is SpeechState.NEEDS_TEXT]:
            self._guarded(stream, fail, self._deposit)

    @staticmethod
    def _guarded(stream: Stream, fail, work) -> None:
        try:
            work(stream)
        except Exception as error:  # noqa: BLE001 (the stream's own failure, reported on it)
            fail(stream, error)

    # -- per stream -----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _prefill(self, stream: Stream) -> None:
        speech, side = stream.speech, stream.thinker
        if side.done and side.tokens[0] in stream.spec.stops:  # the reply is empty: nothing to say
            self._end(stream, "stop")
            return
        embed, inputs = self.model.thinker.embed, side.inputs
        first = embed(torch.tensor([side.tokens[0]], device=inputs.embeds.device))[0]
        prompt = stream.spec.prompt
        prefill = build_talker_prefill(self.model.talker, self.cfg, inputs.token_ids[0], inputs.embeds[0],
                                       side.kept[0], prompt.layout, prompt.use_audio_in_video, first,
                                       speech.params.speaker_id, embed)
        device = self.model.talker.model.codec_embedding.weight.device
        speech.samplers = talker_samplers(self.cfg, speech.params.sampling, speech.params.seed, device)
        speech.text_embeds = prefill.text_embeds
        speech.vocoder = Code2WavStream(self.model.code2wav)
        seq = prefill.embeds.shape[1]
        row = self.batch.take_row() if self.batch is not None and self.batch.fits(seq, speech.params.max_frames) \
            else None
        if row is not None:
            speech.row, self.owners[row] = row, stream
            code0 = self.batch.prefill(row, prefill, speech.samplers)
        else:
            speech.session = TalkerSession(self.model.talker, self.cfg, prefill, speech.params.sampling,
                                           speech.params.seed, self.options.step_mode)
            code0 = speech.session.last_code0
        self.record("talker_prefill", [stream], seq)
        self._code0(stream, code0)

    def _code0(self, stream: Stream, code0: int) -> None:
        speech = stream.speech
        speech.code0 = code0
        if code0 == self.cfg.talker.codec_eos_id:
            self._end(stream, "stop")
        elif not self._spent(stream):
            speech.state = SpeechState.FRESH

    def _frame(self, stream: Stream, codes: torch.Tensor, codec_sum: torch.Tensor) -> None:
        speech = stream.speech
        speech.frames += 1
        speech.codes.append(codes[0])
        speech.pending.append(codes)
        speech.codec_sum = codec_sum
        if not self._spent(stream):  # a spent budget needs no step: its code0 would get no frame
            speech.state = SpeechState.NEEDS_TEXT

    def _spent(self, stream: Stream) -> bool:
        """The frame budget, or the runaway guard's bound, is reached: the speech ends (finish reason "length")."""
        speech = stream.speech
        over = speech.frames >= speech.params.max_frames or (
            speech.params.guarded and stream.thinker.done and speech.frames >= guard_frames(len(stream.thinker.tokens)))
        if over:
            self._end(stream, "length")
        return over

    @torch.inference_mode()
    def _deposit(self, stream: Stream) -> None:
        speech, side = stream.speech, stream.thinker
        index = speech.frames  # the step after frame k reads reply token k + 1
        if index >= len(side.tokens) and not side.done:
            return  # that token is not written yet
        tts_eos, tts_pad = speech.text_embeds[1], speech.text_embeds[2]
        if index >= len(side.tokens):
            text = tts_pad.unsqueeze(0)
        elif side.is_final(index):
            text = tts_eos.unsqueeze(0)
        else:
            token = torch.tensor([side.tokens[index]], device=tts_pad.device)
            text = self.model.talker.text_projection(self.model.thinker.embed(token))
        if speech.row is not None:
            self.batch.deposit(speech.row, speech.codec_sum + text, speech.samplers)
        else:
            speech.pending_input = text
        speech.state = SpeechState.DEPOSITED

    def _end(self, stream: Stream, reason: str) -> None:
        speech = stream.speech
        speech.state, speech.finish_reason = SpeechState.DONE, reason
        self._free_row(speech)

    # -- batched work ---------------------------------------------------------------------------------------------

    def _steps(self, streams: list[Stream], fail) -> None:
        if self.batch is not None and self.batch.has_deposits:
            served = [self.owners[row] for row in self.batch.samplers]
            try:
                code0s = self.batch.step()
            except Exception as error:  # noqa: BLE001 (a batched step: every stream it served fails)
                for stream in served:
                    fail(stream, error)
                return
            self.record("talker_step", served)
            for row, code0 in code0s.items():
                self._code0(self.owners[row], code0)
        for stream in [s for s in streams if s.speech.state is SpeechState.DEPOSITED and s.speech.session]:
            def step(s: Stream) -> None:
                speech = s.speech
                code0 = speech.session.advance(speech.codec_sum, speech.pending_input)
                speech.pending_input = None
                self.record("talker_step", [s])
                self._code0(s, code0)
            self._guarded(stream, fail, step)

    def _passes(self, streams: list[Stream], fail) -> None:
        fresh = [s for s in streams if s.speech.state is SpeechState.FRESH]
        shared = {s.speech.row: s for s in fresh if s.speech.row is not None}
        if shared:
            try:
                frames = self.batch.complete({row: s.speech.samplers for row, s in shared.items()})
            except Exception as error:  # noqa: BLE001 (a batched pass: every stream it served fails)
                for stream in shared.values():
                    fail(stream, error)
                frames = {}
            if frames:
                self.record("frame_pass", shared.values())
            for row, (codes, codec_sum) in frames.items():
                self._frame(shared[row], codes, codec_sum)
        for stream in [s for s in fresh if s.speech.session is not None]:
            def frame(s: Stream) -> None:
                codes, codec_sum = s.speech.session.complete()
                self.record("frame_pass", [s])
                self._frame(s, codes, codec_sum)
            self._guarded(stream, fail, frame)

    def _vocode(self, streams: list[Stream], fail) -> None:
        if not streams:
            return
        try:
            waves = vocode_batch(self.model.code2wav, [s.speech for s in streams])
        except Exception as error:  # noqa: BLE001 (a batched call: every stream it served fails)
            for stream in streams:
                fail(stream, error)
            return
        self.record("vocode", streams)
        rate = self.cfg.code2wav.sample_rate
        for stream, wave in zip(streams, waves):
            speech = stream.speech
            speech.audio.append(wave)
            stream.spec.sink(AudioChunk(wave, speech.samples, rate))
            speech.samples += wave.size

    def release(self, stream: Stream) -> None:
        self._free_row(stream.speech)
        stream.speech.session = None

    def _free_row(self, speech: SpeechSide) -> None:
        if speech.row is not None:
            self.batch.release(speech.row)
            self.owners.pop(speech.row, None)
            speech.row = None
        speech.session = None
