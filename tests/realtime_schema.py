"""Every server event of the Realtime socket checked against the `openai` package's own pydantic models (its
RealtimeServerEvent union, one model per event type)."""

from __future__ import annotations

import typing

from pydantic import TypeAdapter

from openai.types.realtime import RealtimeServerEvent


def _models_by_type() -> dict[str, TypeAdapter]:
    union = typing.get_args(RealtimeServerEvent)[0]  # Annotated[Union[...], PropertyInfo(discriminator="type")]
    models = {}
    for model in typing.get_args(union):
        (kind,) = typing.get_args(model.model_fields["type"].annotation)
        models[kind] = TypeAdapter(model)
    return models


MODELS = _models_by_type()


def validate(event: dict) -> None:
    """Raises (pydantic.ValidationError, AssertionError) unless `event` is a valid GA server event."""
    assert event.get("type") in MODELS, f"{event.get('type')!r} is not a Realtime server event"
    MODELS[event["type"]].validate_python(event)
