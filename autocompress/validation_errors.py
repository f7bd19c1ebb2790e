"""Pydantic's validation errors as the project's one-line rule: the field path and what it must be,
with a did-you-mean for an unknown key (shared by study files, :mod:`autocompress.config`, and search
space files, :mod:`autocompress.space`)."""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel, ValidationError


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found by following ``loc`` from ``model`` (None if not a model)."""
    current: Any = model
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
        if typing.get_origin(current) is dict and parts:  # {key: Model}: the key names no field
            current = typing.get_args(current)[1]
            parts.pop(0)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def format_validation_error(
    exc: ValidationError, model: type[BaseModel], renamed: dict[str, str] | None = None
) -> tuple[str, str]:
    """(field path, rule) of the first error, with a did-you-mean for unknown keys.

    Args:
        exc: pydantic's error from validating data against ``model``.
        model: the validated model (its fields are the keys an unknown one is compared with).
        renamed: field path -> rule for keys that were renamed or moved (refused with the new key).
    """
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    field = ".".join(str(p) for p in loc) or "<root>"
    if err["type"] == "extra_forbidden" and renamed and field in renamed:
        return field, renamed[field]
    if err["type"] == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        known = sorted(parent.model_fields) if parent else []
        known = [k for k in known if k != "source"]
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return field, f"unknown key{hint}; allowed: {', '.join(known)}"
    if err["type"] == "missing":
        return field, "required field is missing"
    value = err.get("input")
    shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
    return field, f"{err['msg']}{shown}"
