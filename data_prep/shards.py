"""Reading webdataset / img2dataset tar shards without webdataset's decoding machinery."""
from __future__ import annotations

import json
import os
import tarfile
from typing import Iterator

from data_prep import manifest as mf


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/000001.img0.jpg' -> ('dir/000001', 'img0.jpg'): key is everything before the first dot."""
    directory, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return (f"{directory}/{key}" if directory else key), ext


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar, grouping consecutive members by key.

    A member whose key and extension the current sample already has starts a new sample with the same
    key (never overwrites): callers see a duplicated key instead of losing a sample silently.
    Raises tarfile.TarError / OSError on an unreadable tar; the caller decides what that means.
    """
    key, fields = None, {}
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, ext = split_member_name(member.name)
            if member_key != key or ext in fields:
                if key is not None:
                    yield key, fields
                key, fields = member_key, {}
            data = tar.extractfile(member).read()
            fields[ext] = data
    if key is not None:
        yield key, fields


def manifest_shards(out_dir: str) -> list[tuple[str, str]]:
    """(split, shard path) for every shard listed in the manifest of `out_dir`."""
    manifest = mf.load_manifest(out_dir)
    return [(split, os.path.join(out_dir, name)) for split, info in manifest["splits"].items()
            for name in info["shards"]]


def sample_texts(fields: dict[str, bytes]) -> Iterator[str]:
    """The natural-language text of a sample: txt, and the captions / questions / sentences / answers /
    hypotheses / premises in its json."""
    if "txt" in fields:
        yield fields["txt"].decode("utf-8", "replace")
    if "json" in fields:
        try:
            meta = json.loads(fields["json"])
        except ValueError:
            return
        if not isinstance(meta, dict):
            return
        for name in ("caption", "question", "sentence", "answer", "full_answer", "hypothesis", "premise"):
            if isinstance(meta.get(name), str):
                yield meta[name]
        for name in ("captions", "answers"):
            values = meta.get(name)
            if isinstance(values, list):
                yield from (v for v in values if isinstance(v, str))
