"""One request's state inside the scheduler: what it asked for, where it stands, and what it has produced.

    Stream          the request: prompt, resolved sampling and speech, its sink for events, its phase
    ThinkerSide     its row in a ThinkerBatch (shared, or one of its own), the prompt encoding, the prefill's
                    progress, its sampler and its tokens
    SpeechSide      its talker row (a TalkerBatch row, or a private TalkerSession), its frames, its Code2Wav
                    stream and the codes waiting to be vocoded

Only the scheduler changes these objects (on its own thread); `cancel()` may be called from any thread and takes
effect at the scheduler's next iteration.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import SamplingConfig
from ..errors import InputError
from ..events import Event, Failed, TokenLogprob
from ..layers.sampler import Sampler, TokenConstraint
from ..models.code2wav import Code2WavStream
from ..processing.multimodal import PreparedPrompt
from ..requests import ResolvedSpeech
from .encoding import PromptEncoding
from .prefix_cache import PrefixEntry
from .talker_session import TalkerSamplers, TalkerSession
from .thinker_batch import ThinkerBatch
from .thinker_runner import PrefillInputs

log = logging.getLogger("thinktalk.engine")

_ids = itertools.count(1)


class Phase(enum.Enum):
    WAITING = "waiting"  # queued: no thinker row yet
    ENCODING = "encoding"  # its media go through the encoders, one item per turn
    PREFILLING = "prefilling"  # its prompt goes into its row, one chunk per turn
    RUNNING = "running"  # decoding and / or speaking
    DONE = "done"  # finished, failed or cancelled: holds nothing


@dataclass
class StreamSpec:
    """What a request needs, resolved against the checkpoint (built by Omni)."""

    prompt: PreparedPrompt
    sampling: SamplingConfig
    seed: int | None
    stops: frozenset[int]
    speech: ResolvedSpeech | None
    detokenize: Callable[[int, bool], str]  # (token, final) -> the text it completes (never broken UTF-8)
    finish: Callable[["Stream"], Event]  # the stream's Done event, once everything is produced
    sink: Callable[[Event], None]  # receives the stream's events, in order
    constraint: TokenConstraint | None = None  # a grammar the reply must follow (engine/constraints.py)
    logprobs: int | None = None  # k: report each token's log-probability and the k most likely (None: off)


@dataclass
class ThinkerSide:
    group: ThinkerBatch | None = None
    row: int | None = None
    private: bool = False  # the group is this stream's own (released with it)
    encoding: PromptEncoding | None = None
    inputs: PrefillInputs | None = None
    cached: int = 0  # prompt positions taken from a cached prefix
    prefix: PrefixEntry | None = None  # that prefix, until the prefill is done
    next_position: int = 0  # the prefill's progress
    kept: torch.Tensor | None = None  # (1, seq, hidden) hidden states kept for the talker
    logits: torch.Tensor | None = None  # (1, vocab) at the prompt's last token, once the prefill reached it
    sampler: Sampler | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # reply tokens' but stop tokens', when asked for
    unsent: list[TokenLogprob] = field(default_factory=list)  # of those, the ones no TextDelta carried yet
    done: bool = False

    def is_final(self, index: int) -> bool:
        return self.done and index == len(self.tokens) - 1


class SpeechState(enum.Enum):
    WAITING_PREFILL = "waiting_prefill"  # needs the thinker's first token, then a talker prefill
    FRESH = "fresh"  # the newest code0 waits for its code-predictor pass
    NEEDS_TEXT = "needs_text"  # the frame is made: waits for the text token its next step reads
    DEPOSITED = "deposited"  # the next input is in: waits for a talker step
    DONE = "done"  # codec EOS, the budget or the runaway guard: nothing more to say


@dataclass
class SpeechSide:
    params: ResolvedSpeech
    samplers: TalkerSamplers | None = None
    row: int | None = None  # in the scheduler's TalkerBatch, or None with a private session
    session: TalkerSession | None = None
    text_embeds: torch.Tensor | None = None  # (3, hidden): tts_bos, tts_eos, tts_pad after text_projection
    state: SpeechState = SpeechState.WAITING_PREFILL
    code0: int = -1
    frames: int = 0
    codec_sum: torch.Tensor | None = None  # (1, hidden) the last frame's codec embedding sum
    pending_input: torch.Tensor | None = None  # (1, hidden) a private session's next input
    vocoder: Code2WavStream | None = None
    pending: list[torch.Tensor] = field(default_factory=list)  # frames (1, groups) not yet vocoded
    codes: list[torch.Tensor] = field(default_factory=list)  # every frame's codes (groups,)
    audio: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    finish_reason: str | None = None


class Cancellable:
    """A stream's cancel flag and prompt size, shared by both families' streams (each sets `_cancel`, a
    threading.Event, and `spec`, whose `prompt` is the PreparedPrompt)."""

    _cancel: threading.Event

    def cancel(self) -> None:
        """Safe from any thread: the scheduler frees the stream's rows and caches at its next iteration."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def prompt_tokens(self) -> int:
        return len(self.spec.prompt.token_ids)


def report_failure(stream, error: BaseException, release: Callable[[object], None]) -> None:
    """A stream's end by error: an engine bug (anything but an InputError) is logged with its traceback; the
    stream's holdings are released before its consumer hears of it."""
    if not isinstance(error, InputError):
        log.error("stream %d failed inside the engine", stream.id, exc_info=error)
    stream.error = error
    release(stream)
    stream.spec.sink(Failed(error))


class Stream(Cancellable):
    def __init__(self, spec: StreamSpec):
        self.id = next(_ids)
        self.spec = spec
        self.phase = Phase.WAITING
        self.thinker = ThinkerSide()
        self.speech = SpeechSide(spec.speech) if spec.speech is not None else None
        self._cancel = threading.Event()
        self.error: BaseException | None = None

    @property
    def finished(self) -> bool:
        speaking = self.speech is not None and (self.speech.state is not SpeechState.DONE or self.speech.pending)
        return self.phase is Phase.RUNNING and self.thinker.done and not speaking
