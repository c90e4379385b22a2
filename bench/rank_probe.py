"""Rank-side wrapper for the benchmarks: runs ``pipeline.train``'s ``main`` unchanged and writes this rank's
memory figures to ``OUTPUT_DIR/probe/rank{R}.json``.

    deepspeed --num_gpus 2 --module bench.rank_probe --recipe launch/recipes/vl_pretrain.yaml \
        --ds-config ds_configs/zero2_bf16.json --output-dir runs/bench/x [--set ...]

Figures (bytes, from /proc/self/status of the rank process; DataLoader workers are separate processes and
are not included):
- ``baseline_rss``: resident set after importing torch, deepspeed and the pipeline, before the process
  group, model, engine or data exist (the interpreter + libraries).
- ``peak_before_save``: VmHWM (peak resident set) when the final checkpoint starts: init, engine, and all
  training steps. The peak counter is reset (``/proc/self/clear_refs`` = 5) after the imports, so import
  transients do not count; ``hwm_reset`` says whether that worked.
- ``peak``: VmHWM at exit (checkpoint save included).
- ``rss_parts_before_save``: RssAnon (heap: tensors, allocator), RssFile (mapped libraries), RssShmem
  (shared memory, e.g. DeepSpeed's CPU SHM all-reduce workspace) when the final checkpoint starts.
- ``phase_s``: wall seconds of every engine ``forward``, ``backward`` and ``step`` call on this rank, in
  order (one entry per micro-step), to split step time; timing adds two clock reads per call.
- ``adamw_fused``: ``BENCH_ADAMW_FUSED=1`` made ``torch.optim.AdamW`` build with ``fused=True`` in this rank.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def status_bytes() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def time_engine_phases(phases: dict[str, list[float]]) -> None:
    """Wrap DeepSpeedEngine.forward/backward/step to append their wall time to ``phases``."""
    import time

    from deepspeed.runtime.engine import DeepSpeedEngine

    for name in phases:
        original = getattr(DeepSpeedEngine, name)

        def timed(self, *args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                phases[_name].append(time.perf_counter() - start)

        setattr(DeepSpeedEngine, name, timed)


def use_fused_adamw() -> None:
    """Make ``torch.optim.AdamW`` (what ``pipeline.run.build.build_optimizer`` calls) build ``fused=True``:
    a bench-only switch (env ``BENCH_ADAMW_FUSED=1``) to time the fused kernel without changing the pipeline."""
    import torch

    class FusedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("fused", True)
            super().__init__(*args, **kwargs)

    torch.optim.AdamW = FusedAdamW


def output_dir(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg == "--output-dir" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--output-dir="):
            return Path(arg.split("=", 1)[1])
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import deepspeed  # noqa: F401  (imported here so the baseline holds the libraries)
    import torch  # noqa: F401

    import pipeline.run.trainer  # noqa: F401
    from pipeline import train

    report: dict[str, object] = {"hwm_reset": reset_peak()}
    report["baseline_rss"] = status_bytes()["VmRSS"]

    original_save = pipeline.run.trainer.Trainer.save

    def save_with_snapshot(self: object) -> None:
        status = status_bytes()
        report.setdefault("peak_before_save", status["VmHWM"])
        report.setdefault("rss_parts_before_save", {k: v for k, v in status.items() if k.startswith("Rss")})
        original_save(self)

    pipeline.run.trainer.Trainer.save = save_with_snapshot
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    time_engine_phases(phases)
    report["phase_s"] = phases
    report["adamw_fused"] = os.environ.get("BENCH_ADAMW_FUSED") == "1"
    if report["adamw_fused"]:
        use_fused_adamw()
    rc = train.main(argv)
    report.update(peak=status_bytes()["VmHWM"], rss_at_exit=status_bytes()["VmRSS"],
                  rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
                  pid=os.getpid())
    folder = output_dir(argv)
    if folder is not None:
        (folder / "probe").mkdir(parents=True, exist_ok=True)
        (folder / "probe" / f"rank{report['rank']}.json").write_text(json.dumps(report, indent=1) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
