"""Turning records into tar samples: image and audio encoding (in workers), input fingerprints and fixed-header tars."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from typing import Iterable

from data_prep import manifest as mf
from data_prep.audio import AudioOptions, process_audio
from data_prep.images import ImageOptions, process_image
from data_prep.records import Record, Skip, SkipSample


@dataclasses.dataclass
class ShardJob:
    split: str
    index: int
    keys: list[str]
    records: list[Record]

    @property
    def name(self) -> str:
        return mf.shard_name(self.split, self.index)


def encode_record(record: Record, key: str, opts: ImageOptions,
                  audio_opts: AudioOptions | None = None) -> dict[str, bytes] | Skip:
    """One record -> {extension: bytes} ready for the tar, or the Skip saying why not (runs in workers).

    Audio fields add {field: {sample_rate, seconds, source_sample_rate, source_channels, source_seconds}}
    under "audio" in the json.
    """
    sample: dict[str, bytes] = {}
    audio_info: dict[str, dict] = {}
    try:
        for field, source in record.images.items():
            sample[field] = process_image(source, opts)
        for field, source in record.audio.items():
            sample[field], audio_info[field] = process_audio(source, audio_opts or AudioOptions())
    except SkipSample as exc:
        where = record.meta.get("source") or record.meta.get("identifier") or f"record {key}"
        name = f" {field}={source}" if isinstance(source, str) else f" {field}"
        return Skip(exc.reason, f"{where}{name}: {exc.detail}")
    if record.text is not None:
        sample["txt"] = record.text.encode("utf-8")
    for field, value in record.extra.items():
        sample[field] = value.encode("utf-8")
    meta = {"key": key, **record.meta}
    if audio_info:
        meta["audio"] = audio_info
    sample["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return sample


def record_digest(record: Record, h: "hashlib._Hash") -> None:
    """Feed what identifies a record's input into `h`: files by path, existence, size and mtime_ns
    (one cheap `os.stat`, no content hashing), bytes by content."""
    for field, source in sorted(record.images.items()) + sorted(record.audio.items()):
        h.update(field.encode())
        if isinstance(source, str):
            h.update(b"path:" + source.encode("utf-8", "surrogateescape"))
            try:
                st = os.stat(source)
                h.update(f"size:{st.st_size}:mtime_ns:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"missing")
        elif isinstance(source, (bytes, bytearray)):
            h.update(b"bytes:" + hashlib.sha256(source).digest())
        else:
            h.update(b"render:" + repr(source).encode())
    payload = {"text": record.text, "meta": record.meta, "extra": record.extra}
    h.update(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogateescape"))


def write_tar(path: str, keys: list[str], samples: Iterable[dict[str, bytes] | Skip]) -> int:
    """Write samples (skips left out) to `path`; returns the number written.

    Same layout as webdataset's TarWriter (members `<key>.<field>`, fields sorted, USTAR) with fixed
    headers: mtime 0, mode 0444, no owner names, so the bytes depend only on the samples. (webdataset
    itself is not imported: it pulls in torch, seconds of start-up for every process.)
    """
    count = 0
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key, sample in zip(keys, samples):
            if isinstance(sample, Skip):
                continue
            for field in sorted(sample):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mtime, info.mode = len(sample[field]), 0, 0o444
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(sample[field]))
            count += 1
    return count


def encode_pair(pair: tuple[Record, str], opts: ImageOptions,
                audio_opts: AudioOptions | None = None) -> dict[str, bytes] | Skip:
    return encode_record(pair[0], pair[1], opts, audio_opts)
