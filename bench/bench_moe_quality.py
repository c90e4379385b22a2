"""MoE vs dense quality at small scale: ``vl_pretrain`` on synth for a fixed number of steps, dense vs 8-expert
MoE with equal active parameters, 3 seeds each; validation losses (mean and spread).

    .venv/bin/python bench/bench_moe_quality.py                  # 3 seeds x (dense, MoE-8), 80 steps
    .venv/bin/python bench/bench_moe_quality.py --steps 300 --seeds 1 2 3 4 5
    .venv/bin/python bench/bench_moe_quality.py --quick

Model (small, so 6 runs fit in minutes on 2 CPU cores): hidden 128, 4 heads, 4 blocks (top 1 = fusion),
image 64 / patch 8, text 32. MoE = top-1, 8 experts in blocks 1 and 3 (every 2nd), capacity factor 1.0,
aux-loss 0.01 (recipe defaults); dense = the same model with no MoE layer (identical active parameters
per token apart from the routers). Each run: the real launcher, 1 rank (EP 1), micro-batch 16, fp32,
AdamW lr 5e-4, 10 warm-up steps then cosine; the dense and MoE run of a seed run at the same time (one
core each), with the same seed (same data order and dense-weight init). Seed s sets ``train.seed``.
Validation = the full synth captions val split (400 pairs) once at the end (``RUN/eval/``): ITC loss
over the 400x400 similarity matrix, MLM loss/accuracy (fixed masks), ITM accuracy, i2t/t2i R@1.
Prints a table; writes JSON to bench/results/moe_quality_<time>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

SMALL_MODEL = ["model.hidden_size=128", "model.num_heads=4", "model.num_layers=4", "model.num_fusion_layers=1"]
METRICS = [("itc_loss", "lower"), ("mlm_loss", "lower"), ("mlm_acc", "higher"), ("itm_acc", "higher"),
           ("i2t_r1", "higher"), ("t2i_r1", "higher")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 4 steps")
    return p.parse_args(argv)


def run_pair(seed: int, args: argparse.Namespace, captions: Path, tokenizer: Path) -> list[dict]:
    def one(experts: int) -> dict:
        name = "dense" if experts <= 1 else f"moe{experts}"
        sets = (common.data_sets(captions, tokenizer, eval_split="val") + SMALL_MODEL + common.moe_sets(experts, 1)
                + [f"batch.micro_batch_size={args.micro_batch}", f"train.steps={args.steps}",
                   f"train.log_every={max(1, args.steps // 5)}", "train.save_every=0", "train.eval_every=0",
                   f"schedule.warmup_steps={min(10, args.steps // 2)}", f"train.seed={seed}",
                   "train.peak_tflops=1.0"])
        run = common.run_training(common.BENCH_RUNS / "quality" / f"{name}_seed{seed}", sets, 1,
                                  "ds_configs/zero2_fp32.json")
        last = run["log"][-1] if run["log"] else {}
        return {"model": name, "experts": experts, "seed": seed, "eval": common.read_eval(Path(run["run_dir"])),
                "train_loss_last": last.get("train/loss"), "wall_s": run["wall_s"], "command": run["command"]}

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, [1, args.experts]))


def summary(runs: list[dict], model: str, metric: str) -> tuple[float, float, list[float]]:
    values = [r["eval"][metric] for r in runs if r["model"] == model and metric in r["eval"]]
    if not values:
        return float("nan"), float("nan"), []
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 4, args.seeds[:1]
    captions, tokenizer = common.ensure_synth()
    runs = []
    for seed in args.seeds:
        runs += run_pair(seed, args, captions, tokenizer)
        print(f"  seed {seed}: " + ", ".join(f"{r['model']} itc {r['eval'].get('itc_loss', float('nan')):.3f} "
                                             f"mlm {r['eval'].get('mlm_loss', float('nan')):.3f}"
                                             for r in runs[-2:]) + f" ({common.load_line()})", flush=True)
    moe = f"moe{args.experts}"
    rows, verdicts = [], {}
    for metric, better in METRICS:
        d_mean, d_sd, d_vals = summary(runs, "dense", metric)
        m_mean, m_sd, m_vals = summary(runs, moe, metric)
        diff = m_mean - d_mean
        moe_better = diff < 0 if better == "lower" else diff > 0
        # "clear" when the gap is larger than both spreads (a small-sample rule of thumb, not a test)
        clear = abs(diff) > max(d_sd, m_sd) and len(d_vals) > 1
        verdicts[metric] = ("tie" if diff == 0 else ("MoE" if moe_better else "dense")
                            + (" (clear)" if clear else " (within spread)"))
        rows.append([metric, f"{better} is better", f"{d_mean:.4f} ± {d_sd:.4f}", f"{m_mean:.4f} ± {m_sd:.4f}",
                     f"{diff:+.4f}", verdicts[metric]])
    print(f"\nvl_pretrain synth, {args.steps} steps, micro-batch {args.micro_batch}, 1 rank; dense vs MoE "
          f"{args.experts} experts (top-1, equal active params); mean ± stdev over seeds {args.seeds}; "
          f"{common.load_line()}")
    table = common.print_table(["val metric", "", "dense", f"MoE-{args.experts}", "MoE - dense", "better"], rows)
    loss_wins = [verdicts[m] for m in ("itc_loss", "mlm_loss")]
    verdict = ("MoE wins on both validation losses" if all(v.startswith("MoE (clear") for v in loss_wins) else
               "dense wins on both validation losses" if all(v.startswith("dense (clear") for v in loss_wins) else
               "no clear winner on the validation losses")
    print(f"verdict: {verdict}")
    common.write_result("moe_quality", {"settings": vars(args), "runs": runs, "verdicts": verdicts,
                                        "verdict": verdict, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
