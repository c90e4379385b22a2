"""Rank-0 metrics sink (TensorBoard + ``train_log.jsonl`` + console) and the derived figures it logs:
expert load and its entropy, measured dropped-token fraction, throughput and MFU."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KEPT_SUFFIX = "/kept"  # expert_counts key of the kept counts beside "layer{L}/{modality}" (routed)
PEAK_MATMUL_SIZE = 1024
PEAK_MATMUL_REPEATS = 8


class MetricsSink:
    """Writes scalars on rank 0 only; other ranks get a no-op sink (``enabled=False``)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            self.jsonl = (run_dir / "train_log.jsonl").open("a")

    def scalars(self, values: dict[str, float], step: int, record: bool = True) -> None:
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        if record:
            self.jsonl.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in values.items()}}) + "\n")
            self.jsonl.flush()
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def expert_load_scalars(counts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per ``layer{L}/{modality}`` (routed counts [E]; with ``layer{L}/{modality}/kept`` beside it, the
    routes kept within capacity): fraction of routed tokens per expert, normalised entropy of that load
    (1 = perfectly balanced), max/mean load, and the measured ``routed``, ``kept`` and
    ``dropped_frac`` = 1 - kept/routed. Counts are of real tokens (padding is never routed with top-1)."""
    out: dict[str, float] = {}
    for key, count in sorted(counts.items()):
        if key.endswith(KEPT_SUFFIX):
            continue
        count = count.double().cpu()
        total = float(count.sum())
        num_experts = count.numel()
        if total <= 0:
            continue
        frac = count / total
        nz = frac[frac > 0]
        entropy = float(-(nz * nz.log()).sum()) / math.log(num_experts) if num_experts > 1 else 1.0
        out[f"moe/{key}/entropy"] = entropy
        out[f"moe/{key}/max_over_mean"] = float(frac.max() * num_experts)
        for index, value in enumerate(frac.tolist()):
            out[f"moe_load/{key}/expert{index:02d}"] = value
        if key + KEPT_SUFFIX in counts:
            kept = float(counts[key + KEPT_SUFFIX].double().sum())
            out[f"moe/{key}/routed"] = total
            out[f"moe/{key}/kept"] = kept
            out[f"moe/{key}/dropped_frac"] = 1.0 - kept / total
    return out


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved TFLOP/s of a square matmul in ``dtype`` on this rank (a stand-in peak for MFU)."""
    n = PEAK_MATMUL_SIZE
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(PEAK_MATMUL_REPEATS):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return 2 * n**3 * PEAK_MATMUL_REPEATS / seconds / 1e12


def console_line(step: int, total: int, values: dict[str, float]) -> str:
    keys = ["loss", "aux_loss", "lr", "grad_norm", "samples_per_s", "mfu", "data_wait_frac"]
    parts = [f"step {step}/{total}"]
    for key in keys:
        if f"train/{key}" in values:
            value = values[f"train/{key}"]
            parts.append(f"{key} {value:.3g}" if abs(value) < 1e4 else f"{key} {value:.0f}")
    return " | ".join(parts)
