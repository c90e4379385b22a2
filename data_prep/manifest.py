"""Output-folder bookkeeping: shard names, atomic JSON files, per-shard stats, manifest and sizes.json."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIZES = "sizes.json"
STATS_DIR = ".stats"  # per-shard stats, written just before a shard's rename; lets a rerun skip it
TMP_SUFFIX = ".tmp"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def dumps(obj: Any) -> str:
    """Stable JSON text (sorted keys, UTF-8) so reruns give identical bytes."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=1) + "\n"


class OutputWriteError(OSError):
    """A file of the output folder that could not be written: errno, path and free space in one line."""


def existing_folder(path: str) -> str:
    """``path`` or its nearest existing parent (where a file that could not be written would have gone)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def errno_text(exc: BaseException) -> str:
    """``[Errno 28 ENOSPC] No space left on device`` (the symbolic name too), else the exception's text."""
    if isinstance(exc, OSError) and exc.errno:
        return f"[Errno {exc.errno} {errno.errorcode.get(exc.errno, '?')}] {exc.strerror}"
    return str(exc)


def output_write_error(path: str, exc: OSError) -> OutputWriteError:
    """``cannot write PATH: [Errno 28 ENOSPC] No space left on device; 0.1 MiB free in FOLDER``."""
    folder = existing_folder(os.path.dirname(os.path.abspath(path)))
    free = shutil.disk_usage(folder).free / 2**20
    return OutputWriteError(f"cannot write {path}: {errno_text(exc)}; {free:.1f} MiB free in {folder}")


def remove_partial(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_json_atomic(path: str, obj: Any) -> None:
    """Write `obj` as stable JSON to `path` via a temporary file and a rename (OutputWriteError, no
    temporary file left, when that fails).

    The rename makes it all-or-nothing if the process dies; no fsync (like the shards themselves):
    an fsync per shard stalls encoding on a busy disk (BENCHMARKS.md, figures moved out of code), and
    power-loss durability is not promised.
    """
    tmp = path + TMP_SUFFIX
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(dumps(obj))
        os.replace(tmp, path)
    except OSError as exc:
        remove_partial(tmp)
        raise output_write_error(path, exc) from exc


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stats_path(out_dir: str, shard: str) -> str:
    return os.path.join(out_dir, STATS_DIR, shard + ".json")


def stale_reason(out_dir: str, shard: str, stats: dict) -> str | None:
    """Why the finished `shard` cannot be reused as `stats` describe it (None when it can).

    A shard with samples must exist with the recorded size and sha256 (a damaged or replaced file is redone).
    """
    if not stats.get("num_samples"):
        return None
    path = os.path.join(out_dir, shard)
    if not os.path.isfile(path):
        return "shard missing"
    if "size" in stats and os.path.getsize(path) != stats["size"]:
        return "shard damaged (size differs)"
    if file_sha256(path) != stats.get("sha256"):
        return "shard damaged (sha256 differs)"
    return None


def build_manifest(task: str, command: str, options: dict, splits: dict[str, dict], skipped: dict[str, int],
                   fields: list[str], files: dict[str, str], checksums: dict[str, str]) -> dict:
    """`splits`: {split: {shards, num_samples, skipped, command}}; `skipped`: the total over the folder."""
    return {
        "format_version": FORMAT_VERSION,
        "task": task,
        "command": command,
        "options": options,
        "splits": splits,
        "skipped": {k: v for k, v in sorted(skipped.items()) if v},
        "fields": fields,
        "files": files,
        "checksums": checksums,
    }


def load_manifest(out_dir: str) -> dict:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no manifest (not a data_prep output folder, or the run did not finish)")
    manifest = read_json(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest
