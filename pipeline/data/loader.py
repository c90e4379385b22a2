"""webdataset streaming from data_prep manifests into fixed-shape batches.

Training (one list of stages, open_clip style)::

    per source: resampled shards (seeded per rank+worker) -> tar to samples -> seeded shuffle
        -> decode (the task's fields + optional fields present) -> task.prepare_sample
        -> batch of exactly micro_batch_size (task.collate, partial batches dropped)
    mix WHOLE micro-batches: the source of micro-batch g is the g-th draw of a generator seeded by the
    data seed only -> DataLoader workers (worker w builds the micro-batches g with g % workers == w)

Guarantee: every rank draws the same source for every micro-batch, whatever its rank and ``num_workers``
(torch hands out a loader's batches round-robin over its workers), and a micro-batch never mixes
sources. Ranks that trained on different kinds (images, audio) in the same step would make different MoE
all-to-all calls and hang. Each source has its own failure budgets (read, prepare), named after it.

Evaluation: every (rank, worker) reads the shard list in order and keeps sample i when
``i % (world_size * workers) == its slot``: an exact single pass whatever the shard count; batches
are lists of prepared samples that ``pipeline.run.eval_loop`` pads to a fixed size.

Rank, world size and seeds are arguments: this module never reads the environment. Shard content is
never unpickled; ``pipe:`` URLs are refused unless the recipe allows them. Corrupt shards/samples and
``SkipSample`` are logged, counted and skipped by a handler that does not sleep.
"""
from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import random
import signal
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlparse

import numpy as np
import soundfile as sf
import torch
import webdataset as wds
from PIL import Image

from pipeline.config_utils import ConfigError
from pipeline.data.faults import FailureBudget, ShardFacts, failure_reason, read_shards, report_losses
from pipeline.tasks.base import SkipSample, Task

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("flac", "wav")
DECODED_EXTS = (*IMAGE_EXTS, *AUDIO_EXTS, "txt", "json", "cls")
PREFETCH_FACTOR = 2
WORKER_SEED_STRIDE = 1000  # seed = base + rank * stride + worker
SOURCE_SEED_STRIDE = 104729  # shard resampling / shuffle seed of data.train[i] = seed + stride * (i + 1)
MIX_SEED_OFFSET = 17  # the micro-batch source sequence is drawn from random.Random(seed + offset)


# ----------------------------------------------------------------------------------- manifests, urls
def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no manifest.json (is this a data_prep output folder?)")
    return json.loads(path.read_text())


def url_scheme_problem(url: str, allow_pipe_urls: bool) -> str | None:
    """Why webdataset must not open ``url``, or None. Plain files (no scheme, ``file:``) always open; every
    other scheme (webdataset lower-cases it: ``PIPE:`` is ``pipe:``) runs a command (``pipe:`` a shell
    command, http(s)/sftp/scp/gs/hf/... curl, gsutil, ...), so it needs ``data.allow_pipe_urls: true``."""
    scheme = urlparse(url).scheme.lower()
    if scheme in ("", "file") or allow_pipe_urls:
        return None
    return (f"shard URL {url!r}: webdataset opens scheme {scheme!r} by running a command; only local files "
            "open by default: set data.allow_pipe_urls=true in the recipe if you trust it")


def shard_urls(path: str, split: str, allow_pipe_urls: bool = False) -> list[str]:
    """Shard URLs of ``split``: from the manifest when ``path`` is a folder, else a webdataset URL spec."""
    folder = Path(path)
    if folder.is_dir():
        manifest = read_manifest(folder)
        if split not in manifest.get("splits", {}):
            raise ConfigError(f"{path}: split {split!r} not in manifest (has {sorted(manifest['splits'])})")
        urls = [str(folder / name) for name in manifest["splits"][split]["shards"]]
    else:
        urls = list(wds.shardlists.expand_urls(path))
    for url in urls:
        problem = url_scheme_problem(url, allow_pipe_urls)
        if problem:
            raise ConfigError(f"{path}: {problem}")
    if not urls:
        raise ConfigError(f"{path}: split {split!r} has no shards")
    return urls


def num_samples(path: str, split: str) -> int | None:
    folder = Path(path)
    if not folder.is_dir():
        return None
    return read_manifest(folder)["splits"][split].get("num_samples")


# ------------------------------------------------------------------------------------------- decoding
def decode_sample(sample: dict[str, Any], fields: Iterable[str],
                  optional_fields: Iterable[str] = ()) -> dict[str, Any]:
    """Decode only the task's fields: images -> PIL RGB, audio -> (float32 waveform [S] mono, sample rate),
    txt -> str, json -> obj, cls -> int. A missing field is ``SkipSample("missing_<field>")``; an optional
    field is decoded when the sample has it."""
    fields, optional_fields = tuple(fields), tuple(optional_fields)
    for name in fields + optional_fields:
        if name.rsplit(".", 1)[-1] not in DECODED_EXTS:
            raise ConfigError(f"field {name!r}: only images, audio (flac, wav), txt, json and cls are decoded")
    out: dict[str, Any] = {"__key__": sample.get("__key__")}
    for name in fields:
        if name not in sample:
            raise SkipSample(f"missing_{name}")
        out[name] = _decode_field(name, sample[name])
    for name in optional_fields:
        if name in sample:
            out[name] = _decode_field(name, sample[name])
    return out


def _decode_field(name: str, data: bytes) -> Any:
    ext = name.rsplit(".", 1)[-1]
    if ext in IMAGE_EXTS:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    if ext in AUDIO_EXTS:
        return decode_audio(data)
    if ext == "txt":
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data)
    return int(data.decode("utf-8").strip())  # cls


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """FLAC/WAV bytes -> (float32 waveform [S], sample rate); channels are averaged (data_prep writes mono)."""
    waveform, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return waveform.mean(axis=1) if waveform.shape[1] > 1 else waveform[:, 0], int(rate)


# ---------------------------------------------------------------------------- checked shard reading
def shard_facts(path: str, urls: list[str], verify_checksums: bool) -> ShardFacts:
    """``path``'s per-shard facts; with ``verify_checksums`` every shard of ``urls`` must have a sha256."""
    folder = Path(path)
    sizes: dict[str, int] = {}
    checksums: dict[str, str] = {}
    if folder.is_dir():
        sizes_path = folder / "sizes.json"
        by_name = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
        sizes = {str(folder / name): int(count) for name, count in by_name.items()}
        checksums = {str(folder / name): sha for name, sha in read_manifest(folder).get("checksums", {}).items()}
    unchecked = [url for url in urls if url not in checksums]
    if verify_checksums and unchecked:
        raise ConfigError(f"data.verify_checksums: {path} has no sha256 for {len(unchecked)} shard(s) (e.g. "
                          f"{unchecked[0]}); only data_prep folders whose manifest.json lists 'checksums' can "
                          "be verified: set data.verify_checksums=false or re-create the folder with data_prep")
    return ShardFacts(sizes, checksums, verify_checksums)


def _prepare_samples(src: Iterator[dict[str, Any]], task: Task, train: bool,
                     budget: FailureBudget) -> Iterator[dict[str, Any]]:
    """Decode + ``task.prepare_sample``; an unusable sample is counted (reason, shard and key) and skipped."""
    for sample in src:
        try:
            prepared = task.prepare_sample(decode_sample(sample, task.fields, task.optional_fields), train=train)
        except ConfigError:
            raise
        except Exception as exn:  # corrupt image, bad json, SkipSample: never stops a long run by itself
            budget.fail(failure_reason(exn), f"{sample.get('__url__')} key {sample.get('__key__')}: {exn}")
            continue
        budget.ok()
        yield prepared


# ------------------------------------------------------------------------------------ seeded stages
def _worker_slot() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def worker_seed(base: int, rank: int) -> int:
    return base + rank * WORKER_SEED_STRIDE + _worker_slot()[0]


def _seeded_shuffle(src: Iterator[Any], bufsize: int, base_seed: int, rank: int) -> Iterator[Any]:
    rng = random.Random(worker_seed(base_seed, rank))
    buf: list[Any] = []
    for sample in src:
        buf.append(sample)
        if len(buf) >= bufsize:
            index = rng.randrange(len(buf))
            buf[index], buf[-1] = buf[-1], buf[index]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class BatchMix(torch.utils.data.IterableDataset):
    """Whole micro-batches from several infinite sources, each tagged ``__source__`` (its index). The source
    of global micro-batch g is the g-th draw, weighted by ``weights``, of ``random.Random(seed +
    MIX_SEED_OFFSET)``: ``seed`` is the same on every rank (never the rank), and DataLoader worker w of W
    walks the same draws but builds only the micro-batches with g % W == w (torch delivers them round-robin),
    so the source sequence is the same on every rank for any number of workers. One source: its stream."""

    def __init__(self, sources: list[Any], weights: list[float], seed: int):
        super().__init__()
        self.sources, self.weights, self.seed = sources, weights, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iters: dict[int, Iterator[dict[str, Any]]] = {}  # opened on first draw
        indices, mixing = list(range(len(self.sources))), len(self.sources) > 1
        rng = random.Random(self.seed + MIX_SEED_OFFSET)
        worker, num_workers = _worker_slot()
        for step in itertools.count():
            index = rng.choices(indices, weights=self.weights)[0] if mixing else 0
            if mixing and step % num_workers != worker:
                continue  # another worker builds this one
            if index not in iters:
                iters[index] = iter(self.sources[index])
            batch = next(iters[index], None)
            if batch is None:
                raise RuntimeError(f"training source data.train[{index}] ended; training sources are infinite")
            batch["__source__"] = index
            yield batch


def _select_slot(src: Iterator[Any], rank: int, world_size: int) -> Iterator[Any]:
    worker, num_workers = _worker_slot()
    slots = world_size * num_workers
    slot = rank * num_workers + worker
    for index, sample in enumerate(src):
        if index % slots == slot:
            yield sample


def _tag_worker(src: Iterator[dict[str, Any]], budgets: list[FailureBudget]) -> Iterator[dict[str, Any]]:
    for batch in src:
        batch["__worker__"] = (_worker_slot()[0], sum(budget.total for budget in budgets))
        yield batch


def _restore_default(signum: int, _frame: Any) -> None:
    signal.signal(signum, signal.SIG_DFL)


def _ignore_preemption_signals(_: int) -> None:
    """Worker init: a preemption signal sent to the whole process group (or, by SLURM, to every process)
    must not kill the workers before the trainer has checkpointed: the first SIGTERM is swallowed (a second
    one terminates, as DataLoader shutdown expects); SIGUSR1 and SIGINT (Ctrl-C: torch's worker loop would
    exit quietly on KeyboardInterrupt and fail the next batch) are ignored."""
    signal.signal(signal.SIGTERM, _restore_default)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Loader(torch.utils.data.DataLoader):
    def __iter__(self) -> "_StopWorkersOnError":
        return _StopWorkersOnError(super().__iter__())


class _StopWorkersOnError:
    """A DataLoader iterator whose workers stop as soon as it raises. An error raised in a worker
    (``DataFailure``) reaches the caller with a traceback that holds the iterator, so its workers outlive
    it; at interpreter exit multiprocessing SIGTERMs them (``_ignore_preemption_signals`` swallows the
    first) and joins them for ever: the rank hung instead of exiting."""

    def __init__(self, iterator: Any):
        self._iterator = iterator

    def __iter__(self) -> "_StopWorkersOnError":
        return self

    def __next__(self) -> Any:
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except BaseException:
            shutdown = getattr(self._iterator, "_shutdown_workers", None)  # torch's clean stop (num_workers > 0)
            if shutdown is not None:
                shutdown()
            raise

    def __getattr__(self, name: str) -> Any:  # the DataLoader iterator's own attributes (e.g. _workers)
        return getattr(self._iterator, name)


def _loader(pipeline: Any, num_workers: int) -> torch.utils.data.DataLoader:
    return _Loader(
        pipeline, batch_size=None, num_workers=num_workers, worker_init_fn=_ignore_preemption_signals,
        prefetch_factor=PREFETCH_FACTOR if num_workers else None, persistent_workers=False)


# ----------------------------------------------------------------------------------------- loaders
def build_train_loader(data_cfg: Any, task: Task, micro_batch_size: int, rank: int,
                       seed: int) -> torch.utils.data.DataLoader:
    """Infinite loader of fixed-shape training micro-batches (dicts of tensors + ``__source__`` index and
    ``__worker__`` stats). Every rank resamples the shards with its own seed (``rank``), but the source of each
    micro-batch depends on ``seed`` alone: pass the same ``seed`` on every rank (``BatchMix``)."""
    budgets, sources = [], []
    for index, source in enumerate(data_cfg.train):
        urls = shard_urls(source.path, source.split, data_cfg.allow_pipe_urls)
        facts = shard_facts(source.path, urls, data_cfg.verify_checksums)
        name = f"training source data.train[{index}] ({source.path}, split {source.split})"
        read_budget = FailureBudget.for_training(f"{name} on rank {rank}", data_cfg)
        prepare_budget = FailureBudget.for_training(f"{name} samples (decode, {task.name}) on rank {rank}", data_cfg)
        budgets += [read_budget, prepare_budget]
        source_seed = seed + SOURCE_SEED_STRIDE * (index + 1)
        sources.append(wds.DataPipeline(
            wds.ResampledShards(urls, seed=source_seed, deterministic=True,
                                worker_seed=functools.partial(worker_seed, 0, rank)),
            wds.pipelinefilter(read_shards)(facts, read_budget),
            wds.pipelinefilter(_seeded_shuffle)(data_cfg.shuffle_buffer, source_seed, rank),
            wds.pipelinefilter(_prepare_samples)(task, True, prepare_budget),
            wds.batched(micro_batch_size, collation_fn=task.collate, partial=False),
        ))
    pipeline = wds.DataPipeline(
        BatchMix(sources, [s.weight for s in data_cfg.train], seed),
        wds.pipelinefilter(_tag_worker)(budgets),
    )
    return _loader(pipeline, data_cfg.num_workers)


def build_eval_loader(source: Any, data_cfg: Any, task: Task, batch_size: int, rank: int,
                      world_size: int) -> torch.utils.data.DataLoader:
    """One exact pass over ``source`` split across ranks and workers; yields lists of prepared samples
    (at most ``batch_size``), padded and collated by ``pipeline.run.eval_loop``; after the last batch, a
    ``ReadReport`` when shards or samples were lost (``run_eval`` refuses to call such a pass complete)."""
    urls = shard_urls(source.path, source.split, data_cfg.allow_pipe_urls)
    facts = shard_facts(source.path, urls, data_cfg.verify_checksums)
    read_budget = FailureBudget(f"eval data {source.path} split {source.split} on rank {rank}")
    prepare_budget = FailureBudget(read_budget.what)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.pipelinefilter(read_shards)(facts, read_budget),
        wds.pipelinefilter(_select_slot)(rank, world_size),
        wds.pipelinefilter(_prepare_samples)(task, False, prepare_budget),
        wds.batched(batch_size, collation_fn=list, partial=True),
        wds.pipelinefilter(report_losses)(read_budget, prepare_budget),
    )
    return _loader(pipeline, data_cfg.num_workers)


def strip_meta(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("__")}

