"""The public entry point: `Omni.from_pretrained(path)` and `Omni.generate(messages, ...)`.

    messages --prompt--> ChatML text --tokenizer--> ids --ThinkerRunner (prefill, decode steps)--> ids --> text
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import OmniConfig, SamplingConfig, load_config
from .engine.decode_batch import SharedDecodeBatch, check_batching
from .engine.talker_batch import SharedTalkerBatch
from .engine.sampler import Sampler
from .engine.multimodal_inputs import multimodal_prefill_inputs
from .engine.pipeline import AudioChunk, ReplyTrace, SpeechOptions, TextDelta, stream_reply
from .engine.thinker_runner import ThinkerRunner, generate_tokens
from .models.omni import OmniModel
from .processing.audio import AudioFeatureConfig
from .processing.multimodal import MediaOptions, PreparedPrompt, build_prompt
from .processing.tokenizer import IncrementalDetokenizer, Tokenizer
from .processing.tools import ToolCall, parse_tool_calls
from .processing.vision import VisionProcessorConfig
from .quant import Quantization, QuantizeOnLoad, quantization_for
from .weights import load_weights, materialize

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "Qwen/Qwen3-Omni-30B-A3B-Instruct"
DEFAULT_VOICE = "ethan"  # the reference's default speaker
SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # the reply's tokens, prompt excluded, stop token included when one was produced
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()  # parsed from <tool_call> blocks when tools were offered (text is the rest)
    audio: np.ndarray | None = None  # float32 mono waveform of the spoken reply, when audio was asked for
    sample_rate: int | None = None
    codes: torch.Tensor | None = None  # (groups, frames) the codec codes the talker produced


@dataclass(frozen=True)
class Done:
    result: GenerationResult


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
                 quantization: Quantization | None = None):
        self.cfg, self.model, self.tokenizer, self.path, self.media = cfg, model, tokenizer, path, media
        self.quantization = quantization  # how the weights are quantized (None: floats)
        embeddings = model.thinker.model.embed_tokens.weight  # never quantized: the model's device and dtype
        self.device, self.dtype = embeddings.device, embeddings.dtype
        self._batching: SharedDecodeBatch | None = None
        self._talker_batching: SharedTalkerBatch | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None, audio_output: bool | None = None,
                        show_progress: bool | None = None, allow_remote_media: bool = False,
                        quantize: str | QuantizeOnLoad | None = None) -> "Omni":
        """`allow_remote_media`: fetch http(s) media URLs found in messages (off by default).
        `quantize`: "int8", "int4" or "fp8" (or a QuantizeOnLoad, which also says which modules) quantizes a float
        checkpoint tensor by tensor as it loads. A quantized checkpoint (FP8, compressed-tensors, GPTQ, AutoRound)
        is recognised from its config and loads in its own form, without this."""
        directory = resolve_checkpoint(path)
        cfg = load_config(directory)
        quantization = quantization_for(cfg, directory / "config.json", quantize)
        device, dtype = _pick_device_and_dtype(device, dtype, quantized=quantization is not None)
        if audio_output is None:
            audio_output = cfg.has_audio_output
        tokenizer = Tokenizer.from_dir(directory)
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
        return cls(cfg, model, tokenizer, directory, media, quantization)

    # ------------------------------------------------------------------------------------------------------------
    # Continuous batching

    def enable_batching(self, rows: int, max_len: int, compile: bool = False,
                        talker_max_len: int | None = None) -> SharedDecodeBatch:
        """From now on, streams (`stream`, spoken `generate`) decode in rows of one shared (rows, max_len) batch:
        concurrent streams advanced by one thread (as the server's worker does) share each decode step. A stream
        that finds no free row, or whose prompt + max_new_tokens exceeds max_len, runs alone; the tokens are the
        same either way. compile=True compiles the shared step once (see ThinkerRunner).
        With a talker, spoken replies likewise share its steps and code-predictor passes in `rows` rows of
        `talker_max_len` slots (talker prompt + frame budget; default max_len + the checkpoint's talker budget)."""
        check_batching(rows, max_len)
        if self.model.talker is not None:
            talker_len = max_len + self.cfg.talker_sampling.max_new_tokens if talker_max_len is None else talker_max_len
            self._talker_batching = SharedTalkerBatch(self.model.talker, self.cfg, rows, talker_len)
        self._batching = SharedDecodeBatch(self.model.thinker, rows, max_len, compile)
        return self._batching

    def disable_batching(self) -> None:
        """New streams run alone again (streams holding rows keep them until they end)."""
        self._batching = None
        self._talker_batching = None

    @property
    def batching(self) -> SharedDecodeBatch | None:
        return self._batching

    @property
    def talker_batching(self) -> SharedTalkerBatch | None:
        return self._talker_batching

    # ------------------------------------------------------------------------------------------------------------
    # Text generation

    def sampling(self, *, max_new_tokens=None, do_sample=None, temperature=None, top_k=None, top_p=None,
                 repetition_penalty=None) -> SamplingConfig:
        """The checkpoint's defaults overridden by whatever the caller set."""
        given = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                     top_p=top_p, repetition_penalty=repetition_penalty)
        return dataclasses.replace(self.cfg.thinker_sampling, **{k: v for k, v in given.items() if v is not None})

    def prepare(self, messages: list, use_audio_in_video: bool = False, tools: list | None = None) -> PreparedPrompt:
        """Messages (text, image, audio, video parts) -> token ids with placeholders expanded, and the media."""
        return build_prompt(messages, self.tokenizer, self.cfg.thinker, self.media, use_audio_in_video, tools=tools)

    def encode_prompt(self, messages: list, use_audio_in_video: bool = False, tools: list | None = None) -> list[int]:
        return self.prepare(messages, use_audio_in_video, tools).token_ids

    def generate(self, messages: list, *, seed: int | None = None, stop_token_ids: list[int] | None = None,
                 use_audio_in_video: bool = False, tools: list | None = None, return_audio: bool | None = None,
                 voice: str | None = None, audio_chunk_frames: int = 1, talker_do_sample: bool | None = None,
                 talker_temperature: float | None = None, talker_top_k: int | None = None,
                 talker_top_p: float | None = None, talker_repetition_penalty: float | None = None,
                 talker_max_new_tokens: int | None = None,
                 **sampling) -> GenerationResult | list[GenerationResult]:
        """One conversation -> GenerationResult; a list of conversations -> a list.

        Text-only batches are decoded together. With `return_audio` (default: whenever the talker is loaded) the
        result also holds `.audio` (float32, `.sample_rate` Hz); conversations are then spoken one after another.
        With `tools` (JSON function definitions), `<tool_call>` blocks in the reply are parsed into `.tool_calls`.
        """
        batched = isinstance(messages, list) and bool(messages) and isinstance(messages[0], list)
        conversations = messages if batched else [messages]
        talker = dict(do_sample=talker_do_sample, temperature=talker_temperature, top_k=talker_top_k,
                      top_p=talker_top_p, repetition_penalty=talker_repetition_penalty,
                      max_new_tokens=talker_max_new_tokens)
        speech = self.speech_options(return_audio, voice, audio_chunk_frames, seed, talker)
        if speech is not None:
            results = []
            for conversation in conversations:
                *_, done = self._stream(self.prepare(conversation, use_audio_in_video, tools), seed,
                                        stop_token_ids, speech, tools, self.sampling(**sampling))
                results.append(done.result)
            return results if batched else results[0]
        prompts = [self.prepare(conversation, use_audio_in_video, tools) for conversation in conversations]
        results = self._generate_ids(prompts, self.sampling(**sampling), seed, stop_token_ids)
        if tools:
            results = [self._with_tool_calls(r) for r in results]
        return results if batched else results[0]

    def speech_options(self, return_audio: bool | None, voice: str | None, chunk_frames: int, seed: int | None,
                       talker: dict) -> SpeechOptions | None:
        """None for text only; else the voice's codec id and the talker's sampling (checkpoint defaults + given)."""
        if return_audio is None:
            return_audio = self.model.talker is not None
        if not return_audio:
            return None
        if self.model.talker is None:
            reason = ("this checkpoint has no talker (a thinker-only model)" if not self.cfg.has_audio_output
                      else "it was loaded with audio_output=False")
            raise ValueError(f"audio output was requested but {reason}")
        if chunk_frames < 1:
            raise ValueError(f"audio_chunk_frames must be at least 1, got {chunk_frames}")
        speaker = self.cfg.talker.speaker_id(voice or self.default_voice)
        known = {f.name for f in dataclasses.fields(SamplingConfig)}
        if unknown := sorted(set(talker) - known):
            raise ValueError(f"unknown talker sampling option(s) {unknown}; known: {sorted(known)}")
        given = {k: v for k, v in talker.items() if v is not None}
        return SpeechOptions(speaker, dataclasses.replace(self.cfg.talker_sampling, **given), chunk_frames, seed)

    @property
    def default_voice(self) -> str:
        names = [name for name, _ in self.cfg.talker.speakers] if self.cfg.talker else []
        return DEFAULT_VOICE if DEFAULT_VOICE in names else (names[0] if names else DEFAULT_VOICE)

    @property
    def voices(self) -> list[str]:
        return [name for name, _ in self.cfg.talker.speakers] if self.cfg.talker else []

    @staticmethod
    def _with_tool_calls(result: GenerationResult) -> GenerationResult:
        text, calls = parse_tool_calls(result.text)
        return dataclasses.replace(result, text=text, tool_calls=tuple(calls))

    def stream(self, messages: list, *, seed: int | None = None, stop_token_ids: list[int] | None = None,
               use_audio_in_video: bool = False, tools: list | None = None, return_audio: bool | None = None,
               voice: str | None = None, audio_chunk_frames: int = 1, talker: dict | None = None,
               talker_do_sample: bool | None = None, talker_temperature: float | None = None,
               talker_top_k: int | None = None, talker_top_p: float | None = None,
               talker_repetition_penalty: float | None = None, talker_max_new_tokens: int | None = None,
               **sampling) -> Iterator[TextDelta | AudioChunk | Done]:
        """Yields TextDelta events as text arrives (never a broken UTF-8 character), AudioChunk events as speech is
        synthesised (from the first codec frame on, while the text is still being written), then Done.
        The talker's sampling: the talker_* keywords, as in `generate`, or the same as a dict `talker`
        ({"do_sample": False, "max_new_tokens": 100}). Closing the iterator early stops the work and frees its
        caches."""
        named = dict(do_sample=talker_do_sample, temperature=talker_temperature, top_k=talker_top_k,
                     top_p=talker_top_p, repetition_penalty=talker_repetition_penalty,
                     max_new_tokens=talker_max_new_tokens)
        given = {k: v for k, v in named.items() if v is not None}
        speech = self.speech_options(return_audio, voice, audio_chunk_frames, seed, {**(talker or {}), **given})
        prompt = self.prepare(messages, use_audio_in_video, tools)
        return self._stream(prompt, seed, stop_token_ids, speech, tools, self.sampling(**sampling))

    def stream_text(self, messages: list, **kwargs) -> Iterator[TextDelta | Done]:
        """`stream` without audio."""
        return self.stream(messages, return_audio=False, **kwargs)

    def _stream(self, prompt: PreparedPrompt, seed, stop_token_ids, speech: SpeechOptions | None, tools,
                params: SamplingConfig) -> Iterator[TextDelta | AudioChunk | Done]:
        stops = set(stop_token_ids or self.cfg.stop_token_ids)
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)

        def detokenize(token: int, final: bool) -> str:
            # Ids past the tokenizer (the model's vocabulary is padded) and stop ids carry no text.
            piece = "" if token in stops or token >= self.tokenizer.vocab_size else detok.push(token)
            return piece + detok.flush() if final else piece

        trace = ReplyTrace()
        yield from stream_reply(self.model, self.cfg, prompt, params, seed, stops, speech, detokenize, trace,
                                self._batching, self._talker_batching)
        result = self._result(prompt, trace.token_ids, stops, params)
        if speech is not None:
            audio = np.concatenate(trace.audio) if trace.audio else np.zeros(0, dtype=np.float32)
            codes = torch.stack(trace.codes, dim=1) if trace.codes else None
            result = dataclasses.replace(result, audio=audio, sample_rate=self.cfg.code2wav.sample_rate, codes=codes)
        yield Done(self._with_tool_calls(result) if tools else result)

    def _steps(self, prompts: list[PreparedPrompt], params: SamplingConfig, seed: int | None, stops: set[int]):
        thinker = self.model.thinker
        longest = max(len(p.token_ids) for p in prompts)
        runner = ThinkerRunner(thinker, len(prompts), longest + params.max_new_tokens)
        with torch.inference_mode():
            inputs = multimodal_prefill_inputs(thinker, prompts)
        sampler = Sampler(params, len(prompts), thinker.cfg.text.vocab_size, self.device, seed=seed)
        return generate_tokens(runner, inputs, sampler, params.max_new_tokens, stops)

    def _generate_ids(self, prompts, params, seed, stop_token_ids) -> list[GenerationResult]:
        stops = set(stop_token_ids or self.cfg.stop_token_ids)
        replies: list[list[int]] = [[] for _ in prompts]
        for step in self._steps(prompts, params, seed, stops):
            for row, token in enumerate(step.tokens):
                if step.active[row]:
                    replies[row].append(token)
        return [self._result(p, r, stops, params) for p, r in zip(prompts, replies)]

    def _result(self, prompt: PreparedPrompt, reply: list[int], stops: set[int], params: SamplingConfig):
        stopped = bool(reply) and reply[-1] in stops
        text_ids = [t for t in (reply[:-1] if stopped else reply) if t < self.tokenizer.vocab_size]
        return GenerationResult(
            text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
            token_ids=reply,
            finish_reason="stop" if stopped else "length",
            usage=Usage(len(prompt.token_ids), len(reply)),
        )
