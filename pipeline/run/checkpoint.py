"""Checkpoints: DeepSpeed engine state + our run state, a COMPLETE marker written last, last-K pruning,
``--resume auto`` and weights-only ``init_from``.

A checkpoint folder (``RunDir.checkpoint(tag)``, layout in ``pipeline.run.run_dir``) holds the DeepSpeed files
(``mp_rank_00_model_states.pt``, one file per MoE expert, ZeRO optimizer shards), ``run_state.json`` (step,
samples seen, data seed, ...), ``rng/rank_00000.pt`` (python/numpy/torch RNG of each rank), copies of the
resolved recipe and ds_config, and ``COMPLETE``. A folder without ``COMPLETE`` is never picked.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.run.checkpoint_merge import (EXPERT_KEY, FUSED_EXPERT_KEY, MODALITY_KEY, MODALITY_TYPE, SUMMARY_KEY,
                                          check_keys, expert_key, modality_of, modality_rows, safe_load,
                                          state_modalities, summarize_keys)
from pipeline.run.disk_space import (CheckpointSaveError, FileWriteError, describe_write_error, engine_share_bytes,
                                 room_problem, save_torch)
from pipeline.run.distributed import Dist, barrier, gather_objects
from pipeline.run.run_dir import RunDir

log = logging.getLogger(__name__)

RUN_STATE = "run_state.json"
HEADS_PREFIX = "heads."  # a Task's heads (pipeline.tasks.base): the only tensors init_from may lack or leave unused


def rng_file(folder: Path, rank: int) -> Path:
    return folder / "rng" / f"rank_{rank:05d}.pt"


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, *rest = state["python"]
    random.setstate((version, tuple(keys), *rest))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------- save
def save_checkpoint(engine: Any, run_dir: Path, step: int, run_state: dict[str, Any], keep_last: int,
                    dist: Dist) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder. Raises CheckpointSaveError on every
    rank when a file system lacks room for it (nothing written) or a write failed (the partial folder is
    removed, older checkpoints are not pruned)."""
    run = RunDir(run_dir)
    tag = run.tag_for(step)
    folder = run.checkpoint(tag)
    if run.is_complete(tag):  # same step already saved (e.g. stopped right after resuming)
        return folder
    if dist.is_main and folder.exists():  # a half-written one from a killed run
        shutil.rmtree(folder)
    barrier()
    previous = run.latest()
    problem = room_problem(run.checkpoints, tag, previous, engine_share_bytes(engine, dist) if not previous else 0)
    if problem:
        raise CheckpointSaveError(problem)
    failures = [error for error in gather_objects(_write_files(engine, run, folder, run_state, dist)) if error]
    if failures:  # every rank learns it here: none is left waiting in a collective
        if dist.is_main:
            shutil.rmtree(folder, ignore_errors=True)
        kept = f"; the newest complete checkpoint {previous} is kept" if previous else ""
        raise CheckpointSaveError(f"checkpoint {tag} not saved: {failures[0]}{kept}")
    if dist.is_main:
        run.mark_complete(tag, step)
        run.prune(keep_last)
    barrier()
    log.info("saved checkpoint %s", folder)
    return folder


def _write_files(engine: Any, run: RunDir, folder: Path, run_state: dict[str, Any], dist: Dist) -> str | None:
    """This rank's files of the checkpoint; the failure as one line (errno, path, free space), or None."""
    report_write_errors(engine)
    try:
        engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)
        rng_file(folder, dist.rank).parent.mkdir(parents=True, exist_ok=True)
        save_torch(rng_state(), rng_file(folder, dist.rank))
        if dist.is_main:
            (folder / RUN_STATE).write_text(json.dumps(run_state, indent=2))
            for source in (run.recipe_path, run.ds_config_path):  # the checkpoint keeps what it was trained with
                if source.is_file():
                    shutil.copy2(source, folder / source.name)
    except FileWriteError as exc:
        return str(exc)
    except (OSError, RuntimeError) as exc:  # a write outside torch.save, or another checkpoint engine's
        return describe_write_error(getattr(exc, "filename", None) or folder, exc)
    return None


def report_write_errors(engine: Any) -> None:
    """Make DeepSpeed's TorchCheckpointEngine write through ``save_torch`` (errno and path on failure)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    writer = engine.checkpoint_engine
    if isinstance(writer, TorchCheckpointEngine):
        writer.save = lambda state_dict, path: save_torch(state_dict, path, writer.zipfile_serialization)


# ---------------------------------------------------------------------------------------- load
def deepspeed_safe_globals() -> list[type]:
    """The classes besides tensors and plain data that DeepSpeed's checkpoint files hold (seen in the ZeRO
    optimizer files of our bf16/fp32 runs; the model-state files hold none). DynamicLossScaler: fp16 runs."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_loads(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read every file with ``torch.load(weights_only=True)``: DeepSpeed
    0.19.8's ``TorchCheckpointEngine.load`` passes ``weights_only=False``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(Path(path), deepspeed_safe_globals(), map_location)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"resume: checkpoint engine {type(engine.checkpoint_engine).__name__} is not "
                           "DeepSpeed's TorchCheckpointEngine; cannot make its loads weights-only")
    engine.checkpoint_engine.__class__ = WeightsOnlyCheckpointEngine


def resume(engine: Any, run_dir: Path, dist: Dist) -> dict[str, Any] | None:
    """Restore engine (module, optimizer, scheduler) and RNG from the newest complete checkpoint of
    ``run_dir``; returns its run state, or None when there is none (fresh start). Every file is read
    weights-only (ConfigError naming a file that holds anything else)."""
    run = RunDir(run_dir)
    tag = run.latest()
    if tag is None:
        return None
    folder = run.checkpoint(tag)
    weights_only_loads(engine)
    load_path, _ = engine.load_checkpoint(str(run.checkpoints), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {folder}")
    if engine.load_universal_checkpoint():
        restore_buffers(engine.module, folder)
    rng = rng_file(folder, dist.rank)
    if rng.is_file():
        set_rng_state(safe_load(rng))
    else:
        log.warning("%s missing: RNG not restored on rank %d (world size changed?)", rng, dist.rank)
    state = json.loads((folder / RUN_STATE).read_text())
    log.info("resumed from %s (step %d)", folder, state["step"])
    return state


def restore_buffers(module: Any, folder: Path) -> None:
    """A universal load (``"checkpoint": {"load_universal": true}``) restores parameters only (``zero/``), never
    the module's buffers (DeepSpeed skips ``load_module_state_dict``): copy them from the folder's model file
    (a dropless FFN's ``expert_bias``, BatchNorm running statistics)."""
    saved = safe_load(folder / "mp_rank_00_model_states.pt", deepspeed_safe_globals())["module"]
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in saved:
                buffer.copy_(saved[name].to(buffer.dtype))
    log.info("universal checkpoint %s: module buffers restored from its model file", folder)


def load_weights(engine: Any, init_from: str | Path) -> Path:
    """Weights only from another run's checkpoint (``load_module_weights`` into the engine's module), then
    the optimizer's fp32 master copy is refreshed."""
    folder = load_module_weights(engine.module, init_from)
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "refresh_fp32_params"):
        optimizer.refresh_fp32_params()
    log.info("initialised weights from %s", folder)
    return folder


def load_module_weights(module: Any, init_from: str | Path) -> Path:
    """Weights only from another run's checkpoint into ``module`` (a Task), whatever its EP size or world
    size: the dense file and every per-expert file are merged (global expert ids) and this rank's local
    experts picked out. Only task heads (keys under ``heads.``) may be missing (a new task's heads keep their
    fresh init) or unused (the old task's), and a modality the model ADDS (e.g. audio on an image-text run)
    keeps the fresh init of its embedding and FFNs/experts, its ``modality_type`` row too (the saved rows
    are copied by modality name), and so do summary tokens (``model.summary_tokens``) the checkpoint lacks;
    any other model tensor missing, extra or of another shape is a ConfigError. Returns the checkpoint folder."""
    from pipeline.run.checkpoint_merge import merge_moe_checkpoint
    from pipeline.recipe import init_from_shape_error

    run, tag = RunDir.resolve(init_from)
    folder = run.checkpoint(tag)
    saved = merge_moe_checkpoint(folder)
    current = module.state_dict()
    state = {}
    for key in current:
        source = _global_expert_key(module, key)
        if source in saved:
            state[key] = _local_rows(module, key, saved[source])
    saved_modalities, modalities = state_modalities(saved), state_modalities(current)
    added = [m for m in modalities if m not in saved_modalities]
    if saved_modalities != modalities:
        for key in [k for k in state if k.endswith(MODALITY_TYPE)]:
            rows = modality_rows(state[key], saved_modalities, current[key], modalities)
            state[key] = state[key] if rows is None else rows
    mismatched = [f"{key}: checkpoint {list(value.shape)} vs model {list(current[key].shape)}"
                  for key, value in state.items() if value.shape != current[key].shape]
    if mismatched:
        raise init_from_shape_error(init_from, mismatched)
    used = {_global_expert_key(module, k) for k in state}
    missing = sorted(set(current) - set(state))
    new = [k for k in missing if modality_of(k) in added]
    summary = [k for k in missing if SUMMARY_KEY.match(k) and k not in new]  # summary tokens added
    missing = [k for k in missing if k not in new and k not in summary]
    unexpected = sorted(k for k in set(saved) - used if not _other_ranks_expert(module, k))
    check_keys(f"init_from {folder}", missing, unexpected, may_differ=HEADS_PREFIX)
    module.load_state_dict(state, strict=False)
    if added:
        modules = sorted({key[:MODALITY_KEY.match(key).end() - 1] for key in new})
        log.info("init_from %s: modalities %s are new (the checkpoint has %s): %d tensors of %s keep their "
                 "fresh init; modality_type rows copied by name", folder, added, saved_modalities, len(new),
                 ", ".join(modules))
    if summary:
        log.info("init_from %s: the checkpoint has no summary tokens (model.summary_tokens); fresh init for %s",
                 folder, ", ".join(summary))
    if missing:
        log.info("init_from %s: %d head tensors not in the checkpoint keep their fresh init: %s", folder,
                 len(missing), summarize_keys(missing))
    if unexpected:
        log.info("init_from %s: %d checkpoint head tensors unused: %s", folder, len(unexpected),
                 summarize_keys(unexpected))
    return folder


def _local_rows(module: Any, key: str, saved: torch.Tensor) -> torch.Tensor:
    """The part of checkpoint tensor ``saved`` that model tensor ``key`` holds on this rank: for a dropless
    FFN's fused experts (``...experts.w1`` [E, ...] in the merged state) rows [r*E_l, (r+1)*E_l) of EP rank
    r; ``saved`` itself otherwise (also when E differs: the shape check names it)."""
    match = FUSED_EXPERT_KEY.match(key)
    if match is None:
        return saved
    ffn = module.get_submodule(match.group(1))
    local, total = getattr(ffn, "num_local_experts", 0), getattr(ffn, "num_experts", 0)
    if getattr(ffn, "ep_size", 1) == 1 or saved.shape[0] != total:
        return saved
    rank = _fused_ep_rank(ffn)
    return saved[rank * local:(rank + 1) * local]


def _fused_ep_rank(ffn: Any) -> int:
    """This rank's index in a dropless FFN's EP group: the engine sets ``ep_rank``; before it (a module not
    yet wrapped) DeepSpeed's groups are consecutive ranks."""
    from pipeline.model.moe import expert_parallel_rank

    if getattr(ffn, "ep_group", None) is not None:
        return int(ffn.ep_rank)
    return expert_parallel_rank(ffn.ep_size)


def _global_expert_key(module: Any, key: str) -> str:
    """``...deepspeed_experts.{local}...`` -> ``...deepspeed_experts.{global}...`` for this rank (a dropless
    FFN's fused ``...experts.w1`` keeps its name: ``_local_rows`` takes this rank's rows)."""
    match = EXPERT_KEY.match(key)
    if match is None:
        return key
    from deepspeed.utils import groups

    moe = module.get_submodule(match.group(1))
    if getattr(moe, "ep_size", 1) == 1:  # every expert local (also without a process group)
        return key
    ep_rank = groups._get_expert_parallel_rank(moe.expert_group_name)
    global_id = ep_rank * moe.num_local_experts + int(match.group(2))
    return expert_key(match.group(1), global_id, match.group(3))


def _other_ranks_expert(module: Any, key: str) -> bool:
    """A checkpoint tensor of a global expert that another EP rank of this model holds."""
    match = EXPERT_KEY.match(key)
    if match is None:
        return False
    try:
        moe = module.get_submodule(match.group(1))
    except AttributeError:
        return False
    return int(match.group(2)) < getattr(moe, "num_experts", 0)

