"""Room for a checkpoint: estimate its size, compare with the free space before saving, and say errno,
path and free space in one line when a write fails anyway (torch's own file writer only says
``basic_ios::clear: iostream error``).

The estimate is the newest complete checkpoint's size as this host sees it (the same model writes the same
files again), else each rank's share from its parameter count: 16-bit or fp32 weights, plus the optimizer
state the rank keeps (fp32 master weights and Adam's m and v, as ``pipeline.plan.model_state_bytes``
accounts them), summed over the ranks that write to the same file system.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch

from data_prep.manifest import errno_text, existing_folder
from pipeline.run.distributed import Dist, gather_objects

OVERHEAD_BYTES = 1 << 20  # RNG files, run_state.json, recipe copies, torch's zip headers
MARGIN = 1.1  # the estimate may be off by this much (pickled optimizer metadata, ZeRO padding)


class FileWriteError(OSError):
    """A file that could not be written, said as ``describe_write_error`` says it."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint that was not saved (no room, or a write failed): one line naming the folder and free
    space; every rank raises it at the same save. ``pipeline.train`` exits 4."""


def human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def _existing(path: Path) -> Path:
    return Path(existing_folder(str(path)))


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the file system that holds ``path`` or would hold it."""
    return shutil.disk_usage(_existing(Path(path))).free


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def describe_write_error(path: Path | str, exc: BaseException) -> str:
    """``PATH: [Errno 28 ENOSPC] No space left on device; 0 B free in FOLDER``."""
    if isinstance(exc, OSError) and exc.errno is not None:
        cause = errno_text(exc)
    else:
        cause = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    folder = Path(path).parent
    return f"{path}: {cause}; {human(free_bytes(folder))} free in {_existing(folder)}"


class _WholeWrites:
    """A file whose ``write`` writes every byte or raises OSError, and keeps that error: torch's zip writer
    reports a failed or short write as ``unexpected pos``, the errno lost."""

    def __init__(self, raw: Any):
        self.raw, self.error = raw, None

    def write(self, data: Any) -> int:
        view, done = memoryview(data).cast("B"), 0
        try:
            while done < len(view):
                done += self.raw.write(view[done:])
        except OSError as exc:
            self.error = self.error or exc
            raise
        return done

    def flush(self) -> None:
        pass


def save_torch(obj: Any, path: Path | str, zipfile: bool = True) -> None:
    """``torch.save`` through Python writes, so that a full disk says ENOSPC (torch's own writer only says
    ``basic_ios::clear: iostream error``); raises FileWriteError."""
    writes = None
    try:
        with open(path, "wb", buffering=0) as raw:
            writes = _WholeWrites(raw)
            torch.save(obj, writes, _use_new_zipfile_serialization=zipfile)
    except (OSError, RuntimeError) as exc:
        raise FileWriteError(describe_write_error(path, writes.error if writes and writes.error else exc)) from exc


def rank_share_bytes(module: torch.nn.Module, dist: Dist, weight_bytes: int, zero_stage: int,
                     expert_dp: int) -> int:
    """Bytes of the checkpoint files this rank writes: weights (rank 0 the dense ones, every rank its local
    experts'), and its optimizer state: fp32 master copy (16-bit training) + Adam m, v per trainable
    parameter, partitioned over the data-parallel ranks under ZeRO (else all on rank 0)."""
    from deepspeed.moe.utils import is_moe_param

    dense = sum(p.numel() for p in module.parameters() if not is_moe_param(p))
    experts = sum(p.numel() for p in module.parameters() if is_moe_param(p))
    dense_train = sum(p.numel() for p in module.parameters() if p.requires_grad and not is_moe_param(p))
    experts_train = sum(p.numel() for p in module.parameters() if p.requires_grad and is_moe_param(p))
    state_bytes = 12 if weight_bytes < 4 else 8
    weights = experts * weight_bytes + (dense * weight_bytes if dist.is_main else 0)
    if zero_stage == 0:
        optim = (dense_train + experts_train) * state_bytes if dist.is_main else 0
    else:
        optim = dense_train * state_bytes / dist.world_size + experts_train * state_bytes / expert_dp
    return int(weights + optim)


def engine_share_bytes(engine: Any, dist: Dist) -> int:
    """``rank_share_bytes`` for a DeepSpeed engine."""
    weight_bytes = 2 if engine.bfloat16_enabled() or engine.fp16_enabled() else 4
    ep_size = max([getattr(m, "ep_size", 1) for m in engine.module.modules()] + [1])
    return rank_share_bytes(engine.module, dist, weight_bytes, engine.zero_optimization_stage(),
                            max(dist.world_size // ep_size, 1))


def room_problem(ckpt_root: Path, tag: str, previous: str | None, share_bytes: int) -> str | None:
    """Collective: None when every file system the ranks write to has room for checkpoint ``tag``, else
    one line naming the folder, the need and the free space (the same answer on every rank)."""
    previous_bytes = folder_bytes(ckpt_root / previous) if previous else None  # as this host sees it
    mine = (socket.gethostname(), os.stat(_existing(ckpt_root)).st_dev, free_bytes(ckpt_root), previous_bytes,
            share_bytes)
    groups: dict[tuple[str, int], list[tuple]] = {}  # (host, device) -> the reports of its ranks
    for report in gather_objects(mine):
        groups.setdefault(report[:2], []).append(report)
    hosts = {host for host, _ in groups}
    for (host, _), reports in sorted(groups.items()):
        _, _, free, previous_bytes, _ = reports[0]
        estimate = previous_bytes if previous_bytes is not None else sum(report[4] for report in reports)
        need = int(estimate * MARGIN) + OVERHEAD_BYTES
        if need > free:
            basis = f"the size of {previous}" if previous_bytes is not None else \
                f"weights and optimizer state of {len(reports)} ranks: {human(estimate)}"
            where = f" on {host}" if len(hosts) > 1 else ""
            return (f"not saving checkpoint {tag}: {ckpt_root}{where} needs about {human(need)} ({basis}, "
                    f"+{(MARGIN - 1) * 100:.0f}% + {human(OVERHEAD_BYTES)}) but has {human(free)} free; free "
                    f"some space or move --output-dir, then rerun with --resume auto"
                    f"{f' (the newest complete checkpoint {previous} is kept)' if previous else ''}")
    return None
