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
- ``profile`` (only with ``BENCH_PROFILE=1``; bench-only): ``torch.profiler`` (CPU) over engine ``backward`` calls
  ``BENCH_PROFILE_SKIP`` .. ``+BENCH_PROFILE_STEPS`` (default 2 after 2) on every rank, with named ranges around
  the DeepSpeed ZeRO-1/2 gradient path (``PROFILE_RANGES``); writes ``OUTPUT_DIR/probe/profile_rank{R}.txt``
  (ops by self CPU time) and puts per-backward means of the ranges and of the autograd nodes in the report.
  Profiled calls run slower (profiler overhead): their phase times are not step times.
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


#: ZeRO-1/2 methods timed by name in a profile (inclusive times; ``zero.grad_hook`` contains the bucket flushes
#: it triggers, ``zero.reduce_ipg_grads`` contains ``zero.average_tensor`` and ``zero.copy_grads_in_partition``)
PROFILE_RANGES = {
    "process_gradients": "zero.grad_hook",  # per-parameter hook: copy into the ipg bucket, flush when full
    "reduce_ipg_grads": "zero.reduce_ipg_grads",  # one bucket: average_tensor, then copy into the partition
    "average_tensor": "zero.average_tensor",  # divide, then reduce/all-reduce each rank's slices
    "allreduce_and_copy": "zero.allreduce_and_copy",  # flatten a slice list, reduce, copy back
    "copy_grads_in_partition": "zero.copy_grads_in_partition",  # this rank's grads into grads_in_partition
}
#: autograd nodes summed in a profile's report (inclusive), matched as substrings of the op names
PROFILE_NODES = ("_LoopExpertsBackward", "_AllToAllVBackward", "MmBackward", "AddmmBackward", "BmmBackward")


def profile_backward(skip: int, count: int, report: dict, folder: Path | None) -> None:
    """Run engine ``backward`` calls ``skip`` .. ``skip + count - 1`` each under its own ``torch.profiler``
    (so forward and optimizer step stay out), with the ``PROFILE_RANGES`` named; summary into
    ``report["profile"]``, the op table into ``folder``."""
    import resource
    import time

    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    def add_range(owner: type, method: str, label: str) -> None:
        original = getattr(owner, method)

        def ranged(self, *args, _original=original, _label=label, **kwargs):
            with torch.profiler.record_function(_label):
                return _original(self, *args, **kwargs)

        setattr(owner, method, ranged)

    for method, label in PROFILE_RANGES.items():
        add_range(DeepSpeedZeroOptimizer, method, label)
    add_range(DeepSpeedEngine, "_backward_epilogue", "engine.backward_epilogue")
    original_backward = DeepSpeedEngine.backward
    calls, walls, events, usage = [0], [], {}, []

    def backward(self, *args, **kwargs):
        index = calls[0]
        calls[0] += 1
        if not skip <= index < skip + count:
            return original_backward(self, *args, **kwargs)
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                with torch.profiler.record_function("engine.backward"):
                    return original_backward(self, *args, **kwargs)
        finally:
            walls.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)  # this process: page faults, user and system CPU
            usage.append({"minor_faults": after.ru_minflt - before.ru_minflt,
                          "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime})
            for e in prof.key_averages():  # [self us, total us, calls] summed over the profiled calls
                entry = events.setdefault(e.key, [0.0, 0.0, 0])
                entry[0] += e.self_cpu_time_total
                entry[1] += e.cpu_time_total
                entry[2] += e.count
            if index == skip + count - 1:
                write_profile(events, walls, report, folder)
                report["profile"]["usage"] = usage

    DeepSpeedEngine.backward = backward


def write_profile(events: dict[str, list], walls: list[float], report: dict, folder: Path | None) -> None:
    """Per-backward means (ms) of the named ranges and autograd nodes, and the self-CPU op table."""
    calls = len(walls)
    named = ("engine.backward", "engine.backward_epilogue", *PROFILE_RANGES.values())
    ranges = {k: {"ms": v[1] / 1e3 / calls, "calls": v[2] / calls} for k, v in events.items() if k in named}
    nodes: dict[str, dict[str, float]] = {}
    for key, (_, total, count) in events.items():
        for node in PROFILE_NODES:
            if node in key and "evaluate_function" in key:
                entry = nodes.setdefault(node, {"ms": 0.0, "calls": 0.0})
                entry["ms"] += total / 1e3 / calls
                entry["calls"] += count / calls
    top = sorted(events.items(), key=lambda kv: kv[1][0], reverse=True)[:40]
    report["profile"] = {"backward_wall_ms": [w * 1e3 for w in walls], "ranges": ranges, "nodes": nodes,
                         "self_ms": {k: v[0] / 1e3 / calls for k, v in top}}
    if folder is not None:
        (folder / "probe").mkdir(parents=True, exist_ok=True)
        rank = os.environ.get("RANK", "0")
        lines = [f"{calls} engine.backward calls, wall ms {[round(w * 1e3, 1) for w in walls]}; per call:",
                 f"{'op':70s} {'self ms':>10s} {'total ms':>10s} {'calls':>8s}"]
        lines += [f"{k[:70]:70s} {v[0] / 1e3 / calls:10.1f} {v[1] / 1e3 / calls:10.1f} {v[2] / calls:8.1f}"
                  for k, v in top]
        (folder / "probe" / f"profile_rank{rank}.txt").write_text("\n".join(lines) + "\n")


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
    folder = output_dir(argv)
    if os.environ.get("BENCH_PROFILE") == "1":
        profile_backward(int(os.environ.get("BENCH_PROFILE_SKIP", "2")),
                         int(os.environ.get("BENCH_PROFILE_STEPS", "2")), report, folder)
    rc = train.main(argv)
    report.update(peak=status_bytes()["VmHWM"], rss_at_exit=status_bytes()["VmRSS"],
                  rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")),
                  pid=os.getpid())
    if folder is not None:
        (folder / "probe").mkdir(parents=True, exist_ok=True)
        (folder / "probe" / f"rank{report['rank']}.json").write_text(json.dumps(report, indent=1) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
