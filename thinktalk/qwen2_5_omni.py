"""`Omni` for Qwen2.5-Omni checkpoints (model_type "qwen2_5_omni"): the same object, methods and events as for
Qwen3-Omni, with this family's pieces behind them. `Omni.from_pretrained` returns one when config.json says so.

    what differs            Qwen3-Omni (omni.py)                    Qwen2.5-Omni (here)
    prompt                  processing/multimodal.build_prompt      processing/qwen2_5_prompt.build_qwen2_5_prompt
    step loop               engine/scheduler.Scheduler (batched)    engine/qwen2_5_scheduler.Qwen25Scheduler
    speech                  talker + code predictor + Code2Wav      talker + streaming Token2Wav (DiT + BigVGAN)
    voices                  config.json's speaker ids               the checkpoint's spk_dict.pt (Chelsie, Ethan)

A spoken request without a system message is given the talker's system prompt (processing/qwen2_5_prompt.py).
Speech budgets in seconds (SpeechParams.max_seconds) become codec tokens at 50 a second; `talker_max_new_tokens`
counts this family's codec tokens, as the reference's does (Qwen3-Omni's counts its 12.5-a-second frames).
What does not apply to this family yet (engine/qwen2_5_scheduler.py): batching of several streams, chunked
prefill, the prefix cache, compiled / captured steps, quantized weights; each is a RequestError where asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from pathlib import Path

import torch

from .config import SamplingConfig
from .config_qwen2_5 import Qwen25OmniConfig, load_qwen2_5_config
from .engine.qwen2_5_scheduler import Qwen25Scheduler, Qwen25StreamSpec, reply_result
from .engine.qwen2_5_speech import Qwen25SpeechPlan, codes_per_second
from .engine.thinker_batch import DEFAULT_MAX_LEN
from .errors import RequestError
from .events import Event
from .models.qwen2_5.omni import SPEECH_PREFIXES, Qwen25OmniModel
from .models.qwen2_5.voices import DEFAULT_VOICE, VoiceBank, VoiceError, load_voices
from .omni import DEFAULT_SAMPLE_RATE, Omni, _pick_device_and_dtype
from .processing.chat_template import TemplateOptions
from .processing.multimodal import PreparedPrompt
from .processing.qwen2_5_prompt import build_qwen2_5_prompt, qwen2_5_media_options, with_speech_system_prompt
from .processing.tokenizer import IncrementalDetokenizer, Tokenizer
from .processing.tools import parse_tool_calls
from .requests import GenerationRequest, SpeechParams, resolve_sampling
from .weights import load_weights, materialize

log = logging.getLogger("thinktalk")
NOT_YET = "does not apply to Qwen2.5-Omni checkpoints yet (their streams interleave but share no steps)"
TOKEN2WAV_DTYPE = torch.float32  # the DiT's ODE and the vocoder, as the reference computes them
CONCURRENT_STREAMS = 4  # the persistent scheduler's streams at once when not told (each has caches of its own)
TALKER_OPTIONS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
SEED_RANGE = 2**63  # a fresh noise seed when the request gives none


class Qwen25Omni(Omni):
    family = "Qwen2.5-Omni"

    def __init__(self, cfg: Qwen25OmniConfig, model: Qwen25OmniModel, tokenizer: Tokenizer, path: Path, media,
                 voices: VoiceBank | VoiceError | None):
        super().__init__(cfg, model, tokenizer, path, media)
        self._voices = voices  # the bank, the error reading it (raised when speech is asked for), or None

    @classmethod
    def load(cls, directory: Path, device=None, dtype=None, audio_output: bool | None = None,
             show_progress: bool | None = None, allow_remote_media: bool = False, quantize=None) -> "Qwen25Omni":
        cfg = load_qwen2_5_config(directory)
        if quantize is not None:
            raise RequestError(f"quantize={quantize!r}: quantization {NOT_YET}", param="quantize")
        device, dtype = _pick_device_and_dtype(device, dtype)
        if audio_output is None:
            audio_output = cfg.has_audio_output
        if audio_output and not cfg.has_audio_output:
            raise RequestError(f"{directory}: audio output was requested but this checkpoint has no talker and "
                               "token2wav (enable_audio_output is false or their sections are absent)")
        voices: VoiceBank | VoiceError | None = None
        if audio_output:
            try:
                voices = load_voices(directory, cfg.token2wav.dit)
            except VoiceError as error:  # text still works; speech raises it (Qwen25Omni.speech_plan)
                voices = error
        tokenizer = Tokenizer.from_dir(directory)
        with torch.device("meta"):
            model = Qwen25OmniModel(cfg, audio_output=audio_output)
        model = materialize(model, device, dtype).eval()
        if model.token2wav is not None:  # the reference runs Token2Wav in float32 whatever the model's dtype
            model.token2wav.to(TOKEN2WAV_DTYPE)  # still empty: load_weights casts each tensor to its target's dtype
        load_weights(model, directory, device, dtype, skip_prefixes=() if audio_output else SPEECH_PREFIXES,
                     show_progress=show_progress)
        return cls(cfg, model, tokenizer, directory, qwen2_5_media_options(directory, allow_remote_media), voices)

    # -- what the family changes ---------------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self.cfg.token2wav.sample_rate if self.cfg.token2wav is not None else DEFAULT_SAMPLE_RATE

    @property
    def voices(self) -> list[str]:
        return [name.lower() for name in self._voices.names] if isinstance(self._voices, VoiceBank) else []

    @property
    def default_voice(self) -> str:
        return DEFAULT_VOICE.lower() if DEFAULT_VOICE.lower() in self.voices else (self.voices or [""])[0]

    def prepare(self, messages: list, use_audio_in_video: bool = False, tools: list | None = None,
                template: TemplateOptions = TemplateOptions()) -> PreparedPrompt:
        """The built-in ChatML layout with this family's placeholders (a checkpoint's Jinja template is not used
        for Qwen2.5-Omni yet, so no template variables apply)."""
        if variables := sorted(template.template_variables()):
            raise RequestError(f"chat template options {variables}: Qwen2.5-Omni prompts use the built-in ChatML "
                               "layout, which takes none", param="chat_template_kwargs")
        return build_qwen2_5_prompt(messages, self.tokenizer, self.cfg.thinker, self.media, use_audio_in_video, tools)

    def request(self, messages, **keywords) -> GenerationRequest:
        """As Omni.request; `talker_max_new_tokens` (or the `talker` dict's max_new_tokens) counts this family's
        codec tokens (50 a second), as the reference's talker_max_new_tokens does."""
        talker = dict(keywords.pop("talker", None) or {})
        budget = keywords.pop("talker_max_new_tokens", None)
        budget = talker.pop("max_new_tokens", None) if budget is None else budget
        request = super().request(messages, talker=talker, **keywords)
        if budget is not None and request.speech is not None:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise RequestError(f"talker max_new_tokens must be an integer >= 1, got {budget!r}",
                                   param="talker_max_new_tokens")
            seconds = budget / codes_per_second(self.cfg) if self.cfg.token2wav is not None else None
            request = dataclasses.replace(request, speech=dataclasses.replace(request.speech, max_seconds=seconds))
        spoken = with_speech_system_prompt(request.messages, request.speech is not None)
        return dataclasses.replace(request, messages=spoken)

    def enable_batching(self, rows: int, max_len: int = DEFAULT_MAX_LEN, compile: bool = False, **options):
        raise RequestError(f"enable_batching(rows={rows}): batching {NOT_YET}; use enable_scheduler()",
                           param="rows")

    def enable_scheduler(self, rows: int = 0, max_len: int | None = DEFAULT_MAX_LEN, compile: bool = False,
                         talker_max_len: int | None = None, prefix_cache_bytes: int = 0, prefill_chunk=None) -> None:
        """The persistent scheduler (the server's): `rows` streams (0: CONCURRENT_STREAMS) interleave, each on caches
        of its own; max_len, talker_max_len and prefill_chunk do not apply."""
        if compile:
            raise RequestError(f"compile=True: compiled steps {NOT_YET}", param="compile")
        if prefix_cache_bytes:
            log.warning("Qwen2.5-Omni: the prefix cache (%d bytes) %s", prefix_cache_bytes, NOT_YET)
        self._scheduler = Qwen25Scheduler(self.model, self.cfg, rows or CONCURRENT_STREAMS)

    def planned_max_len(self, rows: int) -> int:
        return DEFAULT_MAX_LEN

    def planned_rows(self, max_len: int, most: int = CONCURRENT_STREAMS) -> int:
        return min(most, CONCURRENT_STREAMS)

    def _scheduler_for(self, requests, prompts) -> Qwen25Scheduler:
        return Qwen25Scheduler(self.model, self.cfg, len(requests))

    def _spec(self, request: GenerationRequest, prompt: PreparedPrompt, sink: Callable[[Event], None]):
        cfg, tokenizer = self.cfg, self.tokenizer
        sampling = resolve_sampling(cfg, request.sampling)
        stops = frozenset(request.sampling.stop_token_ids or cfg.stop_token_ids)
        speech = None if request.speech is None else self.speech_plan(request.speech, request.sampling.seed)
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)

        def detokenize(token: int, final: bool) -> str:
            piece = "" if token in stops or token >= tokenizer.vocab_size else detok.push(token)
            return piece + detok.flush() if final else piece

        def result(stream):
            out = reply_result(stream, lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                               tokenizer.vocab_size, self.sample_rate)
            if request.tools:
                text, calls = parse_tool_calls(out.text)
                out = dataclasses.replace(out, text=text, tool_calls=tuple(calls))
            return out

        return Qwen25StreamSpec(prompt, sampling, request.sampling.seed, stops, speech, detokenize, result, sink)

    def speech_plan(self, speech: SpeechParams, seed: int | None) -> Qwen25SpeechPlan:
        """SpeechParams against this checkpoint: its voice, the talker's sampling and budget, the noise seed."""
        if self.model.talker is None:
            reason = "it was loaded with audio_output=False" if self.cfg.has_audio_output else \
                "this checkpoint has no talker (a thinker-only model)"
            raise RequestError(f"audio output was requested but {reason}")
        if isinstance(self._voices, VoiceError):
            raise RequestError(f"audio output was requested but {self._voices}", param="voice")
        try:
            voice = self._voices.get(speech.voice or self.default_voice)
        except VoiceError as error:
            raise RequestError(str(error), param="voice") from None
        sampling = _talker_sampling(self.cfg.talker_sampling, speech)
        codes = sampling.max_new_tokens
        if speech.max_seconds is not None:
            if isinstance(speech.max_seconds, bool) or not isinstance(speech.max_seconds, (int, float)) \
                    or speech.max_seconds <= 0:
                raise RequestError(f"speech max_seconds must be a positive number, got {speech.max_seconds!r}",
                                   param="max_seconds")
            codes = min(codes, max(1, round(speech.max_seconds * codes_per_second(self.cfg))))
        noise_seed = seed if seed is not None else random.randrange(SEED_RANGE)
        return Qwen25SpeechPlan(voice, sampling, codes, speech.max_seconds is None, seed, noise_seed)


def _talker_sampling(checkpoint: SamplingConfig, speech: SpeechParams) -> SamplingConfig:
    given = {name: getattr(speech, name) for name in TALKER_OPTIONS if getattr(speech, name) is not None}
    if "top_k" in given and (isinstance(given["top_k"], bool) or not isinstance(given["top_k"], int)):
        raise RequestError(f"speech top_k must be an integer, got {given['top_k']!r}", param="top_k")
    try:
        return dataclasses.replace(checkpoint, **given)
    except ValueError as error:
        raise RequestError(f"speech: {error}") from None


def describe_checkpoint(path: Path) -> list[str]:
    """`thinktalk info` for a Qwen2.5-Omni checkpoint: family, sizes, voices."""
    cfg = load_qwen2_5_config(path)
    text = cfg.thinker.text
    lines = [f"checkpoint:  {path}", "family:      Qwen2.5-Omni (qwen2_5_omni)",
             "variant:     " + ("text and speech out" if cfg.has_audio_output else "thinker only (text out)"),
             f"thinker:     {text.num_layers} layers, hidden {text.hidden_size}, vocab {text.vocab_size}"]
    if cfg.has_audio_output:
        lines.append(f"talker:      {cfg.talker.text.num_layers} layers, hidden {cfg.talker.text.hidden_size}; "
                     f"token2wav: DiT {cfg.token2wav.dit.num_layers} layers, BigVGAN to {cfg.token2wav.sample_rate} Hz")
        try:
            lines.append(f"voices:      {', '.join(n.lower() for n in load_voices(path, cfg.token2wav.dit).names)}")
        except VoiceError as error:
            lines.append(f"voices:      none ({error})")
    with torch.device("meta"):
        model = Qwen25OmniModel(cfg, audio_output=cfg.has_audio_output)
    count = sum(p.numel() for p in model.parameters())
    lines.append(f"parameters:  {count / 1e9:.2f} B" if count >= 1e8 else f"parameters:  {count / 1e6:.1f} M")
    return lines
