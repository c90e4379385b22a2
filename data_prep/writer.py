"""Deterministic, resumable, parallel shard writer shared by every command.

Records are numbered and cut into shards of `shard_size` records *before* any image is encoded, so
the content of every shard is fixed whatever the number of workers; workers only encode images, and
the main process writes each tar in record order with fixed headers (mtime 0, no user names). Each
shard is written as ``NAME.tar.tmp``, its stats go to ``.stats/NAME.tar.json``, then the tar is renamed.
A rerun re-reads the input (cheap) but skips shards whose stats carry the same fingerprint.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
import time
from typing import Any, Iterable, Iterator

import tqdm

from data_prep import manifest as mf
from data_prep.images import ImageOptions, process_image
from data_prep.records import Record, ReaderItem, Skip, SkipSample

log = logging.getLogger(__name__)
MAX_LOGGED_SKIPS = 10  # per reason; the rest are only counted
SHARDS_IN_FLIGHT = 2  # shards queued to the pool ahead of the one being written


@dataclasses.dataclass
class ShardJob:
    split: str
    index: int
    keys: list[str]
    records: list[Record]

    @property
    def name(self) -> str:
        return mf.shard_name(self.split, self.index)


def encode_record(record: Record, key: str, opts: ImageOptions) -> dict[str, bytes] | Skip:
    """One record -> {extension: bytes} ready for the tar, or the Skip saying why not (runs in workers)."""
    sample: dict[str, bytes] = {}
    try:
        for field, source in record.images.items():
            sample[field] = process_image(source, opts)
    except SkipSample as exc:
        where = record.meta.get("source") or record.meta.get("identifier") or f"record {key}"
        name = f" {field}={source}" if isinstance(source, str) else f" {field}"
        return Skip(exc.reason, f"{where}{name}: {exc.detail}")
    if record.text is not None:
        sample["txt"] = record.text.encode("utf-8")
    for field, value in record.extra.items():
        sample[field] = value.encode("utf-8")
    meta = {"key": key, **record.meta}
    sample["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return sample


def record_digest(record: Record, h: "hashlib._Hash") -> None:
    """Feed what identifies a record's input into `h` (paths by name, bytes by content)."""
    for field, source in sorted(record.images.items()):
        h.update(field.encode())
        if isinstance(source, str):
            h.update(b"path:" + source.encode("utf-8", "surrogateescape"))
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


class DatasetWriter:
    """Writes the splits of one output folder, then `sizes.json` and, last, `manifest.json`."""

    def __init__(self, out_dir: str, *, task: str, fields: list[str], image_opts: ImageOptions,
                 shard_size: int, workers: int, command: str, options: dict[str, Any],
                 progress: bool = True):
        if shard_size < 1 or workers < 1:
            raise ValueError(f"shard_size and workers must be >= 1, got {shard_size}, {workers}")
        self.out_dir, self.task, self.fields = out_dir, task, fields
        self.image_opts, self.shard_size, self.workers = image_opts, shard_size, workers
        self.command, self.options, self.progress = command, options, progress
        self.splits: dict[str, dict] = {}
        self.skipped: collections.Counter = collections.Counter()
        self.checksums: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.logged_skips: collections.Counter = collections.Counter()
        self.started = time.monotonic()
        self.reused_shards = 0
        self.pool = None
        os.makedirs(os.path.join(out_dir, mf.STATS_DIR), exist_ok=True)
        manifest_path = os.path.join(out_dir, mf.MANIFEST)
        if os.path.exists(manifest_path):  # a manifest means "complete": not true again until finish()
            os.remove(manifest_path)
        base = {"task": task, "fields": fields, "image": dataclasses.asdict(image_opts), "shard_size": shard_size}
        self.fingerprint_base = json.dumps(base, sort_keys=True).encode()

    def __enter__(self) -> "DatasetWriter":
        if self.workers > 1:
            self.pool = multiprocessing.get_context("fork").Pool(self.workers)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()
            self.pool = None

    # ---- planning -------------------------------------------------------------------------------
    def _plan(self, split: str, items: Iterable[ReaderItem]) -> Iterator[ShardJob]:
        keys, records, index, shard = [], [], 0, 0
        for item in items:
            if isinstance(item, Skip):
                self._count_skip(item)
                continue
            keys.append(f"{index:09d}")
            records.append(item)
            index += 1
            if len(records) == self.shard_size:
                yield ShardJob(split, shard, keys, records)
                keys, records, shard = [], [], shard + 1
        if records:
            yield ShardJob(split, shard, keys, records)

    def _fingerprint(self, job: ShardJob) -> str:
        h = hashlib.sha256(self.fingerprint_base)
        for key, record in zip(job.keys, job.records):
            h.update(key.encode())
            record_digest(record, h)
        return h.hexdigest()

    def add_skipped(self, reason: str, count: int) -> None:
        """Count skips found outside any split (e.g. records with an invalid split name)."""
        self.skipped[reason] += count

    def _count_skip(self, skip: Skip) -> None:
        self.skipped[skip.reason] += 1
        self._log_skip(skip)

    # ---- encoding -------------------------------------------------------------------------------
    def _encode_iter(self, job: ShardJob) -> Iterator[dict[str, bytes] | Skip]:
        fn = functools.partial(_encode_pair, opts=self.image_opts)
        pairs = list(zip(job.records, job.keys))
        if self.pool is None:
            return map(fn, pairs)
        chunk = max(1, min(16, len(pairs) // (4 * self.workers)))
        return self.pool.imap(fn, pairs, chunksize=chunk)

    def write_split(self, split: str, items: Iterable[ReaderItem], total: int | None = None) -> None:
        """Plan, encode and write every shard of `split` (reusing finished ones)."""
        if split in self.splits:
            raise ValueError(f"split {split!r} written twice")
        shards, num_samples = [], 0
        bar = tqdm.tqdm(total=total, unit="sample", desc=f"{self.task} {split}", disable=not self.progress,
                        mininterval=1.0, smoothing=0.1, dynamic_ncols=True)
        in_flight: collections.deque = collections.deque()

        def finish_oldest() -> None:
            nonlocal num_samples
            job, fingerprint, stats, results = in_flight.popleft()
            if stats is None:
                stats = self._write_shard(job, fingerprint, results, bar)
            else:
                self.reused_shards += 1
                bar.update(len(job.records))
            for reason, n in stats["skipped"].items():
                self.skipped[reason] += n
            if stats["num_samples"]:
                shards.append(job.name)
                self.sizes[job.name] = stats["num_samples"]
                self.checksums[job.name] = stats["sha256"]
                num_samples += stats["num_samples"]

        with bar:
            for job in self._plan(split, items):
                fingerprint = self._fingerprint(job)
                stats = mf.load_finished_stats(self.out_dir, job.name, fingerprint)
                results = None if stats is not None else self._encode_iter(job)
                in_flight.append((job, fingerprint, stats, results))
                if len(in_flight) > SHARDS_IN_FLIGHT:
                    finish_oldest()
            while in_flight:
                finish_oldest()
        self.splits[split] = {"shards": shards, "num_samples": num_samples}

    def _write_shard(self, job: ShardJob, fingerprint: str, results, bar) -> dict:
        final = os.path.join(self.out_dir, job.name)
        tmp = final + mf.TMP_SUFFIX
        skipped: collections.Counter = collections.Counter()

        def observed():
            for sample in results:
                bar.update(1)
                if isinstance(sample, Skip):
                    skipped[sample.reason] += 1
                    self._log_skip(sample)
                yield sample

        count = write_tar(tmp, job.keys, observed())
        stats = {"fingerprint": fingerprint, "num_samples": count, "skipped": dict(sorted(skipped.items())),
                 "sha256": mf.file_sha256(tmp) if count else None}
        mf.write_json_atomic(mf.stats_path(self.out_dir, job.name), stats)
        if count:
            os.replace(tmp, final)
        else:
            os.remove(tmp)
        return stats

    def _log_skip(self, skip: Skip) -> None:
        if self.logged_skips[skip.reason] < MAX_LOGGED_SKIPS:
            self.logged_skips[skip.reason] += 1
            log.warning("skipped (%s): %s", skip.reason, skip.detail)

    # ---- finishing ------------------------------------------------------------------------------
    def finish(self, files: dict[str, tuple[str, Any]] | None = None) -> dict:
        """Write extra JSON files ({role: (file name, object)}), sizes.json, then the manifest."""
        files = files or {}
        self._remove_stale_shards()
        for _, (name, obj) in sorted(files.items()):
            mf.write_json_atomic(os.path.join(self.out_dir, name), obj)
        mf.write_json_atomic(os.path.join(self.out_dir, mf.SIZES), dict(sorted(self.sizes.items())))
        manifest = mf.build_manifest(self.task, self.command, self.options, self.splits, dict(self.skipped),
                                     self.fields, {role: name for role, (name, _) in files.items()},
                                     dict(sorted(self.checksums.items())))
        mf.write_json_atomic(os.path.join(self.out_dir, mf.MANIFEST), manifest)
        print(self.summary_line(), flush=True)
        return manifest

    def _remove_stale_shards(self) -> None:
        """Delete `{split}-NNNNNN.tar[.tmp]` of the written splits left by earlier runs with another plan."""
        listed = {name for info in self.splits.values() for name in info["shards"]}
        shard_re = re.compile(r"^(?P<split>.+)-\d{6}\.tar(\.tmp)?$")
        for name in sorted(os.listdir(self.out_dir)):
            m = shard_re.match(name)
            if m and m["split"] in self.splits and name not in listed:
                log.warning("removing %s: not part of this run's output", name)
                os.remove(os.path.join(self.out_dir, name))

    def summary_line(self) -> str:
        seconds = time.monotonic() - self.started
        total = sum(s["num_samples"] for s in self.splits.values())
        per_split = ", ".join(f"{name}: {s['num_samples']} in {len(s['shards'])} shards"
                              for name, s in self.splits.items())
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items()) if n)
        reused = f", {self.reused_shards} finished shards reused" if self.reused_shards else ""
        return (f"data_prep {self.task}: wrote {total} samples ({per_split}); skipped {skipped}"
                f"{f' ({reasons})' if reasons else ''}{reused}; {seconds:.1f}s, "
                f"{total / max(seconds, 1e-9):.1f} samples/s -> {self.out_dir}")


def _encode_pair(pair: tuple[Record, str], opts: ImageOptions) -> dict[str, bytes] | Skip:
    return encode_record(pair[0], pair[1], opts)
