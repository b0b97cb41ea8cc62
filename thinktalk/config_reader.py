"""A typed reader of one JSON object that names `file: dotted.field` in every error it raises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InputError


class ConfigError(InputError):
    """A checkpoint config is missing a field, has a wrong type, or is inconsistent. Names the field and file."""


_MISSING = object()


class FieldReader:
    """Reads typed fields from one JSON object, naming `file: a.b.c` in every error."""

    def __init__(self, data: dict, file: Path | str, prefix: str = ""):
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: {prefix or 'top level'} must be a JSON object, got {type(data).__name__}")
        self.data, self.file, self.prefix = data, file, prefix

    def where(self, name: str) -> str:
        return f"{self.file}: {self.prefix}{name}"

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where(name)} {problem}")

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        value = self.data.get(name)
        if value is None:
            if default is _MISSING:
                raise self.fail(name, "is required but missing")
            return default
        return value

    def int(self, name: str, default: Any = _MISSING, minimum: int | None = None) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(name, f"must be >= {minimum}, got {value}")
        return value

    def float(self, name: str, default: Any = _MISSING, positive: bool = False) -> float:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(name, f"must be a number, got {value!r}")
        if positive and not value > 0:
            raise self.fail(name, f"must be > 0, got {value}")
        return float(value)

    def bool(self, name: str, default: Any = _MISSING) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {value!r}")
        return value

    def str(self, name: str, default: Any = _MISSING) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {value!r}")
        return value

    def ints(self, name: str, default: Any = _MISSING) -> tuple[int, ...]:
        value = self.raw(name, default)
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise self.fail(name, f"must be a list of integers, got {value!r}")
        return tuple(value)

    def sub(self, name: str) -> "FieldReader":
        return FieldReader(self.raw(name), self.file, f"{self.prefix}{name}.")
