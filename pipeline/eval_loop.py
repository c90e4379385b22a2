"""Distributed evaluation shared by ``pipeline.train`` and ``pipeline.evaluate``.

``run_eval(engine_or_module, task, loader, dist)``: every rank runs the same number of fixed-shape
batches (a rank whose data ran out feeds padding), outputs are gathered across ranks and padding dropped,
then ``task.metrics`` runs on every rank. ``load_for_eval(run_dir_or_tag)`` rebuilds model + task from a
run folder's resolved recipe and loads the newest complete checkpoint's weights.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import torch

from pipeline.distributed import Dist, all_reduce_max, gather_objects
from pipeline.tasks import Task

log = logging.getLogger(__name__)


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
    prepared samples (``pipeline.data.build_eval_loader``); ``engine_or_module(batch, mode="eval")``
    must return ``task.eval_outputs``."""
    module = getattr(engine_or_module, "module", engine_or_module)
    was_training = module.training
    module.eval()
    local: dict[str, list[Any]] = {}
    iterator = iter(loader)
    batches = 0
    while max_batches is None or batches < max_batches:
        samples = next(iterator, None)
        if all_reduce_max(0.0 if samples is None else 1.0, dist.device) == 0.0:
            break  # every rank is out of data
        batch = to_device(pad_and_collate(task, samples or [], batch_size), dist.device)
        valid = batch["valid"].cpu()
        _append(local, module(batch, mode="eval"), valid)
        batches += 1
    outputs = _merge(gather_objects(local))
    metrics = task.metrics(outputs) if outputs else {}
    metrics["num_samples"] = float(_count(outputs))
    module.train(was_training)
    return metrics, outputs


def _count(outputs: dict[str, Any]) -> int:
    for value in outputs.values():
        return len(value)
    return 0


def write_eval(run_dir: Path, tag: str, metrics: dict[str, float], task: Task, outputs: dict[str, Any]) -> Path:
    folder = run_dir / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tag}.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    predictions = task.predictions(outputs)
    if predictions is not None:
        (folder / f"{tag}_predictions.json").write_text(json.dumps(predictions))
    return path


@dataclasses.dataclass
class LoadedRun:
    module: Any  # TaskModel (model + heads), eval mode, on ``device``
    task: Task
    recipe: Any
    model_cfg: Any
    checkpoint: Path


def load_for_eval(run_dir_or_tag: str | Path, dist: Dist | None = None, overrides: list[str] | None = None,
                  device: torch.device | None = None) -> LoadedRun:
    """Model + task from ``RUN`` (newest complete checkpoint) or ``RUN/checkpoints/step_N``, without
    DeepSpeed: dense weights from ``mp_rank_00_model_states.pt`` and every expert from its per-expert
    file, so any world size (including 1 process) can evaluate. ``overrides`` are ``--set`` items
    applied to the saved recipe (e.g. ``data.eval.path=...``). Expert parallelism is set to 1."""
    from pipeline.build import build_task, build_task_model, load_tokenizer
    from pipeline.checkpoint import resolve_checkpoint
    from pipeline.checkpoint_merge import check_keys, merge_moe_checkpoint
    from pipeline.distributed import single_process
    from pipeline.recipe import load_recipe, resolve_init_from
    from pipeline.tasks import DistInfo

    dist = dist or single_process()
    ckpt_root, tag = resolve_checkpoint(run_dir_or_tag)
    run_dir = resolve_init_from(str(ckpt_root / tag))
    recipe, model_cfg = load_recipe(run_dir / "resolved_recipe.yaml",
                                    ["init_from=null", "model.moe.ep_size=1", *(overrides or [])])
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    task = build_task(recipe, model_cfg, tokenizer, DistInfo(dist.rank, dist.world_size))
    module = build_task_model(recipe, model_cfg, task, recipe.train.seed)
    state = merge_moe_checkpoint(ckpt_root / tag)
    missing, unexpected = module.load_state_dict(state, strict=False)
    check_keys(ckpt_root / tag, missing, unexpected)  # a model scored on fresh weights is no result
    module.to(device or dist.device).eval()
    return LoadedRun(module, task, recipe, model_cfg, ckpt_root / tag)
