"""MoE quality at small scale and equal steps: ``vl_pretrain`` on synth for a fixed number of steps, dense vs
8-expert MoE variants with equal active parameters (gshard at capacity 1.0 and 2.0, dropless with the
aux-loss-free expert bias and with the switch aux loss), 3 seeds each; validation losses (mean and spread)
and the expert load balance (coefficient of variation, dropped tokens) at the end of training.

    .venv/bin/python bench/bench_moe_quality.py                  # 3 seeds x 5 variants, 80 steps
    .venv/bin/python bench/bench_moe_quality.py --steps 300 --seeds 1 2 3 4 5 --variants dense dropless_bias
    .venv/bin/python bench/bench_moe_quality.py --quick          # smoke: 1 seed, 4 steps, every variant

Model (small, so the runs fit in minutes on 2 CPU cores): the ``vl_pretrain`` recipe's model (hidden 128,
4 heads, 4 blocks) with 1 fusion block. Variants (``--variants``; all top-1, ``--experts`` experts in blocks
1 and 3, EP 1):
  dense           no MoE layer (identical active parameters per token apart from the routers)
  gshard_cf1      ``moe.impl=gshard`` (DeepSpeed's capacity MoE), capacity factor 1.0, aux loss 0.01
  gshard_cf2      the same at capacity factor 2.0 (the demo recipe's); eval capacity factor stays the
                  recipe's (the default 1.0) for both
  dropless_bias   ``moe.impl=dropless``, ``balance=bias``: aux-loss-free expert-bias balancing (rate 1e-3)
  dropless_aux    ``moe.impl=dropless``, ``balance=aux``: the switch aux loss, 0.01
Each run: the real launcher, 1 rank, micro-batch 16, fp32, AdamW lr 5e-4, 10 warm-up steps then cosine, 2 runs
at a time (one core each); every variant of a seed gets the same ``train.seed`` (same data order and dense-weight
init). Validation = the full synth captions val split (400 pairs) once at the end (``RUN/eval/``): ITC loss
over the 400x400 similarity matrix, MLM loss/accuracy (fixed masks), ITM accuracy, i2t/t2i R@1. Balance = the
mean over the MoE FFNs (``moe/<layer>/<ffn>/...`` in train_log.jsonl) at the last log step of ``load_cv``
(std/mean of the expert load over that log window; 0 = balanced) and of ``dropped_frac`` (gshard; 0 for
dropless). Prints a table; writes JSON to bench/results/moe_quality_<time>.json.
"""
from __future__ import annotations

import argparse
import itertools
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
BALANCE = [("load_cv", "lower"), ("dropped_frac", "lower")]
AUX_LOSS_COEF = 0.01
# --set overrides per variant on top of common.moe_sets (dense: no MoE layer)
VARIANTS: dict[str, list[str]] = {
    "dense": [],
    "gshard_cf1": ["model.moe.impl=gshard", "model.moe.capacity_factor=1.0"],
    "gshard_cf2": ["model.moe.impl=gshard", "model.moe.capacity_factor=2.0"],
    "dropless_bias": ["model.moe.impl=dropless", "model.moe.balance=bias"],
    "dropless_aux": ["model.moe.impl=dropless", "model.moe.balance=aux"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="models to compare (default: all)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 4 steps")
    return p.parse_args(argv)


def variant_sets(variant: str, experts: int) -> list[str]:
    """``--set`` overrides of one variant's model (dense: no MoE layer; others top-1, ``experts`` experts)."""
    if variant == "dense":
        return common.moe_sets(1, 1)
    return common.moe_sets(experts, 1) + [f"model.moe.aux_loss_coef={AUX_LOSS_COEF}"] + VARIANTS[variant]


def balance_at_last_log(log: list[dict]) -> dict[str, float | dict[str, float]]:
    """Mean ``load_cv`` and ``dropped_frac`` over the MoE FFNs at the last log row that has them (per FFN too)."""
    rows = [r for r in log if any(k.startswith("moe/") and k.endswith("/load_cv") for k in r)]
    if not rows:
        return {}
    last = rows[-1]
    out: dict[str, float | dict[str, float]] = {"balance_step": last.get("step")}
    for stat, _ in BALANCE:
        per_ffn = {k[len("moe/"):-len(stat) - 1]: v for k, v in last.items()
                   if k.startswith("moe/") and k.endswith("/" + stat)}
        if per_ffn:
            out[stat] = statistics.mean(per_ffn.values())
            out[f"{stat}_per_ffn"] = per_ffn
    return out


def run_one(variant: str, seed: int, args: argparse.Namespace, captions: Path, tokenizer: Path) -> dict:
    sets = (common.data_sets(captions, tokenizer, eval_split="val") + SMALL_MODEL + variant_sets(variant, args.experts)
            + [f"batch.micro_batch_size={args.micro_batch}", f"train.steps={args.steps}",
               f"train.log_every={max(1, args.steps // 5)}", "train.save_every=0", "train.eval_every=0",
               f"schedule.warmup_steps={min(10, args.steps // 2)}", f"train.seed={seed}", "train.peak_tflops=1.0"])
    run = common.run_training(common.BENCH_RUNS / "quality" / f"{variant}_seed{seed}", sets, 1,
                              "ds_configs/zero2_fp32.json", timeout=3600)
    last = run["log"][-1] if run["log"] else {}
    return {"model": variant, "experts": 1 if variant == "dense" else args.experts, "seed": seed,
            "eval": common.read_eval(Path(run["run_dir"])), **balance_at_last_log(run["log"]),
            "train_loss_last": last.get("train/loss"), "wall_s": run["wall_s"], "command": run["command"]}


def value(run: dict, metric: str) -> float | None:
    return run["eval"].get(metric) if metric in run["eval"] else run.get(metric)


def summary(runs: list[dict], model: str, metric: str) -> tuple[float, float, list[float]]:
    values = [v for r in runs if r["model"] == model and (v := value(r, metric)) is not None]
    if not values:
        return float("nan"), float("nan"), []
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values


def compare(runs: list[dict], a: str, b: str, metric: str, better: str) -> str:
    """Which of ``a``, ``b`` has the better mean, and "clear" when the gap is larger than both spreads (a
    small-sample rule of thumb, not a test)."""
    (a_mean, a_sd, a_vals), (b_mean, b_sd, _) = summary(runs, a, metric), summary(runs, b, metric)
    diff = a_mean - b_mean
    if diff != diff:  # nan: a variant lacks the metric
        return "-"
    if diff == 0:
        return "tie"
    a_better = diff < 0 if better == "lower" else diff > 0
    clear = abs(diff) > max(a_sd, b_sd) and len(a_vals) > 1
    return f"{a if a_better else b} ({'clear' if clear else 'within spread'}, {diff:+.4f})"


def report(runs: list[dict], args: argparse.Namespace) -> dict:
    variants = args.variants
    print(f"\nvl_pretrain synth, {args.steps} steps, micro-batch {args.micro_batch}, 1 rank; {', '.join(variants)} "
          f"(MoE: top-1, {args.experts} experts, equal active params); mean ± stdev over seeds {args.seeds}; "
          f"{common.load_line()}")
    rows = []
    for metric, better in METRICS + BALANCE:
        cells = []
        for variant in variants:
            mean, sd, vals = summary(runs, variant, metric)
            cells.append(f"{mean:.4f} ± {sd:.4f}" if vals else "-")
        rows.append([metric, f"{better} is better", *cells])
    table = common.print_table(["metric", "", *variants], rows)
    pairs = [(a, b) for a, b in itertools.combinations(variants, 2)
             if {a, b} & {"dropless_bias", "dropless_aux"} or "dense" in (a, b)]
    verdicts = {f"{a} vs {b}": {m: compare(runs, a, b, m, better) for m, better in METRICS[:2] + BALANCE[:1]}
                for a, b in pairs}
    print("\npairwise (better mean: clear = gap larger than both spreads, else within spread; a - b):")
    for pair, by_metric in verdicts.items():
        print(f"  {pair}: " + "; ".join(f"{m} {v}" for m, v in by_metric.items()))
    per_seed = {v: {r["seed"]: (value(r, "itc_loss"), value(r, "mlm_loss")) for r in runs if r["model"] == v}
                for v in variants}
    return {"table": table, "verdicts": verdicts, "per_seed_itc_mlm": per_seed}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 4, args.seeds[:1]
    captions, tokenizer = common.ensure_synth()
    jobs = [(variant, seed) for seed in args.seeds for variant in args.variants]  # seed by seed

    def one(job: tuple[str, int]) -> dict:
        run = run_one(*job, args, captions, tokenizer)
        print(f"  {run['model']} seed {run['seed']}: itc {run['eval'].get('itc_loss', float('nan')):.3f} "
              f"mlm {run['eval'].get('mlm_loss', float('nan')):.3f} load_cv {run.get('load_cv', float('nan')):.3f} "
              f"dropped {run.get('dropped_frac', float('nan')):.3f}, {run['wall_s']:.0f} s ({common.load_line()})",
              flush=True)
        return run

    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(one, jobs))
    result = report(runs, args)
    common.write_result("moe_quality", {"settings": vars(args), "runs": runs, **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
