"""Loading whole JSON input files with errors that name the file, line and expected shape."""
from __future__ import annotations

import json
import os
from typing import Any

from data_prep.records import InputFormatError


def load_json_file(path: str, expected: str) -> Any:
    """Parse `path`; a syntax error raises InputFormatError with its line and `expected` (a description)."""
    if not os.path.isfile(path):
        raise InputFormatError(path, None, f"file not found; expected {expected}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as exc:
        raise InputFormatError(path, exc.lineno, f"invalid JSON ({exc.msg}, column {exc.colno}); "
                                                 f"expected {expected}") from None


def require_list(obj: Any, path: str, key: str, expected: str) -> list:
    """obj[key] as a list, or InputFormatError describing the expected top-level structure."""
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        raise InputFormatError(path, None, f"expected a JSON object with a list {key!r}: {expected}")
    return obj[key]
