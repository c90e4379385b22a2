"""Readers the tasks' baselines share: the ``<key>.json`` records of a data folder's training split, read
straight from the tars (images are not decoded)."""
from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
BASELINE_SPLIT = "train"  # the split a baseline learns its prior from (same data folder as the eval)


def split_json_records(data_dir: Path, split: str) -> Iterator[dict[str, Any]]:
    """The ``<key>.json`` records of one split."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(data_dir / shard) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    yield json.load(tar.extractfile(member))


def has_split(data_dir: Path, split: str) -> bool:
    path = data_dir / "manifest.json"
    return path.is_file() and split in json.loads(path.read_text()).get("splits", {})


def train_records(data_dir: Path) -> Iterator[dict[str, Any]] | None:
    """The json records of ``data_dir``'s training split, or None (with a warning) when it has none."""
    if not has_split(data_dir, BASELINE_SPLIT):
        log.warning("%s has no %s split: no baseline", data_dir, BASELINE_SPLIT)
        return None
    return split_json_records(data_dir, BASELINE_SPLIT)
