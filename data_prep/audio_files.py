"""Finding clips on disk and turning table cells into audio sources, for the audio readers."""
from __future__ import annotations

import os
from typing import Any

from data_prep.audio import AUDIO_EXTENSIONS
from data_prep.records import UNREADABLE_AUDIO, Skip, check_text, media_source


class AudioFolder:
    """The audio files directly in `root`, found by file name or by name without extension (one listing).

    Two files with the same stem (``a.wav``, ``a.flac``): the first in sorted order wins. Files whose
    extension soundfile does not read (``.m4a``, ``.webm``, ``.aac`` as yt-dlp leaves them) are kept apart
    so that a reader can say "convert it" instead of "missing".
    """

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--audio-root {root}: not a folder")
        self.root = root
        self.names = {n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n))}
        self.by_stem: dict[str, str] = {}
        self.other_by_stem: dict[str, str] = {}  # stem -> a file with an extension soundfile does not read
        for name in sorted(self.names):
            stem, ext = os.path.splitext(name)
            (self.by_stem if ext.lower() in AUDIO_EXTENSIONS else self.other_by_stem).setdefault(stem, name)

    def find(self, *names: str) -> str | None:
        """Path of the first of `names` that is a file name in the folder, else the first that is a stem."""
        for name in names:
            if name in self.names:
                return os.path.join(self.root, name)
        for name in names:
            if name in self.by_stem:
                return os.path.join(self.root, self.by_stem[name])
        return None

    def unreadable(self, *names: str) -> str | None:
        """The file name of the first of `names` (as a stem) whose only file has an extension soundfile does not
        read (e.g. ``abc.m4a``), else None."""
        for name in names:
            if name in self.other_by_stem and name not in self.by_stem:
                return self.other_by_stem[name]
        return None


def not_audio_skip(file_name: str, where: str) -> Skip:
    """The skip of a clip that is on disk in a format soundfile cannot decode (.m4a, .webm, ...)."""
    stem, ext = os.path.splitext(file_name)
    return Skip(UNREADABLE_AUDIO, f"{where}: {file_name}: soundfile does not read {ext or 'extension-less'} files "
                                  f"(it reads {' '.join(AUDIO_EXTENSIONS)}); convert the clips first, e.g. "
                                  f"ffmpeg -i '{file_name}' '{stem}.flac'")


def audio_source(value: Any, audio_root: str) -> str | bytes | Skip:
    """A table cell as an audio source: a path (joined to audio_root), bytes, or an HF Audio(decode=False)
    struct {"bytes", "path"}."""
    return media_source(value, audio_root, "audio")


def usable_captions(values: list, field: str) -> list[str]:
    """The non-empty, valid captions of `values` in order (check_text rules), duplicates kept."""
    return [c for c in (check_text(v, field) for v in values) if not isinstance(c, Skip)]
