"""Data-parallel scaling on one machine: 1 rank vs 2 ranks with the same per-rank micro-batch.

    .venv/bin/python bench/bench_scaling.py                    # demo recipe (MoE 4 experts, EP = ranks), fp32
    .venv/bin/python bench/bench_scaling.py --experts 1 --repeats 2
    .venv/bin/python bench/bench_scaling.py --quick

Each run is the real launcher (``deepspeed --num_gpus N --module bench.rank_probe`` = ``pipeline.train``)
with ``launch/recipes/vl_pretrain.yaml`` on the cached synth corpus, ZeRO-2, eval off, 1 DataLoader worker
per rank; EP size = number of ranks (1 rank: all experts local). Throughput = global samples/s from the
run's ``train_log.jsonl`` over the steps after the warm-up. Scaling = samples/s(2 ranks) / samples/s(1 rank),
ideal 2.0 (target >= 1.8). Runs alternate 1, 2, 1, 2, ... when ``--repeats`` > 1; the best of each is kept.
Prints a table; writes JSON to bench/results/scaling_<time>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

DS_CONFIGS = {"fp32": "ds_configs/zero2_fp32.json", "bf16": "ds_configs/zero2_bf16.json"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=4, help="experts per MoE layer (1 = dense)")
    p.add_argument("--precision", choices=sorted(DS_CONFIGS), default="fp32")
    p.add_argument("--micro-batch", type=int, default=16, help="per-rank micro-batch (same for 1 and 2 ranks)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the figures")
    p.add_argument("--steps", type=int, default=12, help="measured steps (a multiple of --warmup)")
    p.add_argument("--repeats", type=int, default=1, help="runs per rank count (best kept)")
    p.add_argument("--quick", action="store_true", help="smoke run: micro-batch 4, 2+2 steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.micro_batch, args.warmup, args.steps, args.repeats = 4, 2, 2, 1
    captions, tokenizer = common.ensure_synth()
    results: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for nproc in (1, 2):
            sets = (common.data_sets(captions, tokenizer) + common.moe_sets(args.experts, nproc)
                    + [f"batch.micro_batch_size={args.micro_batch}", f"train.steps={args.warmup + args.steps}",
                       f"train.log_every={args.warmup}", "train.save_every=0", "train.eval_every=0",
                       "schedule.warmup_steps=2", "train.peak_tflops=1.0"])
            run = common.run_training(common.BENCH_RUNS / "scaling" / f"ranks{nproc}", sets, nproc,
                                      DS_CONFIGS[args.precision])
            window = common.measured_window(run["log"], args.warmup)
            results[nproc].append({**window, "command": run["command"], "load_average": run["load_average"]})
            print(f"  {nproc} rank(s): {window['samples_per_s']:.2f} samples/s ({common.load_line()})", flush=True)
    best = {n: max(rs, key=lambda r: r["samples_per_s"]) for n, rs in results.items()}
    ratio = best[2]["samples_per_s"] / best[1]["samples_per_s"]
    model = "dense" if args.experts <= 1 else f"MoE {args.experts} experts (EP = ranks)"
    print(f"\nvl_pretrain demo, {model}, {args.precision}, micro-batch {args.micro_batch} per rank, "
          f"{args.steps} measured steps; {common.load_line()}")
    table = common.print_table(
        ["ranks", "global batch", "s/step", "samples/s", "per rank samples/s", "data wait", "scaling vs 1 rank"],
        [[n, n * args.micro_batch, best[n]["step_time_s"], best[n]["samples_per_s"], best[n]["samples_per_s"] / n,
          f"{best[n]['data_wait_frac']:.1%}", f"{best[n]['samples_per_s'] / best[1]['samples_per_s']:.2f}x"]
         for n in (1, 2)])
    print(f"scaling 2 ranks / 1 rank = {ratio:.2f}x (target >= 1.8x: {'met' if ratio >= 1.8 else 'missed'})")
    common.write_result("scaling", {"settings": vars(args), "runs": results, "ratio": ratio, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
