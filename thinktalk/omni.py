"""The public entry point: `Omni.from_pretrained(path)`, then `generate` / `stream`.

    messages --processing--> PreparedPrompt (token ids with media placeholders, media features)
             --Scheduler (engine/scheduler.py)--> Started, TextDelta..., AudioChunk..., Done
One Scheduler owns every step of the model: `enable_batching` makes a persistent one with shared rows (what the
server runs), otherwise each call runs a scheduler of its own sized for it. Requests are typed
(requests.GenerationRequest); the keyword arguments of generate / stream are a thin convenience over them.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import OmniConfig, load_config
from .config_qwen2_5 import MODEL_TYPE as QWEN2_5_MODEL_TYPE, checkpoint_model_type
from .engine import memory
from .engine.scheduler import Scheduler, SchedulerOptions
from .engine.thinker_batch import DEFAULT_MAX_LEN, PrivateRows, ThinkerBatch, check_batching
from .engine.thinker_runner import PREFILL_CHUNK

MOST_PLANNED_ROWS = 32  # the default batch's rows when memory allows: past this, on the released model's widths a
# decode step is no longer bound by reading the weights (about 8 experts x 32 rows touch most of the 128 experts)
from .engine.talker_batch import TalkerBatch
from .errors import RequestError
from .events import AudioChunk, Done, Event, Failed, GenerationResult, Started, TextDelta, Usage
from .limits import check_request
from .models.omni import OmniModel
from .processing.audio import AudioFeatureConfig
from .processing.chat_template import CheckpointTemplate, TemplateOptions
from .processing.multimodal import MediaOptions, PreparedPrompt
from .processing.templated_prompt import prepare_prompt
from .processing.tokenizer import Tokenizer
from .processing.vision import VisionProcessorConfig
from .quant import Quantization, QuantizeOnLoad, quantization_for
from .replies import request_from_keywords, stream_spec
from .requests import GenerationRequest
from .weights import load_weights, materialize

__all__ = ["AudioChunk", "DEFAULT_MAX_LEN", "Done", "GenerationResult", "Omni", "Started", "TextDelta", "Usage",
           "check_batching"]

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "Qwen/Qwen3-Omni-30B-A3B-Instruct"
DEFAULT_VOICE = "ethan"  # the reference's default speaker
DEFAULT_SAMPLE_RATE = 24000  # a thinker-only checkpoint's (its speech would be at the talker's 24 kHz)
SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A local directory, or a Hugging Face repo id already in the local cache. Never downloads."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    text = str(path)
    if REPO_ID.fullmatch(text) and not local.exists():
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
        repo = hub.expanduser() / ("models--" + text.replace("/", "--"))
        ref = repo / "refs" / "main"
        snapshots = repo / "snapshots"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        if snapshots.is_dir() and (found := sorted(p for p in snapshots.iterdir() if p.is_dir())):
            return found[-1]
        raise FileNotFoundError(f"{text!r} is not a local directory and is not in the local Hugging Face cache "
                                f"({repo}); thinktalk never downloads: fetch the checkpoint first")
    raise FileNotFoundError(f"checkpoint directory {text!r} does not exist")


def _pick_device_and_dtype(device, dtype, quantized: bool = False) -> tuple[torch.device, torch.dtype]:
    """Default dtype: bfloat16 on CUDA, and on the CPU for quantized weights (the CPU's int4/int8 kernels are fast in
    bfloat16 only); float32 otherwise."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" or quantized else torch.float32
    if isinstance(dtype, str):
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
        dtype = SUPPORTED_DTYPES[dtype]
    if dtype not in SUPPORTED_DTYPES.values():
        raise ValueError(f"dtype {dtype} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    return device, dtype


class Omni:
    def __init__(self, cfg: OmniConfig, model: OmniModel, tokenizer: Tokenizer, path: Path, media: MediaOptions,
                 quantization: Quantization | None = None, chat_template: CheckpointTemplate | None = None):
        self.cfg, self.model, self.tokenizer, self.path, self.media = cfg, model, tokenizer, path, media
        self.chat_template = chat_template  # the checkpoint's own; None: the built-in ChatML layout
        self.quantization = quantization  # how the weights are quantized (None: floats)
        embeddings = model.thinker.model.embed_tokens.weight  # never quantized: the model's device and dtype
        self.device, self.dtype = embeddings.device, embeddings.dtype
        self._scheduler: Scheduler | None = None  # the persistent one (enable_batching)
        # One-row thinker batches of streams that decode alone, kept across calls: their decode steps are
        # captured (CUDA graphs) once per row length, not once per request.
        self.private_rows = PrivateRows(model.thinker)
        # Prompt + reply tokens one request may take (limits.py); a server may lower it (--max-model-len).
        self.max_model_len = cfg.thinker.text.max_position_embeddings

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None, audio_output: bool | None = None,
                        show_progress: bool | None = None, allow_remote_media: bool = False,
                        quantize: str | QuantizeOnLoad | None = None) -> "Omni":
        """`allow_remote_media`: fetch http(s) media URLs found in messages (off by default).
        `quantize`: "int8", "int4" or "fp8" (or a QuantizeOnLoad, which also says which modules) quantizes a float
        checkpoint tensor by tensor as it loads. A quantized checkpoint (FP8, compressed-tensors, GPTQ, AutoRound)
        is recognised from its config and loads in its own form, without this."""
        directory = resolve_checkpoint(path)
        if checkpoint_model_type(directory) == QWEN2_5_MODEL_TYPE:  # the other family: qwen2_5_omni.py
            from .qwen2_5_omni import Qwen25Omni

            return Qwen25Omni.load(directory, device, dtype, audio_output, show_progress, allow_remote_media,
                                   quantize)
        cfg = load_config(directory)
        quantization = quantization_for(cfg, directory / "config.json", quantize)
        device, dtype = _pick_device_and_dtype(device, dtype, quantized=quantization is not None)
        if audio_output is None:
            audio_output = cfg.has_audio_output
        tokenizer = Tokenizer.from_dir(directory)
        chat_template = CheckpointTemplate.from_dir(directory, tokenizer.added_texts)
        with torch.device("meta"):
            model = OmniModel(cfg, audio_output=audio_output)
        if quantization is not None:
            quantization.apply(model, dtype, device)
        model = materialize(model, device, dtype).eval()
        skip = () if audio_output else ("talker.", "code2wav.")
        grouped = None if quantization is None else quantization.sources(model, device)
        load_weights(model, directory, device, dtype, skip_prefixes=skip, show_progress=show_progress,
                     grouped=grouped)
        media = MediaOptions(AudioFeatureConfig.from_dir(directory), VisionProcessorConfig.from_dir(directory),
                             allow_remote=allow_remote_media)
        return cls(cfg, model, tokenizer, directory, media, quantization, chat_template)

    # ------------------------------------------------------------------------------------------------------------
    # The scheduler

    def enable_batching(self, rows: int, max_len: int = DEFAULT_MAX_LEN, compile: bool = False,
                        talker_max_len: int | None = None, prefix_cache_bytes: int = 0,
                        prefill_chunk: int | None = PREFILL_CHUNK) -> ThinkerBatch:
        """From now on every stream runs on one persistent Scheduler: concurrent streams (advanced by one thread,
        as the server's worker does) share each thinker decode step in `rows` rows of `max_len` slots, and spoken
        replies each talker step and code-predictor pass. A stream longer than a row gets a row of its own; the
        tokens are the same either way. `compile` compiles the shared decode step (CPU); `prefix_cache_bytes`
        keeps conversation prefixes across turns (engine/prefix_cache.py). Returns the shared thinker rows."""
        check_batching(rows, max_len)
        self.enable_scheduler(rows, max_len, compile, talker_max_len, prefix_cache_bytes, prefill_chunk)
        return self._scheduler.shared

    def enable_scheduler(self, rows: int = 0, max_len: int | None = DEFAULT_MAX_LEN, compile: bool = False,
                         talker_max_len: int | None = None, prefix_cache_bytes: int = 0,
                         prefill_chunk: int | None = PREFILL_CHUNK) -> None:
        """The persistent scheduler that `submit` / `iterate` (the server) run; rows=0: every stream decodes in a
        row of its own and speaks in a private talker session. prefill_chunk: prompt positions per prefill unit
        (a running stream waits at most one unit between its steps). max_len=None: as many slots per row as the
        device's free memory holds (engine/memory.py's plan, on CUDA; DEFAULT_MAX_LEN elsewhere)."""
        if max_len is None:
            max_len = self.planned_max_len(rows)
        options = SchedulerOptions(rows=rows, max_len=max_len, compile=compile, talker_rows=None if rows else 0,
                                   talker_max_len=talker_max_len, prefix_cache_bytes=prefix_cache_bytes,
                                   prefill_chunk=prefill_chunk)
        self._scheduler = Scheduler(self.model, self.cfg, options, self.private_rows)

    def planned_max_len(self, rows: int) -> int:
        """Cache slots per shared row that the weights (in their stored, possibly quantized, bytes) leave room for
        on this device, after the encoders' and a prefill chunk's reserves; capped at the model's positions."""
        if self.device.type != "cuda" or rows == 0:
            return DEFAULT_MAX_LEN
        total, free = memory.device_memory(self.device)
        plan = memory.plan_memory(self.cfg, self.dtype, memory.parameter_bytes(self.model), total, free, batch=rows,
                                  talker=self.model.talker is not None)
        return max(2, min(plan.max_len, self.cfg.thinker.text.max_position_embeddings))

    def planned_rows(self, max_len: int, most: int = MOST_PLANNED_ROWS) -> int:
        """Rows of `max_len` cache slots that this device's free memory (CUDA: the driver's; CPU: the machine's
        available RAM) holds beside the loaded weights, after the encoders' and a prefill chunk's reserves; at most
        `most`, at least 1 (a model that leaves no room at all still serves one row, as an unbatched one would)."""
        if self.device.type == "cuda":
            total, free = memory.device_memory(self.device)
        else:
            total, free = memory.host_memory()
        try:
            plan = memory.plan_memory(self.cfg, self.dtype, memory.parameter_bytes(self.model), max(total, free),
                                      free, talker=self.model.talker is not None)
        except ValueError:  # no room beyond the reserves: one row, and the allocator will say if even that fails
            return 1
        return memory.rows_that_fit(plan, max_len, most)

    def disable_batching(self) -> None:
        """New calls run on schedulers of their own again (streams already on the shared one finish there)."""
        self._scheduler = None

    @property
    def scheduler(self) -> Scheduler | None:
        """The persistent scheduler (enable_batching), or None."""
        return self._scheduler

    @property
    def batching(self) -> ThinkerBatch | None:
        return self._scheduler.shared if self._scheduler is not None else None

    @property
    def talker_batching(self) -> TalkerBatch | None:
        speaker = self._scheduler.speaker if self._scheduler is not None else None
        return speaker.batch if speaker is not None else None

    def submit(self, request: GenerationRequest, sink, prompt: PreparedPrompt | None = None):
        """Adds a request to the persistent scheduler (thread-safe): its events go to `sink` as the scheduler makes
        them, on the thread that runs `iterate`. Returns the stream (its `cancel()` is safe from any thread).
        `prompt`: the request's prepared prompt, when the caller prepared it elsewhere (off the engine's thread)."""
        if self._scheduler is None:
            raise RuntimeError("submit needs the persistent scheduler: call enable_batching first")
        if prompt is None:
            prompt = self.prepare(request.messages, request.use_audio_in_video, request.tools, request.template)
        self._check(request, prompt)
        return self._scheduler.submit(self._spec(request, prompt, sink))

    def iterate(self) -> bool:
        """One iteration of the persistent scheduler's loop (see engine/scheduler.py); False when idle."""
        return self._scheduler.iterate()

    @property
    def busy(self) -> bool:
        return self._scheduler is not None and self._scheduler.busy

    # ------------------------------------------------------------------------------------------------------------
    # Prompts

    def prepare(self, messages: list, use_audio_in_video: bool = False, tools: list | None = None,
                template: TemplateOptions = TemplateOptions()) -> PreparedPrompt:
        """Messages (text, image, audio, video parts) -> token ids with placeholders expanded, and the media;
        rendered by the checkpoint's chat template when it ships one (`template`: its options)."""
        return prepare_prompt(messages, self.tokenizer, self.cfg.thinker, self.media, self.chat_template,
                              use_audio_in_video, tools, template)

    def encode_prompt(self, messages: list, use_audio_in_video: bool = False, tools: list | None = None,
                      template: TemplateOptions = TemplateOptions()) -> list[int]:
        return self.prepare(messages, use_audio_in_video, tools, template).token_ids

    @property
    def default_voice(self) -> str:
        names = self.voices
        return DEFAULT_VOICE if DEFAULT_VOICE in names else (names[0] if names else DEFAULT_VOICE)

    @property
    def sample_rate(self) -> int:
        """Of the speech this model makes (24 kHz for both families)."""
        return self.cfg.code2wav.sample_rate if self.cfg.code2wav is not None else DEFAULT_SAMPLE_RATE

    @property
    def voices(self) -> list[str]:
        return [name for name, _ in self.cfg.talker.speakers] if self.cfg.talker else []

    def request(self, messages, **keywords) -> GenerationRequest:
        """The keyword form of generate / stream as a GenerationRequest (speech by default when the talker is
        loaded; `return_audio=False` for text only)."""
        return request_from_keywords(messages, speaks_by_default=self.model.talker is not None, **keywords)

    # ------------------------------------------------------------------------------------------------------------
    # Generation

    def generate(self, messages: list | GenerationRequest | list[GenerationRequest],
                 **keywords) -> GenerationResult | list[GenerationResult]:
        """One conversation (or GenerationRequest) -> GenerationResult; a list of them -> a list, decoded together.

        Keywords: the thinker's sampling (max_new_tokens, do_sample, temperature, top_k, top_p,
        repetition_penalty, seed, stop_token_ids), the talker's (talker_do_sample, ..., talker_max_new_tokens, or a
        `talker` dict), return_audio (default: whenever the talker is loaded), voice, audio_chunk_frames, tools,
        use_audio_in_video, and the chat template's enable_thinking and chat_template_kwargs. With `tools`,
        `<tool_call>` blocks in the reply are parsed into `.tool_calls`."""
        batched = isinstance(messages, list) and bool(messages) and (
            isinstance(messages[0], GenerationRequest) or isinstance(messages[0], list))
        items = messages if batched else [messages]
        requests = [m if isinstance(m, GenerationRequest) else self.request(m, **keywords) for m in items]
        prompts = [self.prepare(r.messages, r.use_audio_in_video, r.tools, r.template) for r in requests]
        for request, prompt in zip(requests, prompts):
            self._check(request, prompt)
        scheduler = self._scheduler or self._scheduler_for(requests, prompts)
        outcomes: list[list[Event]] = [[] for _ in requests]
        streams = [scheduler.submit(self._spec(r, p, outcomes[i].append))
                   for i, (r, p) in enumerate(zip(requests, prompts))]
        try:
            while not all(_ended(events) for events in outcomes):
                scheduler.iterate()
        finally:
            for stream in streams:
                stream.cancel()
            scheduler.drop_cancelled()
        results = [_outcome(events) for events in outcomes]
        return results if batched else results[0]

    def stream(self, messages: list | GenerationRequest, **keywords) -> Iterator[Event]:
        """Yields Started, TextDelta events as text arrives (never a broken UTF-8 character), AudioChunk events as
        speech is synthesised (from the first codec frame on, while the text is still being written), then Done.
        A failure raises (errors.InputError for the request's own). Closing the iterator early stops the work and
        frees its caches. Keywords as for `generate`."""
        request = messages if isinstance(messages, GenerationRequest) else self.request(messages, **keywords)
        prompt = self.prepare(request.messages, request.use_audio_in_video, request.tools, request.template)
        self._check(request, prompt)
        scheduler = self._scheduler or self._scheduler_for([request], [prompt])
        events: deque[Event] = deque()
        stream = scheduler.submit(self._spec(request, prompt, events.append))
        return _follow(scheduler, stream, events)

    def stream_text(self, messages: list, **keywords) -> Iterator[Event]:
        """`stream` without audio."""
        return self.stream(messages, return_audio=False, **keywords)

    def _check(self, request: GenerationRequest, prompt: PreparedPrompt) -> None:
        """Before any scheduler or cache is sized for it: options typed and in range, prompt + budget in context."""
        check_request(request, len(prompt.token_ids), self.max_model_len, self._sampling_budget(request))

    def _spec(self, request: GenerationRequest, prompt: PreparedPrompt, sink):
        return stream_spec(self.cfg, self.tokenizer, request, prompt, self.model.talker is not None,
                           self.default_voice, sink)

    def _scheduler_for(self, requests: list[GenerationRequest], prompts: list[PreparedPrompt]) -> Scheduler:
        """A scheduler for one call: several text conversations share rows sized for the longest; a single one
        (or speech) runs in rows of its own, and the talker in private sessions (captured on a GPU)."""
        text_only = all(r.speech is None for r in requests)
        if len(requests) > 1 and text_only:
            budget = max(self._sampling_budget(r) for r in requests)
            longest = max(len(p.token_ids) for p in prompts)
            options = SchedulerOptions(rows=len(requests), max_len=longest + budget)
        else:
            options = SchedulerOptions(rows=0, talker_rows=0)
        return Scheduler(self.model, self.cfg, options, self.private_rows)

    def _sampling_budget(self, request: GenerationRequest) -> int:
        given = request.sampling.max_new_tokens
        return self.cfg.thinker_sampling.max_new_tokens if given is None else given


def _follow(scheduler: Scheduler, stream, events: deque) -> Iterator[Event]:
    try:
        while True:
            while not events:
                if not scheduler.iterate() and not events:
                    raise RuntimeError(f"stream {stream.id} ended without Done")
            event = events.popleft()
            if isinstance(event, Failed):
                raise event.error
            yield event
            if isinstance(event, Done):
                return
    finally:
        stream.cancel()
        scheduler.drop_cancelled()  # its rows are free for the next stream at once


def _ended(events: list[Event]) -> bool:
    return bool(events) and isinstance(events[-1], (Done, Failed))


def _outcome(events: list[Event]) -> GenerationResult:
    last = events[-1]
    if isinstance(last, Failed):
        raise last.error
    return last.result
