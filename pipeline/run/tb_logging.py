"""Rank-0 metrics sink (TensorBoard + ``train_log.jsonl`` + console) and the derived figures it logs:
expert load and its entropy, measured dropped-token fraction, throughput and MFU."""
from __future__ import annotations

import json
import logging
import math
import time

import torch

from pipeline.run.run_dir import RunDir

log = logging.getLogger(__name__)

PEAK_MATMUL_SIZE = 1024
PEAK_MATMUL_REPEATS = 8


class MetricsSink:
    """Writes scalars on rank 0 only; other ranks get a no-op sink (``enabled=False``)."""

    def __init__(self, run: RunDir, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.tensorboard_path))
            self.jsonl = run.train_log_path.open("a")

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


def expert_load_scalars(routed: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per MoE FFN ``layer{L}/{modality}`` (``pipeline.model.moe_stats``: [E] routes the router chose, [E]
    routes the dispatch kept within capacity): fraction of routed tokens per expert, normalised entropy of
    that load (1 = perfectly balanced), max/mean load, and the measured ``routed`` and ``kept`` totals,
    ``kept_frac`` = kept/routed and ``dropped_frac`` = 1 - kept_frac. Real tokens only with top-1."""
    out: dict[str, float] = {}
    for key, count in sorted(routed.items()):
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
        if key in kept:
            kept_total = float(kept[key].double().sum())
            out[f"moe/{key}/routed"] = total
            out[f"moe/{key}/kept"] = kept_total
            out[f"moe/{key}/kept_frac"] = kept_total / total
            out[f"moe/{key}/dropped_frac"] = 1.0 - kept_total / total
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
