"""Rank-0 metrics sink (TensorBoard + ``train_log.jsonl`` + console), the log window the training loop
adds up, and the derived figures it logs: expert load and its entropy, measured dropped-token fraction,
throughput and MFU, the share of each training source."""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import time
from typing import Any

import torch

from pipeline.run.distributed import all_reduce_sum
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

    def image(self, tag: str, picture: Any, step: int) -> None:
        """A PIL image (RGB) as TensorBoard image ``tag`` at ``step``."""
        if not self.enabled:
            return
        import numpy as np

        self.writer.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


@dataclasses.dataclass
class TrainWindow:
    """What one rank's micro-batches and steps add up to between two logs. A micro-batch reports only its
    media's loss terms (an image batch itc/itm/mlm, an audio one atc/atm/audio_mlm), so each term is averaged
    over the micro-batches that reported it. The sequence of sources (and of skipped micro-batches) is the
    same on every rank (``BatchMix``), so every rank holds the same term names: the reductions line up."""
    term_sums: dict[str, float] = dataclasses.field(default_factory=lambda: collections.defaultdict(float))
    term_micro: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    sources: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    routed: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    kept: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    micro: int = 0
    steps: int = 0
    tokens: int = 0
    time: float = 0.0
    data_wait: float = 0.0
    grad_norm: float = 0.0
    norm_steps: int = 0

    def add_micro(self, terms: dict[str, float], source: int, tokens: int,
                  routed: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]) -> None:
        """One micro-batch that trained: its loss terms, training source index, input tokens, expert counts."""
        for key, value in terms.items():
            self.term_sums[key] += float(value)
            self.term_micro[key] += 1
        for into, counts in ((self.routed, routed), (self.kept, kept)):
            for key, value in counts.items():
                into[key] = into.get(key, 0) + value.double().cpu()
        self.sources[source] += 1
        self.micro += 1
        self.tokens += tokens

    def add_step(self, seconds: float, grad_norm: float | None) -> None:
        self.steps += 1
        self.time += seconds
        if grad_norm is not None:
            self.grad_norm += grad_norm
            self.norm_steps += 1

    def term_means(self, device: torch.device) -> dict[str, float]:
        """Collective: ``train/{term}`` = its mean over the micro-batches of every rank that reported it."""
        names = sorted(self.term_sums)
        sums_counts = torch.tensor([self.term_sums[n] for n in names] + [float(self.term_micro[n]) for n in names],
                                   dtype=torch.float64)
        totals = all_reduce_sum(sums_counts, device).tolist()
        return {f"train/{n}": totals[i] / totals[len(names) + i] for i, n in enumerate(names)}

    def source_shares(self, num_sources: int) -> dict[str, float]:
        """``data/source_{i}_share``: the fraction of this window's micro-batches drawn from training source i
        (the same on every rank); none with a single source."""
        if num_sources < 2 or not self.micro:
            return {}
        return {f"data/source_{i}_share": self.sources[i] / self.micro for i in range(num_sources)}


def expert_load_scalars(routed: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per MoE FFN ``layer{L}/{modality}`` (``pipeline.model.moe_stats``: [E] routes the router chose, [E]
    routes the dispatch kept within capacity): fraction of routed tokens per expert, normalised entropy of
    that load (1 = perfectly balanced), max/mean load, its coefficient of variation ``load_cv`` (std/mean,
    0 = balanced), and the measured ``routed`` and ``kept`` totals, ``kept_frac`` = kept/routed and
    ``dropped_frac`` = 1 - kept_frac. Real tokens only with top-1 (gshard) or any k (dropless)."""
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
        out[f"moe/{key}/load_cv"] = float(frac.std(unbiased=False) * num_experts)  # std / mean of the load
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
    """Achieved TFLOP/s of a square matmul in ``dtype`` on this rank (a stand-in peak for MFU). Its operands come
    from the global RNG, so a fresh run's RNG stream includes these draws (the stream every figure in BENCHMARKS.md
    was measured with); the trainer measures before a resume restores the RNG (``Trainer.create``)."""
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


def console_line(step: int, total: int, values: dict[str, float], sources: dict[int, int] | None = None) -> str:
    """One short line per log; ``sources`` {training source index: micro-batches in the window} adds
    ``src 0:12 1:8`` (given only when there are several sources)."""
    keys = ["loss", "aux_loss", "lr", "grad_norm", "samples_per_s", "mfu", "data_wait_frac"]
    parts = [f"step {step}/{total}"]
    for key in keys:
        if f"train/{key}" in values:
            value = values[f"train/{key}"]
            parts.append(f"{key} {value:.3g}" if abs(value) < 1e4 else f"{key} {value:.0f}")
    if sources:
        parts.append("src " + " ".join(f"{index}:{count}" for index, count in sorted(sources.items())))
    return " | ".join(parts)
