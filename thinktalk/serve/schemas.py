"""Typed request and response models of the OpenAI-compatible API, and the server's configurable limits.

Requests follow OpenAI's Chat Completions schema, plus thinktalk's extensions: content parts `audio_url` and
`video_url`, the request-level `use_audio_in_video`, and `audio.max_seconds` (a cap on the spoken reply's length);
and vLLM's `chat_template_kwargs` (variables for the checkpoint's chat template, e.g. {"enable_thinking": false}).
Validation is strict: JSON types are taken as they are (no bool for an integer, no string for a bool or a number;
an integer is a number).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..limits import SEED_LIMIT

AUDIO_FORMATS = ("wav", "pcm16", "flac", "mp3", "opus")
STREAM_AUDIO_FORMATS = ("pcm16", "wav")  # formats whose chunks can be sent as they are synthesised


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 64 * 2**20  # the whole HTTP request body (413 beyond)
    body_read_timeout_seconds: float = 30.0  # the longest wait for the next piece of a request body (408 beyond)
    max_media_bytes: int = 32 * 2**20  # one media item, decoded
    max_audio_seconds: float = 20 * 60.0  # one audio input (video sound tracks included)
    max_video_seconds: float = 20 * 60.0  # one video input, as its container declares it
    max_images: int = 16
    max_videos: int = 4
    max_audios: int = 16
    max_image_pixels: int = 64 * 2**20  # width * height before decoding (decompression bombs)
    max_tokens: int = 8192  # the most reply tokens a request may ask for
    max_model_len: int | None = None  # prompt + reply tokens of one request; None: the checkpoint's context
    default_max_tokens: int = 1024
    max_audio_output_seconds: float = 600.0
    max_text_chars: int = 1_000_000  # all text parts of a request together
    max_active: int | None = None  # requests in the scheduler at once; None: its batch rows
    max_queued: int = 32  # admitted requests waiting for a worker slot (429 beyond)
    retry_after_seconds: int = 1
    remote_timeout_seconds: float = 20.0

    def model_len(self, context: int) -> int:
        """Prompt + reply tokens one request may take on a model of `context` positions: max_model_len when set
        (it may lower the context, never raise it), else the context. ValueError names a bad setting."""
        length = context if self.max_model_len is None else self.max_model_len
        if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= context:
            raise ValueError(f"max_model_len must be an integer in [2, {context}] (the checkpoint's "
                             f"max_position_embeddings), got {self.max_model_len!r}")
        if self.default_max_tokens >= length:
            raise ValueError(f"default_max_tokens {self.default_max_tokens} leaves no room for a prompt in "
                             f"max_model_len {length}")
        return length


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class URLRef(_Model):
    url: str
    detail: str | None = None


class InputAudio(_Model):
    data: str  # base64
    format: str = "wav"


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: URLRef


class InputAudioPart(_Model):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURLPart(_Model):
    type: Literal["audio_url"]
    audio_url: URLRef


class VideoURLPart(_Model):
    type: Literal["video_url"]
    video_url: URLRef


ContentPart = Annotated[Union[TextPart, ImagePart, InputAudioPart, AudioURLPart, VideoURLPart],
                        Field(discriminator="type")]


class FunctionCall(_Model):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallModel(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallModel] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Model):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class AudioOptions(_Model):
    voice: str | None = None
    format: Literal["wav", "pcm16", "flac", "mp3", "opus"] = "wav"
    max_seconds: float | None = Field(default=None, gt=0)  # thinktalk extension


class StreamOptions(_Model):
    include_usage: bool = False


class JSONSchemaFormat(_Model):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(_Model):
    type: Literal["text"]


class JSONObjectFormat(_Model):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Model):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormatModel = Annotated[Union[TextFormat, JSONObjectFormat, JSONSchemaResponseFormat],
                                Field(discriminator="type")]


class ChatCompletionRequest(_Model):
    model_config = ConfigDict(extra="forbid", strict=True)  # an unknown field is a 400 naming it

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    n: int | None = Field(default=None, ge=1)  # more than 1: refused by name (UNSUPPORTED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormatModel | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Accepted with no effect on the reply: identifiers and cache hints for the service, not the model.
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    # OpenAI fields this server does not implement: a value other than the no-op default is a 400 naming the field
    # (chat.py, UNSUPPORTED), never silently dropped. Any field not declared here is refused by name too.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    use_audio_in_video: bool = False  # thinktalk extension
    chat_template_kwargs: dict[str, Any] | None = None  # the chat template's variables (vLLM's extension)


# ---------------------------------------------------------------------------------------------------------------
# Replies


class CompletionTokensDetails(_Model):
    audio_tokens: int = 0  # codec frames of the spoken reply
    text_tokens: int = 0


class UsageModel(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None


class ReplyAudio(_Model):
    id: str
    data: str
    expires_at: int
    transcript: str


class ReplyMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None
    audio: ReplyAudio | None = None
    tool_calls: list[ToolCallModel] | None = None


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobModel(_Model):
    token: str
    logprob: float  # the thinker's raw distribution (before penalty, grammar mask, temperature, top-k / top-p)
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Model):
    content: list[TokenLogprobModel] | None
    refusal: list[TokenLogprobModel] | None = None


class Choice(_Model):
    index: int = 0
    message: ReplyMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageModel


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "thinktalk"


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Transcription(_Model):
    text: str


class VerboseTranscription(_Model):
    task: Literal["transcribe"] = "transcribe"
    language: str
    duration: float
    text: str
    segments: list[dict[str, Any]] = Field(default_factory=list)


class Health(_Model):
    status: Literal["ok"] = "ok"
    model: str
    active_requests: int
    queued_requests: int
