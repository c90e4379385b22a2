"""What an output folder already holds, kept across runs: its task, finished splits and per-folder files.

Every finished split leaves ``.stats/splits/{split}.json`` (its shards, sizes, checksums, skip counts and
command); ``.stats/folder.json`` holds the task and the per-folder files (answers.json, classes.json).
The manifest is rebuilt from these at the end of every run, so writing ``val`` into a folder that holds
``train`` keeps ``train``, and a rerun of a split replaces only that split.
"""
from __future__ import annotations

import collections
import os

from data_prep import manifest as mf

SPLITS_DIR = "splits"
FOLDER_FILE = "folder.json"


class FolderState:
    """The splits and files of one output folder; `task` must match what the folder already holds."""

    def __init__(self, out_dir: str, task: str):
        self.out_dir, self.task = out_dir, task
        os.makedirs(os.path.join(out_dir, mf.STATS_DIR, SPLITS_DIR), exist_ok=True)
        folder = _read_or_none(self._path(FOLDER_FILE)) or {}
        old = _read_or_none(os.path.join(out_dir, mf.MANIFEST))
        held = folder.get("task") or (old or {}).get("task")
        if held and held != task:
            raise ValueError(f"{out_dir}: holds task {held!r} (see its manifest.json); cannot write a split of "
                             f"task {task!r} into it: use another --output folder")
        self.splits: dict[str, dict] = {}
        for name in sorted(os.listdir(self._path(SPLITS_DIR))):
            if name.endswith(".json"):
                record = _read_or_none(self._path(SPLITS_DIR, name))
                if record is not None:
                    self.splits[name[:-len(".json")]] = record
        self.files: dict[str, str] = dict(folder.get("files") or (old or {}).get("files") or {})
        if old is not None:
            self._adopt_manifest(old)
        self.skipped_without_split: dict[str, int] = dict(folder.get("skipped_without_split", {}))
        self.save()

    def _path(self, *parts: str) -> str:
        return os.path.join(self.out_dir, mf.STATS_DIR, *parts)

    def _adopt_manifest(self, old: dict) -> None:
        """Record the splits of a manifest written before split records existed (earlier data_prep)."""
        sizes = _read_or_none(os.path.join(self.out_dir, mf.SIZES)) or {}
        checksums = old.get("checksums", {})
        for split, info in old.get("splits", {}).items():
            if split in self.splits:
                continue
            only = len(old["splits"]) == 1
            self.set_split(split, {
                "shards": info["shards"], "num_samples": info["num_samples"],
                "skipped": info.get("skipped", old.get("skipped", {}) if only else {}),
                "command": info.get("command", old.get("command", "")),
                "sizes": {s: sizes[s] for s in info["shards"] if s in sizes},
                "checksums": {s: checksums[s] for s in info["shards"] if s in checksums}})

    def drop_split(self, split: str) -> None:
        """Forget `split` (it is being rewritten): until set_split, no manifest lists it."""
        self.splits.pop(split, None)
        path = self._path(SPLITS_DIR, split + ".json")
        if os.path.exists(path):
            os.remove(path)

    def set_split(self, split: str, record: dict) -> None:
        self.splits[split] = record
        mf.write_json_atomic(self._path(SPLITS_DIR, split + ".json"), record)

    def save(self) -> None:
        mf.write_json_atomic(self._path(FOLDER_FILE), {"task": self.task, "files": self.files,
                                                       "skipped_without_split": self.skipped_without_split})

    def skipped_total(self) -> collections.Counter:
        total = collections.Counter(self.skipped_without_split)
        for record in self.splits.values():
            total.update(record.get("skipped", {}))
        return total

    def write_manifest(self, *, command: str, options: dict, fields: list[str]) -> dict:
        """sizes.json, then manifest.json, for every split the folder holds."""
        self.save()
        sizes, checksums, splits = {}, {}, {}
        for split, record in sorted(self.splits.items()):
            sizes.update(record["sizes"])
            checksums.update(record["checksums"])
            splits[split] = {k: record[k] for k in ("shards", "num_samples", "skipped", "command")}
        mf.write_json_atomic(os.path.join(self.out_dir, mf.SIZES), dict(sorted(sizes.items())))
        manifest = mf.build_manifest(self.task, command, options, splits, dict(self.skipped_total()), fields,
                                     dict(sorted(self.files.items())), dict(sorted(checksums.items())))
        mf.write_json_atomic(os.path.join(self.out_dir, mf.MANIFEST), manifest)
        return manifest


def _read_or_none(path: str):
    try:
        return mf.read_json(path)
    except (OSError, ValueError):
        return None
