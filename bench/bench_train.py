"""End-to-end training throughput and MFU: dense vs MoE (4, 16 experts) at equal active parameters, for the
demo model and a larger one, through the real ``deepspeed`` launcher (2 CPU ranks, gloo).

    .venv/bin/python bench/bench_train.py                  # demo + large, fp32; demo dense in bf16 too
    .venv/bin/python bench/bench_train.py --sizes demo --experts 1 4 --bf16-experts
    .venv/bin/python bench/bench_train.py --sizes large --experts 1 16 32 --impl gshard dropless \
        --bf16-experts --fused-adamw-experts 1 32   # both MoE implementations; torch AdamW fused=True too
    .venv/bin/python bench/bench_train.py --quick          # smoke run: demo, few steps
    .venv/bin/python bench/bench_train.py --sizes large --experts 1 16 32 --impl dropless --bf16-experts \
        --measured-steps 2 --profile                      # where the backward goes (torch.profiler)

Each run is ``deepspeed --num_gpus 2 --module bench.rank_probe`` (= ``pipeline.train`` + a memory report)
with ``launch/recipes/vl_pretrain.yaml`` on the cached synth corpus (``runs/bench/``), eval off. Figures
come from the run's own ``train_log.jsonl``: step-weighted means over the steps after ``--warmup``.
- samples/s: global batch / step time. tokens/s: image tokens (patches + CLS) + real text tokens per second.
- MFU = samples/s x train FLOPs per sample (``pipeline.plan`` -> ``pipeline.model.accounting``: 3x forward
  matmul FLOPs of the vl_pretrain passes; heads not counted) / matmul peak of the 2 ranks, measured in this
  run by ``bench/peak_flops.py``: the highest of (2 concurrent single-thread processes) and (2 x one process
  alone), before and after the runs; load from other processes lowers a measured peak, so the highest is
  the conservative choice (lowest MFU).
- MoE x dense: step time of the MoE run / the dense run of the same size, precision and optimizer (dense =
  no MoE layer: identical active parameters per token, apart from the routers).
- impl: ``model.moe.impl`` of the MoE runs (``--impl``: gshard = DeepSpeed's capacity MoE, one module per
  expert; dropless = fused [E, D, F] experts); the dense baseline runs once per size and precision.
- optim: torch AdamW as ``pipeline.run.build`` builds it, or with ``fused=True`` for the runs named by
  ``--fused-adamw-experts`` (``bench.rank_probe`` with ``BENCH_ADAMW_FUSED=1``; bench-only).
- ``--ds-configs A B``: run every main-precision run once per DeepSpeed config, side by side (interleaved).
- ``--rank-env VAR=VALUE``: run every main-precision run also with this variable set for the launcher and ranks
  (side by side, interleaved), e.g. ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...`` (malloc settings).
- ``--profile``: ``bench.rank_probe`` with ``BENCH_PROFILE=1`` profiles the measured steps' backward calls on
  every rank; prints each run's backward split (named ZeRO ranges and autograd nodes, ms per backward and % of
  the profiled backward, mean over ranks) and copies the op tables to bench/results/. Profiled steps carry
  the profiler's overhead: read shares and ratios, and take step times from a run without ``--profile``.
Prints a table; writes JSON to bench/results/train_<time>.json.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.peak_flops import measure  # noqa: E402

DS_CONFIGS = {"fp32": "ds_configs/zero2_fp32.json", "bf16": "ds_configs/zero2_bf16.json"}
#: per size: micro-batch per rank, warm-up steps, measured steps (log_every = warm-up)
SCHEDULE = {"demo": (16, 3, 12), "large": (8, 2, 4)}
BF16_SCHEDULE = (8, 2, 4)  # bf16 matmul is ~10x slower than fp32 on CPUs without AMX/AVX512-BF16
QUICK_SCHEDULE = {"demo": (8, 2, 2), "large": (4, 1, 2)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=sorted(common.MODEL_SIZES), default=["demo", "large"])
    p.add_argument("--experts", nargs="+", type=int, default=[1, 4, 16], help="1 = dense baseline")
    p.add_argument("--impl", nargs="+", choices=["gshard", "dropless"], default=["gshard"],
                   help="MoE implementations (model.moe.impl) to run for each expert count > 1")
    p.add_argument("--fused-adamw-experts", nargs="*", type=int, default=[],
                   help="also run these expert counts (1 = dense; each --impl) with torch AdamW fused=True")
    p.add_argument("--precision", choices=sorted(DS_CONFIGS), default="fp32",
                   help="precision of the main runs (ds_configs/zero2_<precision>.json)")
    p.add_argument("--bf16-experts", nargs="*", type=int, default=[1],
                   help="also run the demo model in bf16 with these expert counts (none: skip)")
    p.add_argument("--nproc", type=int, default=2, help="ranks")
    p.add_argument("--measured-steps", type=int, default=None, help="override the per-size measured steps")
    p.add_argument("--ds-configs", nargs="+", default=None,
                   help="DeepSpeed configs of the main-precision runs, each a full pass (default: zero2_<precision>)")
    p.add_argument("--rank-env", nargs="+", default=[], metavar="VAR=VALUE",
                   help="also run each main-precision run with this environment variable set (one variant each)")
    p.add_argument("--profile", action="store_true",
                   help="profile the measured steps' backward on every rank (bench.rank_probe BENCH_PROFILE=1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: demo only, dense + 4 experts (each --impl), 4 steps, no bf16")
    return p.parse_args(argv)


def run_plan(args: argparse.Namespace) -> list[tuple[str, int, str, str, bool]]:
    """(size, experts, impl, precision, fused AdamW) of every run, in order: per size the dense baseline,
    then each expert count x each impl; then the fused-AdamW repeats; then the demo bf16 runs."""
    def grid(sizes: list[str], experts: list[int], precision: str, fused: bool) -> list:
        out = []
        for size in sizes:
            for e in experts:
                for impl in (["-"] if e <= 1 else args.impl):
                    out.append((size, e, impl, precision, fused))
        return out

    runs = grid(args.sizes, args.experts, args.precision, False)
    runs += grid(args.sizes, args.fused_adamw_experts, args.precision, True)
    runs += grid(["demo"], args.bf16_experts, "bf16", False)
    return list(dict.fromkeys(runs))


def run_name(size: str, experts: int, impl: str, precision: str, fused: bool) -> str:
    moe = "dense" if experts <= 1 else f"moe{experts}" + ("" if impl == "gshard" else f"_{impl}")
    return f"{size}_{moe}_{precision}" + ("_fusedadamw" if fused else "")


def run_one(size: str, experts: int, impl: str, precision: str, fused: bool, args: argparse.Namespace,
            captions: Path, tokenizer: Path, peak_per_rank: float, ds_config: str | None = None,
            rank_env: str | None = None) -> dict[str, Any]:
    micro, warmup, measured = (QUICK_SCHEDULE if args.quick else SCHEDULE)[size]
    if precision == "bf16" and precision != args.precision and not args.quick:
        micro, warmup, measured = BF16_SCHEDULE
    measured = args.measured_steps or measured
    steps = warmup + measured
    log_every = warmup if measured % warmup == 0 else 1
    model_sets = common.MODEL_SIZES[size] + common.moe_sets(experts, args.nproc, impl)
    sets = (common.data_sets(captions, tokenizer) + model_sets
            + [f"batch.micro_batch_size={micro}", f"train.steps={steps}", f"train.log_every={log_every}",
               "train.save_every=0", "train.eval_every=0", "schedule.warmup_steps=2",
               f"train.peak_tflops={peak_per_rank:.6f}"])
    ds_config = ds_config if ds_config and precision == args.precision else DS_CONFIGS[precision]
    plan = common.plan(model_sets + [f"batch.micro_batch_size={micro}"], args.nproc, ds_config)
    name = run_name(size, experts, impl, precision, fused)
    if args.ds_configs and len(args.ds_configs) > 1 and precision == args.precision:
        name += "_" + Path(ds_config).stem
    env = {"BENCH_ADAMW_FUSED": "1" if fused else "0"}
    if rank_env:
        key, _, value = rank_env.partition("=")
        env[key] = value
        name += f"_env{args.rank_env.index(rank_env) + 1}"
    if args.profile:
        env.update(BENCH_PROFILE="1", BENCH_PROFILE_SKIP=str(warmup), BENCH_PROFILE_STEPS=str(measured))
    run = common.run_training(common.BENCH_RUNS / "train" / name, sets, args.nproc, ds_config, env=env)
    if fused and not all(p.get("adamw_fused") for p in run["probe"]):
        raise RuntimeError(f"{name}: the ranks did not switch to fused AdamW")
    window = common.measured_window(run["log"], warmup)
    mfu = window["samples_per_s"] * plan["train_flops_per_sample"] / (peak_per_rank * 1e12 * args.nproc)
    return {"name": name, "size": size, "experts": experts, "impl": impl, "precision": precision,
            "adamw_fused": fused, "micro_batch": micro, "ds_config": ds_config, "rank_env": rank_env,
            "run_dir": run["run_dir"],
            "warmup_steps": warmup, **window, "mfu": mfu, "plan": plan, "command": run["command"],
            "phases": common.phase_means(run["probe"], warmup), "wall_s": run["wall_s"], "probe": run["probe"],
            "load_average": run["load_average"]}


def profile_summary(rows: list[dict[str, Any]]) -> str:
    """Per run: the profiled backward (ms, mean over calls and ranks) and each named range / autograd node in
    ms and % of it; copies the ranks' op tables to bench/results/. Returns the printed text."""
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
    lines = []
    for r in rows:
        profiles = [p["profile"] for p in r["probe"] if "profile" in p]
        if not profiles:
            continue
        wall = statistics.mean(statistics.mean(p["backward_wall_ms"]) for p in profiles)
        parts: dict[str, list[float]] = {}
        for p in profiles:
            for key, entry in {**p["ranges"], **p["nodes"]}.items():
                parts.setdefault(key, []).append(entry["ms"])
        lines.append(f"{r['name']}: profiled backward {wall:.0f} ms (mean of {len(profiles)} ranks)")
        usage = [u for p in profiles for u in p.get("usage", [])]
        if usage:  # per backward call, mean over calls and ranks
            lines.append("    per backward: " + ", ".join(
                f"{k} {statistics.mean(u[k] for u in usage):.4g}" for k in ("minor_faults", "user_s", "sys_s")))
        for key, values in sorted(parts.items(), key=lambda kv: -statistics.mean(kv[1])):
            ms = statistics.mean(values)
            lines.append(f"    {key:34s} {ms:9.1f} ms  {ms / wall:6.1%}  (ranks: "
                         + ", ".join(f"{v:.0f}" for v in values) + ")")
        for table in sorted((Path(r["run_dir"]) / "probe").glob("profile_rank*.txt")):
            common.RESULTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(table, common.RESULTS / f"train_profile_{stamp}_{r['name']}_{table.stem.split('_')[-1]}.txt")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.sizes, args.experts, args.bf16_experts = ["demo"], [1, 4], []
    captions, tokenizer = common.ensure_synth()
    dtypes = tuple(sorted({args.precision} | ({"bf16"} if args.bf16_experts else set())))
    size, repeats = (512, 3) if args.quick else (1024, 10)
    peaks_before = measure(dtypes, args.nproc, size, repeats)
    per_rank = {d: peaks_before[d]["total"] / args.nproc for d in dtypes}
    print(f"measured matmul peak per rank (TFLOP/s, {args.nproc} concurrent): "
          + ", ".join(f"{d} {v:.3f}" for d, v in per_rank.items()) + f"; {common.load_line()}", flush=True)
    rows = []
    variants = [(c, e) for c in args.ds_configs or [None] for e in [None, *args.rank_env]]
    for size_name, experts, impl, precision, fused in run_plan(args):
        for ds_config, rank_env in variants if precision == args.precision else variants[:1]:
            rows.append(run_one(size_name, experts, impl, precision, fused, args, captions, tokenizer,
                                per_rank[precision], ds_config, rank_env))
            r = rows[-1]
            print(f"  {r['name']}: {r['step_time_s']:.3f} s/step, {r['samples_per_s']:.2f} samples/s, "
                  f"MFU {r['mfu']:.1%} ({common.load_line()})", flush=True)
    peaks_after = measure(dtypes, args.nproc, size, repeats)
    # MFU against the best peak seen (the conservative choice: a higher peak gives a lower MFU): the
    # concurrent total, or procs x the one-process figure, before or after the runs
    best = {d: max(max(p[d]["total"], args.nproc * p[d]["single"]) for p in (peaks_before, peaks_after))
            for d in dtypes}
    for r in rows:
        r["mfu"] = r["samples_per_s"] * r["plan"]["train_flops_per_sample"] / (best[r["precision"]] * 1e12)
        dense = next((d for d in rows if d["size"] == r["size"] and d["precision"] == r["precision"]
                      and d["experts"] <= 1 and d["adamw_fused"] == r["adamw_fused"]
                      and d["ds_config"] == r["ds_config"] and d["rank_env"] == r["rank_env"]), None)
        r["step_vs_dense"] = r["step_time_s"] / dense["step_time_s"] if dense else None
    print(f"\nvl_pretrain, {args.nproc} ranks, ZeRO-2, MoE top-1 every 2nd block (EP={args.nproc}); "
          f"peak (2 ranks) " + ", ".join(f"{d} {best[d]:.3f} TFLOP/s" for d in dtypes) + f"; {common.load_line()}")
    table = common.print_table(
        ["model", "experts", "impl", "optim", "prec", "params total/active", "GFLOP/sample", "micro", "s/step",
         "samples/s", "tokens/s", "MFU", "MoE x dense", "fwd/bwd/opt s", "data wait"],
        [[r["name"] if len(variants) > 1 else r["size"],
          r["experts"] if r["experts"] > 1 else "dense", r["impl"],
          "AdamW fused" if r["adamw_fused"] else "AdamW", r["precision"],
          f"{r['plan']['total_params'] / 1e6:.1f}M/{r['plan']['active_params_per_token'] / 1e6:.1f}M",
          r["plan"]["train_flops_per_sample"] / 1e9, r["micro_batch"], r["step_time_s"], r["samples_per_s"],
          r["tokens_per_s"], f"{r['mfu']:.1%}", f"{r['step_vs_dense']:.2f}x" if r["step_vs_dense"] else "-",
          "/".join(f"{r['phases'].get(k, float('nan')):.2f}" for k in ("forward_s", "backward_s", "step_s")),
          f"{r['data_wait_frac']:.1%}"] for r in rows])
    profile = profile_summary(rows) if args.profile else None
    common.write_result("train", {"settings": vars(args), "peaks_before": peaks_before,
                                  "peaks_after": peaks_after, "peak_total_tflops": best, "rows": rows,
                                  "table": table, "profile": profile})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
