"""Deterministic, resumable, parallel shard writer shared by every command.

Records are numbered and cut into shards of `shard_size` records *before* any image is encoded, so
the content of every shard is fixed whatever the number of workers; workers only encode images, and
the main process writes each tar in record order with fixed headers (mtime 0, no user names). Each
shard is written as ``NAME.tar.tmp``, its stats go to ``.stats/NAME.tar.json``, then the tar is renamed.
A rerun re-reads the input (cheap) and keeps a finished shard when its stats carry the same fingerprint
(options + record inputs, files by stat) and the tar still has the recorded size and sha256.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import time
from typing import Any, Iterable, Iterator

import tqdm

from data_prep import manifest as mf
from data_prep.audio import AudioOptions
from data_prep.encode import ShardJob, encode_pair, record_digest, write_tar
from data_prep.folder_state import FolderState
from data_prep.images import ImageOptions
from data_prep.records import ReaderItem, Skip

log = logging.getLogger(__name__)
MAX_LOGGED_SKIPS = 10  # per reason; the rest are only counted
SHARDS_IN_FLIGHT = 2  # shards queued to the pool ahead of the one being written
ENCODER_VERSION = 2  # bump when the same input and options give other bytes (2: EXIF orientation applied)
AUDIO_ENCODER_VERSION = 1  # the same for audio fields


class ConversionError(ValueError):
    """A split that wrote nothing or too little, or a per-folder file that would be empty (exit code 2)."""


@dataclasses.dataclass
class SplitTally:
    """What one run did with one split: records read, skips by reason (+ first example), shard reuse."""

    read: int = 0
    written: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, str] = dataclasses.field(default_factory=dict)
    reused: int = 0
    redone: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add_skips(self, counts: dict[str, int], examples: dict[str, str]) -> None:
        self.skipped.update(counts)
        for reason, detail in examples.items():
            self.examples.setdefault(reason, detail)

    def top_reasons(self, n: int = 3) -> str:
        return "; ".join(f"{reason}: {count} (e.g. {self.examples.get(reason, 'no example kept')})"
                         for reason, count in self.skipped.most_common(n)) or "none"


class DatasetWriter:
    """Writes splits into one output folder (keeping its other splits), then `sizes.json` and `manifest.json`."""

    def __init__(self, out_dir: str, *, task: str, fields: list[str], image_opts: ImageOptions,
                 shard_size: int, workers: int, command: str, options: dict[str, Any],
                 progress: bool = True, min_written: float = 0.0, audio_opts: AudioOptions | None = None):
        if shard_size < 1 or workers < 1:
            raise ValueError(f"shard_size and workers must be >= 1, got {shard_size}, {workers}")
        if not 0.0 <= min_written <= 1.0:
            raise ValueError(f"--min-written must be between 0 and 1 (a fraction of the records read), "
                             f"got {min_written}")
        self.out_dir, self.task, self.fields = out_dir, task, fields
        self.image_opts, self.shard_size, self.workers = image_opts, shard_size, workers
        self.audio_opts = audio_opts
        self.command, self.options, self.progress = command, options, progress
        self.min_written = min_written
        os.makedirs(out_dir, exist_ok=True)
        self.state = FolderState(out_dir, task)
        self.tallies: dict[str, SplitTally] = {}
        self.skipped_without_split: collections.Counter = collections.Counter()
        self.logged_skips: collections.Counter = collections.Counter()
        self.notes: list[str] = []
        self.started = time.monotonic()
        self.pool = None
        manifest_path = os.path.join(out_dir, mf.MANIFEST)
        if os.path.exists(manifest_path):  # a manifest means "complete": not true again until finish()
            os.remove(manifest_path)
        base = {"task": task, "fields": fields, "image": dataclasses.asdict(image_opts), "shard_size": shard_size,
                "encoder_version": ENCODER_VERSION}
        if audio_opts is not None:  # absent for image folders, so their fingerprints stay as they were
            base["audio"] = {**dataclasses.asdict(audio_opts), "encoder_version": AUDIO_ENCODER_VERSION}
        self.fingerprint_base = json.dumps(base, sort_keys=True).encode()
        self.options_fingerprint = hashlib.sha256(self.fingerprint_base).hexdigest()

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
    def _plan(self, split: str, items: Iterable[ReaderItem], tally: SplitTally, bar) -> Iterator[ShardJob]:
        keys, records, index, shard = [], [], 0, 0
        for item in items:
            tally.read += 1
            if isinstance(item, Skip):
                tally.add_skips({item.reason: 1}, {item.reason: item.detail})
                self._log_skip(item)
                bar.update(1)  # the bar counts records read, as its total does
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

    def _reusable_stats(self, job: ShardJob, fingerprint: str, tally: SplitTally) -> dict | None:
        """The stats of a finished shard this run may keep, or None (then it is written, saying why)."""
        try:
            stats = mf.read_json(mf.stats_path(self.out_dir, job.name))
        except (OSError, ValueError):
            return None
        if stats.get("fingerprint") == fingerprint:
            why = mf.stale_reason(self.out_dir, job.name, stats)
            if why is None:
                tally.reused += 1
                return stats
        elif stats.get("options_fingerprint") == self.options_fingerprint:
            why = "inputs changed"
        else:
            why = "options changed"
        tally.redone[why] += 1
        log.info("%s: redoing the finished shard (%s)", job.name, why)
        return None

    def add_skipped(self, reason: str, count: int) -> None:
        """Count skips found outside any split (e.g. records with an invalid split name)."""
        self.skipped_without_split[reason] += count

    def add_note(self, note: str) -> None:
        """A line for the summary (e.g. why a per-folder file was not written)."""
        self.notes.append(note)
        log.warning("%s", note)

    # ---- encoding -------------------------------------------------------------------------------
    def _encode_iter(self, job: ShardJob) -> Iterator[dict[str, bytes] | Skip]:
        fn = functools.partial(encode_pair, opts=self.image_opts, audio_opts=self.audio_opts)
        pairs = list(zip(job.records, job.keys))
        if self.pool is None:
            return map(fn, pairs)
        chunk = max(1, min(16, len(pairs) // (4 * self.workers)))
        return self.pool.imap(fn, pairs, chunksize=chunk)

    def write_split(self, split: str, items: Iterable[ReaderItem], total: int | None = None) -> SplitTally:
        """Plan, encode and write every shard of `split` (reusing finished ones); replaces that split only.

        Raises ConversionError when the split wrote nothing or less than `min_written` of the records read.
        """
        if split in self.tallies:
            raise ValueError(f"split {split!r} written twice")
        self.state.drop_split(split)
        tally = self.tallies[split] = SplitTally()
        shards, sizes, checksums = [], {}, {}
        bar = tqdm.tqdm(total=total, unit="sample", desc=f"{self.task} {split}", disable=not self.progress,
                        mininterval=1.0, smoothing=0.1, dynamic_ncols=True)
        in_flight: collections.deque = collections.deque()

        def finish_oldest() -> None:
            job, fingerprint, stats, results = in_flight.popleft()
            if stats is None:
                stats = self._write_shard(job, fingerprint, results, bar)
            else:
                bar.update(len(job.records))
            tally.add_skips(stats["skipped"], stats.get("examples", {}))
            if stats["num_samples"]:
                shards.append(job.name)
                sizes[job.name], checksums[job.name] = stats["num_samples"], stats["sha256"]
                tally.written += stats["num_samples"]

        with bar:
            for job in self._plan(split, items, tally, bar):
                fingerprint = self._fingerprint(job)
                stats = self._reusable_stats(job, fingerprint, tally)
                results = None if stats is not None else self._encode_iter(job)
                in_flight.append((job, fingerprint, stats, results))
                if len(in_flight) > SHARDS_IN_FLIGHT:
                    finish_oldest()
            while in_flight:
                finish_oldest()
        self._check_written(split, tally)
        self.state.set_split(split, {"shards": shards, "num_samples": tally.written,
                                     "skipped": dict(sorted((+tally.skipped).items())), "command": self.command,
                                     "sizes": sizes, "checksums": checksums})
        return tally

    def _check_written(self, split: str, tally: SplitTally) -> None:
        if tally.read == 0:
            raise ConversionError(f"split {split!r}: the input holds no records; check the input file")
        needed = math.ceil(self.min_written * tally.read)
        if tally.written and tally.written >= needed:
            return
        raise ConversionError(
            f"split {split!r}: wrote {tally.written} of the {tally.read} records read (--min-written "
            f"{self.min_written} needs {max(needed, 1)}); top skip reasons: {tally.top_reasons()}. Check "
            f"the input file and --image-root / --audio-root (finished shards are kept and reused by the next run, "
            f"which also writes manifest.json again with the folder's other splits)")

    def _write_shard(self, job: ShardJob, fingerprint: str, results, bar) -> dict:
        final = os.path.join(self.out_dir, job.name)
        tmp = final + mf.TMP_SUFFIX
        skipped: collections.Counter = collections.Counter()
        examples: dict[str, str] = {}

        def observed():
            for sample in results:
                bar.update(1)
                if isinstance(sample, Skip):
                    skipped[sample.reason] += 1
                    examples.setdefault(sample.reason, sample.detail)
                    self._log_skip(sample)
                yield sample

        try:
            count = write_tar(tmp, job.keys, observed())
        except OSError as exc:  # a full disk: no partial .tar.tmp left behind
            mf.remove_partial(tmp)
            raise mf.output_write_error(tmp, exc) from exc
        stats = {"fingerprint": fingerprint, "options_fingerprint": self.options_fingerprint, "num_samples": count,
                 "skipped": dict(sorted(skipped.items())), "examples": dict(sorted(examples.items())),
                 "sha256": mf.file_sha256(tmp) if count else None, "size": os.path.getsize(tmp) if count else 0}
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
        """Write per-folder JSON files ({role: (file name, object)}), sizes.json, then the manifest.

        Files not given keep what the folder already has (e.g. answers.json when only val was written).
        """
        self._remove_stale_shards()
        for role, (name, obj) in sorted((files or {}).items()):
            mf.write_json_atomic(os.path.join(self.out_dir, name), obj)
            self.state.files[role] = name
        self.state.skipped_without_split = dict(+self.skipped_without_split)
        manifest = self.state.write_manifest(command=self.command, options=self.options, fields=self.fields)
        print(self.summary_line(), flush=True)
        return manifest

    def _remove_stale_shards(self) -> None:
        """Delete `{split}-NNNNNN.tar[.tmp]` of the written splits left by earlier runs with another plan."""
        listed = {name for split in self.tallies for name in self.state.splits[split]["shards"]}
        shard_re = re.compile(r"^(?P<split>.+)-\d{6}\.tar(\.tmp)?$")
        for name in sorted(os.listdir(self.out_dir)):
            m = shard_re.match(name)
            if m and m["split"] in self.tallies and name not in listed:
                log.warning("removing %s: not part of this run's output", name)
                os.remove(os.path.join(self.out_dir, name))

    def summary_line(self) -> str:
        seconds = time.monotonic() - self.started
        total = sum(t.written for t in self.tallies.values())
        per_split = ", ".join(f"{name}: {t.written} in {len(self.state.splits[name]['shards'])} shards"
                              for name, t in self.tallies.items())
        skipped = collections.Counter(self.skipped_without_split)
        redone: collections.Counter = collections.Counter()
        for tally in self.tallies.values():
            skipped.update(tally.skipped)
            redone.update(tally.redone)
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(skipped.items()) if n)
        reused = sum(t.reused for t in self.tallies.values())
        shards = f", {reused} finished shards reused" if reused else ""
        shards += "".join(f", {n} shards redone: {why}" for why, n in sorted(redone.items()))
        others = sorted(set(self.state.splits) - set(self.tallies))
        kept = f"; kept splits {', '.join(others)}" if others else ""
        notes = "".join(f"; {note}" for note in self.notes)
        return (f"data_prep {self.task}: wrote {total} samples ({per_split}); skipped {sum(skipped.values())}"
                f"{f' ({reasons})' if reasons else ''}{shards}{kept}{notes}; {seconds:.1f}s, "
                f"{total / max(seconds, 1e-9):.1f} samples/s -> {self.out_dir}")
