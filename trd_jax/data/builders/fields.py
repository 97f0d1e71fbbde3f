"""Typed, validated field access on source rows, by explicit alias lists.

An alias is a key, or a dotted path into nested objects ("reward_model.ground_truth"). The first alias
whose path exists in the row is used, in list order; a later alias is never consulted when an earlier
one exists but is null or of the wrong type: that is an error, since falling through would hide bad data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from trd_jax.data.builders.files import Record

_MISSING = object()


def _lookup(record: Record, alias: str) -> Any:
    """The value at ``alias`` or _MISSING when the path does not exist. A null or non-object on the way
    down is an error: e.g. ``reward_model: null`` is bad data, not an absent answer."""
    value: Any = record.data
    parts = alias.split(".")
    for depth, key in enumerate(parts):
        if depth and value is None:
            raise record.error(".".join(parts[:depth]), "is null")
        if not isinstance(value, dict):
            raise record.error(".".join(parts[:depth]), f"expected an object, got {type(value).__name__}")
        if key not in value:
            return _MISSING
        value = value[key]
    return value


def find(record: Record, aliases: Sequence[str]) -> tuple[str, Any] | None:
    """(alias, value) of the first alias present in the row, or None."""
    for alias in aliases:
        value = _lookup(record, alias)
        if value is not _MISSING:
            return alias, value
    return None


def _missing(record: Record, name: str, aliases: Sequence[str]) -> ValueError:
    return record.error(name, f"missing (looked for {', '.join(aliases)})")


def text(record: Record, alias: str, value: Any, *, allow_int: bool = False, allow_empty: bool = False) -> str:
    """``value`` checked to be a string (or, with ``allow_int``, an integer such as AIME's int64 answers)."""
    if value is None:
        raise record.error(alias, "is null")
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        expected = "a string or an integer" if allow_int else "a string"
        raise record.error(alias, f"expected {expected}, got {type(value).__name__} {_short(value)}")
    if not allow_empty and not value.strip():
        raise record.error(alias, "is empty")
    return value


def required_text(record: Record, name: str, aliases: Sequence[str], *, allow_int: bool = False) -> str:
    found = find(record, aliases)
    if found is None:
        raise _missing(record, name, aliases)
    return text(record, found[0], found[1], allow_int=allow_int)


def optional_text(record: Record, aliases: Sequence[str], *, allow_int: bool = False) -> str | None:
    """The text of the first alias present (it may be empty), or None when no alias is present."""
    found = find(record, aliases)
    return None if found is None else text(record, found[0], found[1], allow_int=allow_int, allow_empty=True)


def row_id(record: Record, aliases: Sequence[str]) -> str:
    """The row's own id (string or integer) or, when it has none, "<file stem>-<row index>"."""
    found = find(record, aliases)
    if found is not None:
        return text(record, found[0], found[1], allow_int=True).strip()
    stem = os.path.basename(record.path).split(".", 1)[0]
    return f"{stem}-{record.index}"


def json_value(record: Record, alias: str, value: Any) -> Any:
    """A value that sources store either as nested data or as a JSON string (TACO's input_output)."""
    if value is None:
        raise record.error(alias, "is null")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise record.error(alias, f"invalid JSON string ({e.msg} at position {e.pos})") from None
    return value


def string_list(record: Record, alias: str, value: Any, *, allow_empty: bool = False) -> list[str]:
    if value is None:
        raise record.error(alias, "is null")
    # parquet list columns arrive as lists; numpy arrays never do (to_pylist), so no other sequence types
    if not isinstance(value, list):
        raise record.error(alias, f"expected a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise record.error(f"{alias}[{i}]", f"expected a string, got {type(item).__name__}")
    if not value and not allow_empty:
        raise record.error(alias, "is an empty list")
    return value


def _short(value: Any, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."
