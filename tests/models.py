"""Checks on pydantic models shared by the tests: every field a config or schema declares is described."""

from __future__ import annotations

from pydantic import BaseModel


def nested_models(cls: type[BaseModel], seen: set) -> None:
    """Add `cls` and every model its fields hold (directly or as a type argument), recursively, to `seen`."""
    if cls in seen:
        return
    seen.add(cls)
    for f in cls.model_fields.values():
        for t in (f.annotation, *getattr(f.annotation, "__args__", ())):
            if isinstance(t, type) and issubclass(t, BaseModel):
                nested_models(t, seen)


def undescribed_fields(models: set) -> list[str]:
    """`Model.field` for each field of `models` that has no description."""
    return [f"{m.__name__}.{n}" for m in models for n, f in m.model_fields.items() if not f.description]
