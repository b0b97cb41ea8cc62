"""POST /v1/audio/transcriptions: a chat request holding the audio and Qwen's ASR instruction, text only, greedy.

The instructions are those of the Qwen3-Omni technical report's evaluation notes (audio first, the instruction
after it, no system prompt): Chinese speech "请将这段中文语音转换为纯文本。", any other language "Transcribe the
audio into text."
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ..requests import GenerationRequest, SamplingParams
from .chat import StreamSettings, require_model
from .completions import Reply, complete, job_events, prefetched, submit
from .errors import bad_request
from .media import checked_audio
from .schemas import Transcription, VerboseTranscription

ASR_INSTRUCTION_ZH = "请将这段中文语音转换为纯文本。"
ASR_INSTRUCTION = "Transcribe the audio into text."


def asr_messages(samples, rate: int, language: str | None, prompt: str | None) -> list[dict]:
    chinese = (language or "").lower() in ("zh", "zh-cn", "zh-tw", "chinese", "cmn", "yue")
    parts = [{"type": "text", "text": prompt}] if prompt else []
    parts += [{"type": "audio", "audio": (samples, rate)},
              {"type": "text", "text": ASR_INSTRUCTION_ZH if chinese else ASR_INSTRUCTION}]
    return [{"role": "user", "content": parts}]


def add_transcription_route(app: FastAPI, state, responses: dict) -> None:
    @app.post("/v1/audio/transcriptions", responses=responses,
              response_model=Transcription | VerboseTranscription)
    async def transcriptions(request: Request, file: UploadFile = File(...), model: str = Form(...),
                             language: str | None = Form(None, max_length=32),
                             prompt: str | None = Form(None, max_length=4096),
                             response_format: Literal["json", "text", "verbose_json"] = Form("json"),
                             temperature: float | None = Form(None, ge=0, le=1)):
        require_model(model, state.served_name)
        limits = state.limits
        data = await file.read(limits.max_media_bytes + 1)
        if len(data) > limits.max_media_bytes:
            raise bad_request(f"file: over the limit of {limits.max_media_bytes} bytes (max_media_bytes)",
                              param="file", code="media_too_large")
        if not data:
            raise bad_request("file: the upload is empty", param="file", code="invalid_audio")
        samples, rate = await run_in_threadpool(checked_audio, data, "file", limits)
        sampling = SamplingParams(max_new_tokens=limits.default_max_tokens, do_sample=bool(temperature),
                                  temperature=temperature or None)
        settings = StreamSettings(GenerationRequest([], sampling), audio_format="wav", stops=(), tools_offered=False)
        job = await submit(state.worker, state.omni, asr_messages(samples, rate, language, prompt), settings, limits)
        events = await prefetched(job_events(job, request))
        reply = await complete(events, Reply(settings, 24000), state.served_name)
        text = reply.choices[0].message.content or ""
        if response_format == "text":
            return PlainTextResponse(text)
        if response_format == "verbose_json":
            return VerboseTranscription(language=language or "unknown", duration=samples.size / rate, text=text)
        return Transcription(text=text)
