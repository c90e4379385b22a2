"""Loading JSON input with errors that name the file, line and expected shape; duplicate keys are refused."""
from __future__ import annotations

import json
import json.decoder
import json.scanner
import os
import re
from typing import Any

from data_prep.records import InputFormatError


class DuplicateKeyError(ValueError):
    """A JSON object with the same key twice (json.loads would silently keep the last value)."""

    def __init__(self, key: str, position: int | None = None):
        super().__init__(f"duplicate key {key!r} in one JSON object")
        self.key, self.position = key, position


def unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """`object_pairs_hook` that refuses duplicate keys."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        raise DuplicateKeyError(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def loads_unique(text: str) -> Any:
    """json.loads refusing objects with duplicate keys (raises DuplicateKeyError or JSONDecodeError)."""
    return json.loads(text, object_pairs_hook=unique_pairs)


def duplicate_key_line(text: str) -> int:
    """The line of the second occurrence of the first duplicated key (re-parses slowly: error path only)."""
    decoder = json.JSONDecoder()

    def parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):
        pairs, end = json.decoder.JSONObject(s_and_end, strict, scan_once, None, list, memo)
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                start = s_and_end[1]
                hits = [m.start() for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text[start:end])]
                position = start + (hits[1] if len(hits) > 1 else 0)
                raise DuplicateKeyError(key, position)
            seen.add(key)
        return dict(pairs), end

    decoder.parse_object = parse_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    try:
        decoder.decode(text)
    except DuplicateKeyError as exc:
        return text.count("\n", 0, exc.position) + 1
    return 1


def load_json_file(path: str, expected: str) -> Any:
    """Parse `path`; a syntax error or a duplicate key raises InputFormatError with its line."""
    if not os.path.isfile(path):
        raise InputFormatError(path, None, f"file not found; expected {expected}")
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "surrogateescape")
    try:
        return loads_unique(text)
    except json.JSONDecodeError as exc:
        raise InputFormatError(path, exc.lineno, f"invalid JSON ({exc.msg}, column {exc.colno}); "
                                                 f"expected {expected}") from None
    except DuplicateKeyError as exc:
        raise InputFormatError(path, duplicate_key_line(text), f"{exc}; every key must be unique") from None


def require_list(obj: Any, path: str, key: str, expected: str) -> list:
    """obj[key] as a list, or InputFormatError describing the expected top-level structure."""
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        raise InputFormatError(path, None, f"expected a JSON object with a list {key!r}: {expected}")
    return obj[key]
