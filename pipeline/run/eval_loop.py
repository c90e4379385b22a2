"""Distributed evaluation shared by ``pipeline.train`` and ``pipeline.evaluate``.

``run_eval(engine_or_module, task, loader, dist)``: every rank runs the same number of fixed-shape
batches (a rank whose data ran out feeds padding), outputs are gathered across ranks and padding dropped,
then ``task.metrics`` runs on every rank. A pass that lost shards or samples (``pipeline.data.faults``:
short/unreadable shards, undecodable samples) is marked ``incomplete``: logged, written into the eval JSON;
``require_complete`` turns it into an error (``pipeline.evaluate``). ``load_for_eval(run_dir_or_tag)``
rebuilds model + task from a run folder's resolved recipe and loads the newest complete checkpoint's weights.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import torch

from pipeline.config_utils import ConfigError
from pipeline.data.faults import ReadReport
from pipeline.run.distributed import Dist, all_reduce_max, gather_objects
from pipeline.run.run_dir import RunDir
from pipeline.tasks import Task

log = logging.getLogger(__name__)


class EvalMetrics(dict):
    """``run_eval``'s metrics (name -> float), plus ``incomplete``: None, or what the pass could not read
    ({missing_samples, shards: {url: {read, expected, reasons}}, skipped_samples: {reason: {count, example}}})."""
    incomplete: dict[str, Any] | None = None


class IncompleteEvaluation(ConfigError):
    """The evaluation split could not be read whole: its metrics would describe another set of samples."""


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pad_and_collate(task: Task, samples: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """Pad ``samples`` to exactly ``batch_size`` with ``task.padding_sample()``, collate, add ``valid``."""
    if len(samples) > batch_size:
        raise ValueError(f"eval batch of {len(samples)} > batch size {batch_size}")
    padding = [task.padding_sample() for _ in range(batch_size - len(samples))]
    samples = [{k: v for k, v in s.items() if not k.startswith("__")} for s in samples]  # webdataset's __key__
    batch = task.collate(samples + padding)
    batch["valid"] = torch.tensor([True] * len(samples) + [False] * len(padding))
    return batch


def _append(store: dict[str, list[Any]], outputs: dict[str, Any], valid: torch.Tensor) -> None:
    for key, value in outputs.items():
        if isinstance(value, torch.Tensor):
            store.setdefault(key, []).append(value.detach().float().cpu()[valid])
        else:
            store.setdefault(key, []).append([v for v, ok in zip(value, valid.tolist()) if ok])


def _merge(parts: list[dict[str, list[Any]]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for part in parts:
        for key, chunks in part.items():
            merged.setdefault(key, []).extend(chunks)
    return {k: torch.cat(v) if v and isinstance(v[0], torch.Tensor) else [x for c in v for x in c]
            for k, v in merged.items()}


@torch.no_grad()
def run_eval(engine_or_module: Any, task: Task, loader: Iterable[list[dict[str, Any]]], dist: Dist,
             batch_size: int, max_batches: int | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, gathered outputs). Collective: every rank must call it. ``loader`` yields lists of
    prepared samples (``pipeline.data.loader.build_eval_loader``); the unwrapped module (``engine.module``,
    the task holding the model) gives ``eval_outputs(batch)``."""
    module = getattr(engine_or_module, "module", engine_or_module)
    was_training = module.training
    module.eval()
    local: dict[str, list[Any]] = {}
    reports: list[ReadReport] = []
    iterator = iter(loader)
    batches = 0
    while max_batches is None or batches < max_batches:
        samples = _next_samples(iterator, reports)
        if all_reduce_max(0.0 if samples is None else 1.0, dist.device) == 0.0:
            break  # every rank is out of data
        batch = to_device(pad_and_collate(task, samples or [], batch_size), dist.device)
        valid = batch["valid"].cpu()
        _append(local, module.eval_outputs(batch), valid)
        batches += 1
    parts = gather_objects((local, reports))
    outputs = _merge([part[0] for part in parts])
    metrics = EvalMetrics(task.metrics(outputs) if outputs else {})
    metrics["num_samples"] = float(_count(outputs))
    metrics.incomplete = merge_reports([report for part in parts for report in part[1]])
    if metrics.incomplete:
        metrics["num_missing_samples"] = float(metrics.incomplete["missing_samples"])
        if dist.is_main:
            log.error("EVALUATION INCOMPLETE: %s; these metrics cover only the %d samples read",
                      describe_losses(metrics.incomplete), _count(outputs))
    module.train(was_training)
    return metrics, outputs


def _next_samples(iterator: Any, reports: list[ReadReport]) -> list[dict[str, Any]] | None:
    """The next list of samples (None at the end); ``ReadReport``s met on the way go to ``reports``."""
    for item in iterator:
        if not isinstance(item, ReadReport):
            return item
        reports.append(item)
    return None


def merge_reports(reports: list[ReadReport]) -> dict[str, Any] | None:
    """One account of what every rank and worker lost: shard problems are seen by all (each reads every
    shard), skipped samples by one each (summed). None when nothing was lost."""
    if not reports:
        return None
    shards: dict[str, dict[str, Any]] = {}
    skipped: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    for report in reports:
        shards.update(report.shards)
        skipped.update(report.skipped)
        for reason, example in report.examples.items():
            examples.setdefault(reason, example)
    short = sum(s["expected"] - s["read"] for s in shards.values() if (s["expected"] or 0) > s["read"])
    return {"missing_samples": short + sum(skipped.values()), "shards": dict(sorted(shards.items())),
            "skipped_samples": {r: {"count": n, "example": examples.get(r)} for r, n in skipped.most_common()}}


def describe_losses(incomplete: dict[str, Any]) -> str:
    parts = []
    for url, shard in incomplete["shards"].items():
        expected = "?" if shard["expected"] is None else shard["expected"]
        parts.append(f"{url}: read {shard['read']} of {expected} samples ({', '.join(shard['reasons'])})")
    for reason, skip in incomplete["skipped_samples"].items():
        parts.append(f"{skip['count']} sample(s) skipped as {reason} (e.g. {skip['example']})")
    return f"{incomplete['missing_samples']} samples missing: " + "; ".join(parts)


def require_complete(metrics: dict[str, float], what: str) -> None:
    """Raise ``IncompleteEvaluation`` when ``run_eval`` could not read ``what`` (e.g. a split) whole."""
    incomplete = getattr(metrics, "incomplete", None)
    if incomplete:
        raise IncompleteEvaluation(f"{what} could not be read whole, so no metrics are reported: "
                                   f"{describe_losses(incomplete)}. Re-create the damaged shards with data_prep "
                                   "(python -m data_prep verify FOLDER lists them)")


def _count(outputs: dict[str, Any]) -> int:
    for value in outputs.values():
        return len(value)
    return 0


def write_eval(run_dir: Path, tag: str, metrics: dict[str, float], task: Task, outputs: dict[str, Any]) -> Path:
    """``RUN/eval/TAG.json`` (the metrics, and what the evaluation missed) and the task's predictions file."""
    run = RunDir(run_dir)
    path = run.eval_path(tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = dict(metrics)
    incomplete = getattr(metrics, "incomplete", None)  # EvalMetrics from run_eval
    if incomplete:
        record["incomplete"] = incomplete
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    task.write_predictions(outputs, run.predictions_stem(tag))
    return path


@dataclasses.dataclass
class LoadedRun:
    task: Task  # holding model + heads, eval mode, on ``device``
    recipe: Any
    checkpoint: Path


def load_for_eval(run_dir_or_tag: str | Path, dist: Dist | None = None, overrides: list[str] | None = None,
                  device: torch.device | None = None) -> LoadedRun:
    """Model + task from ``RUN`` (newest complete checkpoint) or ``RUN/checkpoints/step_N``, without
    DeepSpeed: dense weights from ``mp_rank_00_model_states.pt`` and every expert from its per-expert
    file, so any world size (including 1 process) can evaluate. ``overrides`` are ``--set`` items
    applied to the saved recipe (e.g. ``data.eval.path=...``). Expert parallelism is set to 1."""
    from pipeline.run.build import build_model, build_task, load_tokenizer
    from pipeline.run.checkpoint_merge import check_keys, merge_moe_checkpoint
    from pipeline.run.distributed import single_process
    from pipeline.recipe import load_recipe
    from pipeline.tasks import DistInfo

    dist = dist or single_process()
    run, tag = RunDir.resolve(run_dir_or_tag)
    folder = run.checkpoint(tag)
    recipe = load_recipe(run.saved_recipe(f"checkpoint {run_dir_or_tag}"),
                         ["init_from=null", "init={}", "model.moe.ep_size=1", *(overrides or [])])
    task = build_task(recipe, load_tokenizer(recipe.data.tokenizer), DistInfo(dist.rank, dist.world_size),
                      build_model(recipe, recipe.train.seed))
    state = merge_moe_checkpoint(folder)
    missing, unexpected = task.load_state_dict(state, strict=False)
    check_keys(folder, missing, unexpected)  # a model scored on fresh weights is no result
    task.to(device or dist.device).eval()
    return LoadedRun(task, recipe, folder)
