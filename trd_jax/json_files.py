"""Reading the JSON files of model, adapter and tokenizer folders, with errors that name the file."""

from __future__ import annotations

import json
from typing import Any


def read_json_object(path: str) -> dict[str, Any]:
    """The JSON object in `path`; a ValueError naming the file, the line and the column when it is not valid
    JSON (or not an object), so that a malformed config.json is one clear line, not a parser traceback."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
