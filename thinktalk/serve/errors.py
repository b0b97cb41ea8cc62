"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}. Nothing else reaches a client."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ..errors import InputError, MediaError
from ..limits import ContextLengthError
from ..processing.audio import AudioTooLong


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error a request handler reports to the client with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        error = ErrorBody(message=self.message, type=ERROR_TYPES.get(self.status, "invalid_request_error"),
                          param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def input_param(error: InputError) -> str | None:
    """The request field an input error is about: the message part it came from (`messages[0].content[1]`, as the
    prompt builder stamped it), else the option it names."""
    if error.location is not None:
        message, part = error.location
        return f"messages[{message}]" + ("" if part is None else f".content[{part}]")
    return error.param


def input_error(error: InputError) -> APIError:
    """An engine-side input error (omni.prepare, the request's options) as the client's 400."""
    if isinstance(error, ContextLengthError):
        code = "context_length_exceeded"  # OpenAI's code for it
    elif isinstance(error, AudioTooLong):
        code = "audio_too_long"
    elif isinstance(error, MediaError):
        code = "invalid_media"
    else:
        code = "invalid_request"
    return APIError(400, str(error)[:2000], param=input_param(error), code=code)


def request_fields(*models) -> frozenset[str]:
    """Every field name of these request models and the models nested in them."""
    names, seen, todo = set(), set(), list(models)
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(name)
            todo += [kind for kind in _nested_types(info.annotation) if isinstance(kind, type)
                     and issubclass(kind, BaseModel)]
    return frozenset(names)


def _nested_types(annotation) -> list:
    args = getattr(annotation, "__args__", None) or ()
    return [annotation] + [t for arg in args for t in _nested_types(arg)]


def field_path(loc: tuple, fields: frozenset[str]) -> str | None:
    """pydantic's error location -> the request field as a client writes it: ("body", "messages", 0, "content",
    "list[...]", 0, "image_url", "image_url", "url") -> "messages[0].content[0].image_url.url". Union branch labels
    are dropped (they are not field names) and a tagged union's tag, which repeats its field's name, is merged."""
    path: list[str] = []
    for part in loc:
        if isinstance(part, int):
            path.append(f"[{part}]")
        elif part in fields and (not path or path[-1] != f".{part}"):
            path.append(f".{part}")
    return "".join(path).lstrip(".") or None


def validation_error(problems: list[dict], fields: frozenset[str]) -> APIError:
    """A request that does not fit the schema: the most specific problem (the deepest field) named in `param`."""
    if not problems:
        return APIError(400, "invalid request", code="invalid_request")
    if any(problem.get("type") == "json_invalid" for problem in problems):
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    paths = [field_path(tuple(problem.get("loc", ())), fields | _unknown_field(problem)) for problem in problems]
    deepest = max(range(len(problems)), key=lambda i: len(paths[i] or ""))
    param = paths[deepest]
    reason = problems[deepest].get("msg", "invalid value")
    if _unknown_field(problems[deepest]):
        reason = "not a parameter this server supports"
    message = f"{param or 'request'}: {reason}"
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return APIError(400, (message + more)[:2000], param=param, code="invalid_request")


def _unknown_field(problem: dict) -> frozenset[str]:
    """The name of a field the schema does not have (pydantic's extra_forbidden), so that `param` can name it."""
    loc = tuple(problem.get("loc", ()))
    if problem.get("type") == "extra_forbidden" and loc and isinstance(loc[-1], str):
        return frozenset({loc[-1]})
    return frozenset()
