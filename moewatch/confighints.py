"""Hints for config mistakes: "did you mean" for unknown keys, and unknown ``MOEWATCH_*`` variables.

An unknown key's hint names the closest real field and *its* environment variable (the unknown key has
none). Unknown ``MOEWATCH_*`` environment variables, top-level or nested, are reported the same way:
pydantic-settings silently ignores a misspelled top-level one (``MOEWATCH_WINDOWSTEPS=5``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

__all__ = ["closest_field", "env_name", "unknown_env_vars"]

PREFIX = "MOEWATCH_"


def env_name(loc: Sequence[object]) -> str:
    return PREFIX + "__".join(str(x) for x in loc).upper()


def _section(model: type[BaseModel], loc: Sequence[object]) -> type[BaseModel] | None:
    """The model class holding the fields at ``loc`` (all but its last element), or None."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _names_a_field(model: type[BaseModel], loc: Sequence[str]) -> bool:
    """``loc`` is a field, or goes inside a non-model field (a dict such as ``alerts.severities``)."""
    for i, part in enumerate(loc):
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return True  # a leaf, or keys of a mapping field below it
        if i == len(loc) - 1:
            return True  # a whole section given as JSON
        model = ann
    return False


def closest_field(model: type[BaseModel], loc: Sequence[object]) -> str | None:
    """For an unknown key at ``loc``: "did you mean `x` ($MOEWATCH_...)?", or None."""
    section = _section(model, loc[:-1])
    if section is None:
        return None
    match = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    if not match:
        return None
    real = [*loc[:-1], match[0]]
    return f"did you mean `{'.'.join(map(str, real))}` (${env_name(real)})?"


def unknown_env_vars(model: type[BaseModel], environ: Mapping[str, str]) -> list[str]:
    """One message per ``MOEWATCH_*`` variable that names no field, with the closest field."""
    out = []
    for name in sorted(environ):
        if not name.upper().startswith(PREFIX):
            continue
        loc: list[Any] = name[len(PREFIX):].lower().split("__")
        if _names_a_field(model, loc):
            continue
        section = _section(model, loc[:-1])
        hint = closest_field(model, loc) if section is not None else None
        if hint is None and section is None:  # a wrong section name: suggest from the top level
            hint = closest_field(model, loc[:1])
        out.append(f"  ${name}: not a moewatch setting" + (f"; {hint}" if hint else ""))
    return out
