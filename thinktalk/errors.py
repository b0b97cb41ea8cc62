"""Errors by origin. An `InputError` is the caller's to fix (a request, its media, a checkpoint, a config): it names
the problem, and the server answers it with a 4xx. Anything else raised inside thinktalk is a bug of the engine:
the server logs it with its traceback and answers 500, and the other streams go on.

    InputError (ValueError)
        RequestError      a request's fields or options (sampling, voice, lengths against the model's limits)
        MediaError        a media input that cannot be read or exceeds a limit
        PromptError       messages that do not form a prompt           (processing/prompt.py)
        ConfigError       a checkpoint's config.json / generation_config.json   (config_reader.py)
        CheckpointError   a checkpoint's weight files                  (weights.py; QuantizationError below it)

InputError derives from ValueError so that code written against ValueError keeps working.
"""

from __future__ import annotations


class InputError(ValueError):
    """Something the caller gave is wrong; the message names it.

    `param`: the option it is about, when it is one ("max_new_tokens", "seed"). `location`: (message index, part
    index or None) of the chat message part it came from, stamped by the prompt builder (`at`), so that the server
    can name the request field (`messages[0].content[1]`) without parsing messages."""

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.param = param
        self.location: tuple[int, int | None] | None = None

    def at(self, message: int, part: int | None = None) -> InputError:
        """Records where the input sits unless an inner caller already did; returns self (`raise error.at(i, j)`)."""
        if self.location is None:
            self.location = (message, part)
        return self


class Cancelled(Exception):
    """Work stopped because its request was cancelled (the client went away, the server is stopping): neither the
    caller's error nor the engine's. Raised between encoder groups (`should_stop`), caught by the scheduler."""


class RequestError(InputError):
    """A request's field or option is invalid, or asks for more than the model or server allows."""


class MediaError(InputError):
    """A media input (image, audio, video) cannot be read, or exceeds a limit."""
