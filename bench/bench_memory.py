"""Peak memory per rank for ZeRO-0/1/2 with 2 ranks vs what ``pipeline.plan --json`` predicts.

    .venv/bin/python bench/bench_memory.py                      # demo recipe (MoE 4 experts, EP 2), fp32
    .venv/bin/python bench/bench_memory.py --size large --precision bf16 --stages 1 2
    .venv/bin/python bench/bench_memory.py --quick
    .venv/bin/python bench/bench_memory.py --impl dropless      # model.moe.impl of the MoE layers (default gshard)

Each run: ``deepspeed --num_gpus 2 --module bench.rank_probe`` (= ``pipeline.train``, unchanged) with
``launch/recipes/vl_pretrain.yaml`` + ``ds_configs/zero{S}_{precision}.json`` on the cached synth corpus,
``--steps`` optimizer steps, eval off. ``bench/rank_probe.py`` reads /proc/self/status of each rank:
- baseline: resident set after importing torch/deepspeed/pipeline, before the process group, model,
  engine and data exist (interpreter + libraries, ~0.25 GiB; not something the planner models);
- peak: VmHWM (peak resident set) from just after those imports until the final checkpoint starts: model
  build, engine (weights, gradients, optimizer states, DeepSpeed buffers), every step's activations, and
  allocator slack. DataLoader worker processes are not included (separate processes).
- measured = peak - baseline (what the plan predicts); the full peak is listed too.
Split (``--split``): one more run of the last stage at micro-batch 1; the difference of the
measured figures / (micro-batch - 1) is the activation cost per sample, set against the plan's activation
estimate per sample, and the micro-batch-1 figure minus one sample is the fixed part (model states,
DeepSpeed buffers, allocator) set against the plan's model states.
Prediction: ``memory_per_rank_bytes`` from ``pipeline.plan --json`` (device auto: the plan's CPU model on a
CPU host = model states + activations + runtime overhead), otherwise
``(model_states_gib_per_rank + activations_gib_per_rank_est)`` GiB. Target: measured within 15% of it.
Prints a table; writes JSON to bench/results/memory_<time>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

GIB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--size", choices=sorted(common.MODEL_SIZES), default="demo")
    p.add_argument("--experts", type=int, default=4, help="experts per MoE layer, EP 2 (1 = dense)")
    p.add_argument("--impl", choices=["gshard", "dropless"], default="gshard", help="model.moe.impl of the MoE layers")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    p.add_argument("--split", action="store_true",
                   help="one more run at micro-batch 1 to split fixed vs per-sample memory")
    p.add_argument("--quick", action="store_true", help="smoke run: ZeRO-2 only, 1 step, micro-batch 4")
    return p.parse_args(argv)


def predicted_bytes(plan: dict[str, Any]) -> tuple[float, str]:
    if "memory_per_rank_bytes" in plan:
        return float(plan["memory_per_rank_bytes"]), "memory_per_rank_bytes"
    return ((plan["model_states_gib_per_rank"] + plan["activations_gib_per_rank_est"]) * GIB,
            "model_states_gib_per_rank + activations_gib_per_rank_est")


def measure_stage(stage: int, args: argparse.Namespace, model_sets: list[str], captions: Path, tokenizer: Path,
                  suffix: str = "") -> list[dict[str, Any]]:
    """One 2-rank run with ds_configs/zero{stage}_{precision}.json: a row per rank."""
    ds_config = f"ds_configs/zero{stage}_{args.precision}.json"
    plan = common.plan(model_sets, 2, ds_config)
    predicted, source = predicted_bytes(plan)
    sets = common.data_sets(captions, tokenizer) + model_sets + [
        f"train.steps={args.steps}", "train.log_every=1", "train.save_every=0", "train.eval_every=0",
        "schedule.warmup_steps=1", "train.peak_tflops=1.0"]
    run = common.run_training(common.BENCH_RUNS / "memory" / f"zero{stage}_{args.impl}{suffix}", sets, 2, ds_config)
    rows = []
    for probe in run["probe"]:
        peak = probe.get("peak_before_save", probe["peak"])
        measured = peak - probe["baseline_rss"]
        rows.append({"stage": stage, "rank": probe["rank"], "baseline": probe["baseline_rss"], "peak": peak,
                     "peak_with_save": probe["peak"], "measured": measured, "predicted": predicted,
                     "prediction_source": source, "ratio": measured / predicted,
                     "model_states_gib": plan["model_states_gib_per_rank"],
                     "activations_gib": plan["activations_gib_per_rank_est"],
                     "overhead_gib": plan.get("runtime_overhead_gib_per_rank", 0.0), "device": plan.get("device"),
                     "hwm_reset": probe["hwm_reset"],
                     "rss_parts": probe.get("rss_parts_before_save", {}), "command": run["command"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.stages, args.steps, args.micro_batch = [2], 1, 4
    captions, tokenizer = common.ensure_synth()
    impl = [f"model.moe.impl={args.impl}"] if args.experts > 1 else []
    model_sets = (common.MODEL_SIZES[args.size] + common.moe_sets(args.experts, 2) + impl
                  + [f"batch.micro_batch_size={args.micro_batch}"])
    rows = []
    for stage in args.stages:
        rows += measure_stage(stage, args, model_sets, captions, tokenizer)
        print(f"  ZeRO-{stage}: " + ", ".join(f"rank {r['rank']} {r['measured'] / GIB:.3f} GiB"
                                              for r in rows if r["stage"] == stage) + f" ({common.load_line()})",
              flush=True)
    split = {}
    if args.split and args.micro_batch > 1:
        stage = args.stages[-1]
        one = measure_stage(stage, args, model_sets[:-1] + ["batch.micro_batch_size=1"], captions, tokenizer, "_mb1")
        full = [r for r in rows if r["stage"] == stage]
        per_sample = (sum(r["measured"] for r in full) - sum(r["measured"] for r in one)) / len(full) \
            / (args.micro_batch - 1)
        fixed = sum(r["measured"] for r in one) / len(one) - per_sample
        split = {"stage": stage, "per_sample_measured": per_sample,
                 "per_sample_predicted": full[0]["activations_gib"] * GIB / args.micro_batch,
                 "fixed_measured": fixed, "model_states_predicted": full[0]["model_states_gib"] * GIB}
    model = "dense" if args.experts <= 1 else f"MoE {args.experts} experts EP 2, {args.impl}"
    print(f"\nvl_pretrain {args.size} ({model}), {args.precision}, 2 ranks, micro-batch {args.micro_batch}, "
          f"{args.steps} steps; GiB per rank; measured = peak RSS - baseline; {common.load_line()}")
    table = common.print_table(
        ["ZeRO", "rank", "baseline", "peak RSS", "measured", "predicted (states + acts + runtime)",
         "measured / predicted", "within 15%"],
        [[f"ZeRO-{r['stage']}", r["rank"], r["baseline"] / GIB, r["peak"] / GIB, r["measured"] / GIB,
          f"{r['predicted'] / GIB:.3f} ({r['model_states_gib']:.3f} + {r['activations_gib']:.3f} + "
          f"{r['overhead_gib']:.3f})",
          f"{r['ratio']:.2f}", "yes" if abs(r["ratio"] - 1) <= 0.15 else "no"] for r in rows])
    parts = [[f"ZeRO-{r['stage']}", r["rank"], *(r["rss_parts"].get(k, 0) / 2**20 for k in
                                                   ("RssAnon", "RssFile", "RssShmem"))] for r in rows]
    print("\nresident set by kind at the end of training (MiB; includes the baseline)")
    table += "\n\n" + common.print_table(["ZeRO", "rank", "anonymous (heap)", "file (libraries)",
                                           "shared memory"], parts)
    if split:
        print(f"\nsplit (ZeRO-{split['stage']}, micro-batch {args.micro_batch} vs 1), MiB per rank")
        table += "\n\n" + common.print_table(
            ["part", "measured", "predicted", "measured / predicted"],
            [["per sample (activations)", split["per_sample_measured"] / 2**20,
              split["per_sample_predicted"] / 2**20, split["per_sample_measured"] / split["per_sample_predicted"]],
             ["fixed (model states + buffers)", split["fixed_measured"] / 2**20,
              split["model_states_predicted"] / 2**20, split["fixed_measured"] / split["model_states_predicted"]]])
    common.write_result("memory", {"settings": vars(args), "rows": rows, "split": split, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
