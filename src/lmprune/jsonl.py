"""JSON in the user's files, read with messages that name the line and say what a value is."""

from __future__ import annotations

import json
from typing import Any

from .errors import LmpruneError


def jsonl_records(lines, source: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a line that is not a JSON object is named by its number
    in the file (json's own "line 1 column 5" counts within the line alone)."""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmpruneError(f"{source}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise LmpruneError(f"{source}:{number}: expected a JSON object, not {json_type(record)}")
        records.append((number, record))
    return records


def json_type(value: Any) -> str:
    """What a JSON value is, in words (for messages)."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)
