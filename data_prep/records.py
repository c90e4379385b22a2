"""What readers hand to the writer: records to encode, skips to count, and input-format errors.

A reader yields, in a deterministic order, either a ``Record`` (one output sample before image
and audio encoding) or a ``Skip`` (a bad input record, counted by reason). A malformed input file raises
``InputFormatError`` naming the file, the line and what was expected.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Union

# Skip reasons (manifest "skipped" keys).
MISSING_FILE = "missing_file"
CORRUPT_IMAGE = "corrupt_image"
NOT_AN_IMAGE = "not_an_image"
TOO_MANY_PIXELS = "too_many_pixels"
EMPTY_CAPTION = "empty_caption"
BAD_ENCODING = "bad_encoding"
MISSING_FIELD = "missing_field"
BAD_LABEL = "bad_label"
TOO_SMALL = "too_small"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
DUPLICATE_KEY = "duplicate_key"
UNREADABLE_AUDIO = "unreadable_audio"
EMPTY_AUDIO = "empty_audio"
AUDIO_TOO_SHORT = "audio_too_short"
AUDIO_NOT_FINITE = "audio_not_finite"
SILENT_AUDIO = "silent_audio"
AUDIO_EXTENSION_MISMATCH = "audio_extension_mismatch"


class InputFormatError(ValueError):
    """A malformed input file: the message names the file, the line (when known) and what was expected."""

    def __init__(self, path: str, line: int | None, problem: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


class SkipSample(Exception):
    """Raised inside image or audio encoding when a record must be skipped; carries the reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class Skip:
    """A bad input record: counted under `reason` in the manifest, never written."""

    reason: str
    detail: str = ""


# An image source: a file path, the raw file bytes, or an object with `render() -> PIL.Image` (synth).
ImageSource = Union[str, bytes, Any]
# An audio source: a file path, the raw file bytes, or an object with
# `render() -> (float32 mono samples, sample rate)` (synth sounds).
AudioSource = Union[str, bytes, Any]


@dataclasses.dataclass
class Record:
    """One sample before encoding.

    images: {field: source}, e.g. {"jpg": "/data/a.jpg"} or {"img0.jpg": b"...", "img1.jpg": ...}.
    audio:  {field: source}, e.g. {"flac": "/data/a.wav"}; encoded as FLAC, and the clip's rates and
            durations added to the `json` field under "audio" (see data_prep/audio.py).
    text:   the `txt` field (caption, question, sentence), already validated.
    meta:   the `json` field without "key" (the writer adds the key).
    extra:  other text fields, e.g. {"cls": "3"}.
    """

    images: dict[str, ImageSource] = dataclasses.field(default_factory=dict)
    audio: dict[str, AudioSource] = dataclasses.field(default_factory=dict)
    text: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, str] = dataclasses.field(default_factory=dict)


ReaderItem = Union[Record, Skip]


def check_text(value: Any, field: str) -> str | Skip:
    """A caption/question/sentence as clean text, or the Skip explaining why it is unusable.

    bytes must be UTF-8; str must not hold lone surrogates (undecodable bytes read with
    ``errors="surrogateescape"``); empty or whitespace-only text is an empty caption.
    """
    if value is None:
        return Skip(MISSING_FIELD, f"no {field!r}")
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return Skip(BAD_ENCODING, f"{field!r} is not UTF-8")
    if not isinstance(value, str):
        return Skip(MISSING_FIELD, f"{field!r} is {type(value).__name__}, expected text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return Skip(BAD_ENCODING, f"{field!r} is not UTF-8")
    value = " ".join(value.split())
    if not value:
        return Skip(EMPTY_CAPTION, f"{field!r} is empty")
    return value


def media_source(value: Any, root: str, kind: str) -> str | bytes | Skip:
    """A table cell as an image or audio source (``kind`` names it in the skip detail): a path (joined to
    ``root``), bytes, or a Hugging Face Image/Audio(decode=False) struct ``{"bytes", "path"}``."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) if value else Skip(MISSING_FIELD, f"empty {kind} bytes")
    if isinstance(value, str) and value.strip():
        return os.path.join(root, value.strip())
    return Skip(MISSING_FIELD, f"no usable {kind} value ({type(value).__name__})")
