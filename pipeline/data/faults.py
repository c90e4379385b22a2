"""Data faults: a failure budget per stream, shards checked against their manifest, eval loss reports.

A webdataset handler that skips every failure turns a source whose shards are all gone or unreadable
into an endless busy loop; ``tarfile`` reads a damaged header, or a truncation at a header boundary, as
the end of the archive, so part of a shard vanishes without an error. Here:

- ``FailureBudget`` counts reads that worked and failed (reason, first example) and raises ``DataFailure``
  past ``data.max_consecutive_failures`` in a row or ``data.max_failure_share`` of a window (training);
- ``read_shards`` compares the samples read per shard with ``sizes.json`` (``shard_short``, ``shard_empty``)
  and, with ``data.verify_checksums``, checks each shard's sha256 from the manifest before reading it;
- ``report_losses`` ends an evaluation worker's stream with a ``ReadReport`` when anything was lost.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any, Iterator

import soundfile as sf
import torch
import webdataset as wds
from PIL import UnidentifiedImageError

from data_prep.manifest import file_sha256
from pipeline.tasks.base import SkipSample

log = logging.getLogger(__name__)

CORRUPT_IMAGE = "corrupt_image"
CORRUPT_AUDIO = "corrupt_audio"


class DataFailure(RuntimeError):
    """A data stream failed more than its budget allows (``data.max_consecutive_failures``,
    ``data.max_failure_share``); the message names the stream and the top reasons with an example each."""

    def __init__(self, message: str):
        # raised in a DataLoader worker, it reaches the main process rebuilt as
        # DataFailure("Caught DataFailure in DataLoader worker ...\nOriginal Traceback ...DataFailure: <message>"):
        # keep only the message, so that the user reads one clean error
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.split(marker, 1)[1].rstrip()
        super().__init__(message)


def failure_reason(exn: BaseException) -> str:
    """The budget's reason for a failed read or sample: a ``SkipSample``'s own reason; an image PIL cannot
    identify is ``corrupt_image``, a clip soundfile (libsndfile) cannot decode ``corrupt_audio`` (data_prep
    wrote only decodable media, so such bytes were damaged since); anything else, its exception type."""
    if isinstance(exn, SkipSample):
        return exn.reason
    if isinstance(exn, UnidentifiedImageError):
        return CORRUPT_IMAGE
    if isinstance(exn, sf.SoundFileError):  # LibsndfileError, SoundFileRuntimeError (a RuntimeError)
        return CORRUPT_AUDIO
    return type(exn).__name__


class FailureBudget:
    """Counts the reads of one data stream that worked and that failed (by reason, the first example of
    each), logs failures rate-limited and never sleeps. With limits it raises ``DataFailure`` once
    ``max_consecutive`` failures come in a row or more than ``max_share`` of the last ``window`` reads
    failed; without (evaluation) it only counts. Reads are samples; a shard that cannot be opened counts
    once, a shard that holds fewer samples than its manifest says counts once per missing sample."""

    def __init__(self, what: str, max_consecutive: int | None = None, max_share: float | None = None,
                 window: int = 10_000):
        self.what, self.max_consecutive, self.max_share = what, max_consecutive, max_share
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}
        self.shard_problems: dict[str, dict[str, Any]] = {}  # url -> {read, expected, reasons}
        self.read_ok = 0
        self.consecutive = 0
        self.recent: collections.deque[bool] = collections.deque(maxlen=window)
        self.recent_failures = 0

    @classmethod
    def for_training(cls, what: str, data_cfg: Any) -> "FailureBudget":
        return cls(what, data_cfg.max_consecutive_failures, data_cfg.max_failure_share, data_cfg.failure_window)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def ok(self) -> None:
        self.read_ok += 1
        self.consecutive = 0
        self._remember(False)

    def fail(self, reason: str, example: str, weight: int = 1) -> None:
        self.counts[reason] += weight
        self.examples.setdefault(reason, example)
        self.consecutive += weight
        for _ in range(min(weight, self.recent.maxlen or weight)):
            self._remember(True)
        total = self.total
        if total <= 10 or total % 100 == 0:
            log.warning("%s: skipped sample/shard (%s: %s); %d skipped so far", self.what, reason, example, total)
        self._check()

    def handler(self, url: str, reasons: list[str]) -> Any:
        """Webdataset handler while reading shard ``url``: count, add the reason to ``reasons``, continue."""
        def handle(exn: BaseException) -> bool:
            reasons.append(failure_reason(exn))
            # webdataset appends the url and stream to args: keep its message (OSError: its own str)
            text = exn.args[0] if exn.args and isinstance(exn.args[0], str) else str(exn)
            self.fail(reasons[-1], f"{url}: {text[:300]}")
            return True
        return handle

    def note_shard(self, url: str, read: int, expected: int | None, reasons: list[str]) -> None:
        self.shard_problems[url] = {"read": read, "expected": expected, "reasons": sorted(set(reasons))}

    def _remember(self, failed: bool) -> None:
        if len(self.recent) == self.recent.maxlen:
            self.recent_failures -= self.recent[0]
        self.recent.append(failed)
        self.recent_failures += failed

    def _check(self) -> None:
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise DataFailure(self.summary(f"{self.consecutive} failed reads in a row "
                                           f"(data.max_consecutive_failures={self.max_consecutive})"))
        full = len(self.recent) == self.recent.maxlen
        if self.max_share is not None and full and self.recent_failures / len(self.recent) > self.max_share:
            raise DataFailure(self.summary(f"{self.recent_failures} of the last {len(self.recent)} reads failed "
                                           f"(data.max_failure_share={self.max_share})"))

    def summary(self, why: str) -> str:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        lines = [f"{self.what}, worker {worker}: {why}; {self.read_ok} samples read, {self.total} failures. "
                 "Top reasons (count, first example):"]
        lines += [f"  {reason} x {count}: {self.examples[reason]}" for reason, count in self.counts.most_common(5)]
        lines.append("Check the shards (python -m data_prep verify FOLDER), re-create the damaged ones with data_prep, "
                     "or remove the source from data.train.")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ShardFacts:
    """What a data_prep folder promises per shard URL: sample counts (``sizes.json``) and sha256 (the
    manifest's ``checksums``); empty for a webdataset URL spec (no manifest)."""
    sizes: dict[str, int]
    checksums: dict[str, str]
    verify: bool = False


def _checksum_problem(url: str, facts: ShardFacts, verified: dict[str, tuple[int, int]]) -> str | None:
    """Why ``url`` does not match its manifest sha256, or None; a file is hashed once per version
    (size, mtime) and worker; a file that cannot be stat'ed is left to the read to report."""
    try:
        stat = os.stat(url)
    except OSError:
        return None
    version = (stat.st_size, stat.st_mtime_ns)
    if verified.get(url) == version:
        return None
    digest = file_sha256(url)
    if digest != facts.checksums[url]:
        return f"{url}: sha256 {digest[:16]}... differs from the manifest's {facts.checksums[url][:16]}..."
    verified[url] = version
    return None


def read_shards(shards: Iterator[dict[str, Any]], facts: ShardFacts,
                 budget: FailureBudget) -> Iterator[dict[str, Any]]:
    """Shard dicts -> raw samples, one shard at a time. ``tarfile`` reads a damaged header, or a
    truncation at a header boundary, as the end of the archive: a shard that yields fewer samples than
    ``sizes.json`` says counts its missing samples as ``shard_short``; one that yields none, ``shard_empty``."""
    verified: dict[str, tuple[int, int]] = {}
    for shard in shards:
        url = shard["url"]
        problem = _checksum_problem(url, facts, verified) if facts.verify else None
        if problem:
            budget.note_shard(url, 0, facts.sizes.get(url), ["checksum_mismatch"])
            budget.fail("checksum_mismatch", problem)
            continue
        read, reasons = 0, []
        for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=budget.handler(url, reasons)):
            read += 1
            budget.ok()
            yield sample
        expected = facts.sizes.get(url)
        missing = expected - read if expected is not None and read < expected else 0
        if missing or not read:
            reasons.append("shard_short" if missing else "shard_empty")
        if reasons:
            budget.note_shard(url, read, expected, reasons)
        if missing:
            budget.fail("shard_short", f"{url}: read {read} of {expected} samples", weight=missing)
        elif not read:
            budget.fail("shard_empty", f"{url}: no samples")


@dataclasses.dataclass
class ReadReport:
    """What an evaluation worker could not read, yielded after its last batch (only when something was
    lost): ``shards`` {url: {read, expected, reasons}} (every worker reads every shard, so all report the
    same) and the samples this worker dropped itself, ``skipped`` {reason: count} with ``examples``."""
    shards: dict[str, dict[str, Any]]
    skipped: dict[str, int]
    examples: dict[str, str]


def report_losses(src: Iterator[list[Any]], read: FailureBudget, prepare: FailureBudget) -> Iterator[Any]:
    yield from src
    if read.shard_problems or prepare.total:
        yield ReadReport(dict(read.shard_problems), dict(prepare.counts), dict(prepare.examples))
