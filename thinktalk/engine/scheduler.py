"""The one owner of the step loop: admission, the thinker's and the talker's rows, Code2Wav, cancellation.

Each `iterate()` decides what runs, in this order:
    1. take new submissions (thread-safe), drop cancelled streams (their rows and caches freed at once)
    2. admit waiting streams in order while rows are free (a stream too long for the shared rows gets a row of
       its own); a cached conversation prefix is written into the row (engine/prefix_cache.py)
    3. ONE unit of admission work for the oldest admitted stream: one media item through the encoders, or one
       chunk of its prefill; a finished prefill samples the first token (Started, then the first TextDelta)
    4. ONE decode step for every decoding thinker row (each batch of rows: one step)
    5. speech: talker prefills for streams that have their first token; ONE talker step for every deposited row;
       ONE code-predictor pass for every fresh row; Code2Wav for every stream with a chunk ready; next inputs
       deposited where their text token is known
    6. finished streams: the last audio, then Done
So a running stream waits at most one encoder item or one prefill chunk between its steps. Nothing runs inside a
property; every step is recorded in `log` (StepRecord), and the counters say how much prefill work was done and
how much a cached prefix spared.

Work that fails for one stream fails that stream only (Failed(error): an errors.InputError is the request's
fault; anything else is logged with its traceback); a failing batched step fails the streams it served.
Not thread-safe but for `submit` and `Stream.cancel`: one thread iterates.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

from ..config import OmniConfig
from ..errors import Cancelled
from ..events import Started, TextDelta, TokenLogprob
from ..layers.sampler import SampledLogprobs, Sampler
from ..models.omni import OmniModel
from .encoding import PromptEncoding
from .graphs import StepMode
from .prefix_cache import PrefixCache
from .speech import Speaker
from .stream import Phase, Stream, StreamSpec, ThinkerSide, report_failure
from .thinker_batch import DEFAULT_MAX_LEN, PrivateRows, ThinkerBatch
from .thinker_runner import PREFILL_CHUNK

LOG_LENGTH = 4096  # step records kept (a bounded window: tests and benchmarks read the recent ones)


@dataclass(frozen=True)
class SchedulerOptions:
    rows: int = 0  # shared thinker rows; 0: every stream decodes in a row of its own
    max_len: int = DEFAULT_MAX_LEN  # cache slots per shared row (prompt + reply); longer streams get their own
    talker_rows: int | None = None  # shared talker rows (None: as many as thinker rows; 0: private sessions)
    talker_max_len: int | None = None  # None: max_len + the checkpoint's talker budget
    compile: bool = False  # compile the shared thinker decode step (CPU)
    prefill_chunk: int | None = PREFILL_CHUNK
    prefix_cache_bytes: int = 0  # 0: no conversation prefix cache
    step_mode: StepMode | None = None  # private talker sessions' steps (None: the device's default)


@dataclass(frozen=True)
class StepRecord:
    iteration: int
    kind: str  # "encode", "prefill", "decode", "talker_prefill", "talker_step", "frame_pass", "vocode"
    streams: tuple[int, ...]
    positions: int = 0  # prompt positions a prefill chunk ran


class Scheduler:
    def __init__(self, model: OmniModel, cfg: OmniConfig, options: SchedulerOptions = SchedulerOptions(),
                 private_rows: PrivateRows | None = None):
        """private_rows: where streams that decode alone get their one-row batches (kept across requests, so
        their decode steps are captured once per length); None: a pool of this scheduler's own."""
        self.model, self.cfg, self.options = model, cfg, options
        self.private_rows = private_rows or PrivateRows(model.thinker, options.prefill_chunk)
        self.shared = (ThinkerBatch(model.thinker, options.rows, options.max_len, options.compile,
                                    prefill_chunk_size=options.prefill_chunk) if options.rows else None)
        self.speaker = Speaker(model, cfg, options, self._record) if model.talker is not None else None
        self.prefix_cache = PrefixCache(options.prefix_cache_bytes) if options.prefix_cache_bytes else None
        self.waiting: collections.deque[Stream] = collections.deque()
        self.admitted: list[Stream] = []  # encoding or prefilling, oldest first
        self.running: list[Stream] = []
        self._submitted: collections.deque[Stream] = collections.deque()
        self._lock = threading.Lock()
        self.iteration = 0
        self.log: collections.deque[StepRecord] = collections.deque(maxlen=LOG_LENGTH)
        self.prefilled_positions = 0  # prompt positions run through the thinker
        self.cached_positions = 0  # prompt positions a cached prefix spared
        self.encoded_items = 0

    # -- any thread ----------------------------------------------------------------------------------------------

    def submit(self, spec: StreamSpec) -> Stream:
        stream = Stream(spec)
        with self._lock:
            self._submitted.append(stream)
        return stream

    @property
    def busy(self) -> bool:
        with self._lock:
            queued = bool(self._submitted)
        return queued or bool(self.waiting or self.admitted or self.running)

    @property
    def active(self) -> int:
        return len(self.admitted) + len(self.running)

    # -- the scheduler's thread ----------------------------------------------------------------------------------

    def iterate(self) -> bool:
        """One turn of the loop (see the module doc); False when there was nothing to do."""
        with self._lock:
            self.waiting.extend(self._submitted)
            self._submitted.clear()
        if not (self.waiting or self.admitted or self.running):
            return False
        self.iteration += 1
        self.drop_cancelled()
        self._admit()
        self._admission_work()
        self._decode()
        if self.speaker is not None:
            self.speaker.turn([s for s in self.running if s.speech is not None], self._fail)
        self._finish()
        return True

    def run_until_done(self, stream: Stream) -> None:
        while stream.phase is not Phase.DONE:
            self.iterate()

    def _record(self, kind: str, streams, positions: int = 0) -> None:
        self.log.append(StepRecord(self.iteration, kind, tuple(s.id for s in streams), positions))

    def drop_cancelled(self) -> None:
        """Frees the rows and caches of every cancelled stream now (no device work: rows are marked free)."""
        with self._lock:
            gone = [s for s in self._submitted if s.cancelled]
            for stream in gone:
                self._submitted.remove(stream)
                stream.phase = Phase.DONE
        for stream in [s for s in list(self.waiting) + self.admitted + self.running if s.cancelled]:
            self._release(stream)

    # -- admission -----------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting:
            stream = self.waiting[0]
            try:
                if not self._place(stream):
                    return
                self.waiting.popleft()
                self._start_encoding(stream)
                self.admitted.append(stream)
            except Exception as error:  # noqa: BLE001 (the stream's own failure, reported on it)
                self.waiting.popleft()
                self._fail(stream, error)

    def _place(self, stream: Stream) -> bool:
        """A thinker row for the stream: a shared one when it fits and one is free, else one of its own."""
        needed = stream.prompt_tokens + stream.spec.sampling.max_new_tokens
        side = stream.thinker
        if self.shared is not None and self.shared.fits(needed):
            side.row = self.shared.take_row()
            if side.row is None:
                return False  # wait for a free row (streams are admitted in order)
            side.group = self.shared
            return True
        side.group, side.row, side.private = self.private_rows.take(needed), 0, True
        return True

    def _free_row(self, side: ThinkerSide) -> None:
        """The stream's thinker row is free again (a private batch goes back to the pool)."""
        side.group.release(side.row)
        if side.private:
            self.private_rows.give_back(side.group)
        side.group, side.row, side.private = None, None, False

    def _start_encoding(self, stream: Stream) -> None:
        side, prompt = stream.thinker, stream.spec.prompt
        hit = None
        if self.prefix_cache is not None:
            hit = self.prefix_cache.lookup(prompt.token_ids, need_kept=stream.speech is not None)
        side.encoding = PromptEncoding(self.model.thinker, prompt, hit.length if hit else 0,
                                       should_stop=lambda: stream.cancelled)
        side.cached = side.encoding.cached
        if side.cached:
            hit.entry.write(side.group.row_cache(side.row), side.cached)
            side.prefix = hit.entry
        stream.phase = Phase.ENCODING

    def _admission_work(self) -> None:
        if not self.admitted:
            return
        stream = self.admitted[0]
        try:
            if stream.phase is Phase.ENCODING:
                had_media = stream.thinker.encoding.pending
                self._encode_one(stream)
                if had_media or stream.phase is not Phase.PREFILLING:
                    return  # the unit was an encoder item; a text-only prompt goes straight to its first chunk
            self._prefill_one(stream)
        except Cancelled:
            return  # stopped between encoder groups; drop_cancelled frees it at the next iteration
        except Exception as error:  # noqa: BLE001 (the stream's own failure, reported on it)
            self._fail(stream, error)

    def _encode_one(self, stream: Stream) -> None:
        side = stream.thinker
        if side.encoding.pending:
            side.encoding.run_one()
            self.encoded_items += 1
            self._record("encode", [stream])
            if side.encoding.pending:
                return
        keep = self.cfg.talker.accept_hidden_layer if stream.speech is not None else None
        side.inputs = side.encoding.inputs(keep)
        device = side.group.device
        spec = stream.spec
        side.sampler = Sampler(spec.sampling, 1, self.cfg.thinker.text.vocab_size, device, seed=spec.seed,
                               constraint=spec.constraint, logprobs=spec.logprobs)
        side.sampler.observe(side.inputs.token_ids)  # prompt tokens count for the repetition penalty
        seq = side.inputs.embeds.shape[1]
        if keep is not None:
            side.kept = side.inputs.embeds.new_zeros(1, seq, side.inputs.embeds.shape[-1])
            if side.cached:
                side.kept[0, :side.cached] = side.prefix.kept[:side.cached]
        side.next_position = side.cached
        self.cached_positions += side.cached
        stream.phase = Phase.PREFILLING

    def _prefill_one(self, stream: Stream) -> None:
        side = stream.thinker
        seq = side.inputs.embeds.shape[1]
        chunk = seq if self.options.prefill_chunk is None else self.options.prefill_chunk
        start, end = side.next_position, min(side.next_position + chunk, seq)
        logits, kept = side.group.prefill_chunk(side.row, side.inputs, start, end)
        if side.kept is not None:
            side.kept[:, start:end] = kept
        side.next_position = end
        self.prefilled_positions += end - start
        self._record("prefill", [stream], end - start)
        if end < seq:
            return
        first = int(side.sampler(logits)[0])
        side.group.start_decoding(side.row, side.inputs, first, side.sampler)
        side.encoding = side.prefix = None  # the media embeddings and the prefix are in the cache now
        self.admitted.remove(stream)
        self.running.append(stream)
        stream.phase = Phase.RUNNING
        stream.spec.sink(Started(stream.prompt_tokens, side.cached))
        self._push_token(stream, first)

    # -- the thinker's decode steps ------------------------------------------------------------------------------

    def _decode(self) -> None:
        groups = {id(s.thinker.group): s.thinker.group for s in self.running
                  if not s.thinker.done and s.thinker.group is not None}
        for group in groups.values():
            owners = {s.thinker.row: s for s in self.running if s.thinker.group is group and not s.thinker.done}
            try:
                tokens = group.step()
            except Exception as error:  # noqa: BLE001 (a batched step: every stream it served fails)
                for stream in owners.values():
                    self._fail(stream, error)
                continue
            self._record("decode", owners.values())
            for row, token in tokens.items():
                self._push_token(owners[row], token)

    def _push_token(self, stream: Stream, token: int) -> None:
        side, spec = stream.thinker, stream.spec
        side.tokens.append(token)
        side.done = token in spec.stops or len(side.tokens) >= spec.sampling.max_new_tokens
        picked = side.sampler.take_logprobs()
        if picked is not None and token not in spec.stops:
            side.logprobs.append(_host_logprob(token, picked))
            side.unsent.append(side.logprobs[-1])
        if side.done:
            self._thinker_finished(stream)
        else:
            side.sampler.accept(token)  # a grammar moves past it (its next mask: at the row's next pick)
        piece = spec.detokenize(token, side.done)
        if piece or (side.done and side.unsent):  # the last logprobs go out even when their tokens show no text
            spec.sink(TextDelta(piece, [token], tuple(side.unsent)))
            side.unsent = []

    def _thinker_finished(self, stream: Stream) -> None:
        """The reply's text is complete: cache the conversation prefix, free the thinker row."""
        side = stream.thinker
        side.group.stop(side.row)
        if self.prefix_cache is not None:
            tokens = list(stream.spec.prompt.token_ids) + side.tokens[:-1]  # the last token was never fed
            self.prefix_cache.store(tokens, side.group.row_cache(side.row), side.kept)
        self._free_row(side)

    # -- the end of a stream -------------------------------------------------------------------------------------

    def _finish(self) -> None:
        for stream in [s for s in self.running if s.finished]:
            try:
                stream.spec.sink(stream.spec.finish(stream))
            except Exception as error:  # noqa: BLE001 (the stream's own failure, reported on it)
                self._fail(stream, error)
                continue
            self._release(stream)

    def _fail(self, stream: Stream, error: BaseException) -> None:
        report_failure(stream, error, self._release)

    def _release(self, stream: Stream) -> None:
        """Frees whatever the stream holds; it leaves every queue."""
        side = stream.thinker
        if side.group is not None and side.row is not None:
            self._free_row(side)
        side.group = side.row = side.encoding = side.inputs = side.kept = side.prefix = None
        if self.speaker is not None and stream.speech is not None:
            self.speaker.release(stream)
        for queue in (self.admitted, self.running):
            if stream in queue:
                queue.remove(stream)
        if stream in self.waiting:
            self.waiting.remove(stream)
        stream.phase = Phase.DONE


def _host_logprob(token: int, picked: SampledLogprobs) -> TokenLogprob:
    """The pick's log-probabilities on the host (the step already synchronised: these are small copies)."""
    top = zip(picked.top_ids[0].tolist(), picked.top_logprobs[0].tolist())
    return TokenLogprob(token, float(picked.chosen[0]), tuple(top))
