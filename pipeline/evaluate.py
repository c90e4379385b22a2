"""Evaluate a fine-tuned checkpoint on a downstream split, whatever EP size it was trained with.

    python -m pipeline.evaluate --checkpoint runs/demo/vqa --task vqa --data runs/demo/data/vqa --split val
    python -m pipeline.evaluate --checkpoint runs/demo/retrieval/step_000200 --task retrieval \
        --data runs/demo/data/retrieval --split test --itm-rerank 16 --output retrieval_test.json
    deepspeed --num_gpus 2 --module pipeline.evaluate --checkpoint ... (same flags; ranks split the data)

The model is rebuilt from the run's ``resolved_recipe.yaml`` with ``moe.ep_size=1`` and loaded from the
merged DeepSpeed files (dense + one file per expert, ``pipeline.run.checkpoint_merge``), so no all-to-all
happens at eval and any world size works. Each rank evaluates its share of the split in fixed-size
padded batches; outputs are gathered and every rank computes the metrics; rank 0 prints a table with the
task's baseline next to each score and writes the metrics JSON and the predictions in the benchmark's
submission format (``Task.write_predictions``: VQA ``[{"question_id", "answer"}]``, NLVR2 CSV, ...).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config_utils import ConfigError

log = logging.getLogger("pipeline.evaluate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="RUN_DIR (newest complete checkpoint) or RUN_DIR/TAG")
    p.add_argument("--task", required=True, help="the task the checkpoint was fine-tuned for: a name in "
                   "pipeline.tasks.TASKS whose class has a headline metric (not a pretraining one), or the "
                   "recipe's import path module:Class")
    p.add_argument("--data", required=True, help="data_prep output folder (manifest.json) to evaluate on")
    p.add_argument("--split", default="val", help="split name in the manifest")
    p.add_argument("--output", default=None, help="metrics JSON path (default RUN/eval/<task>_<split>_<tag>.json)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per rank per forward (fixed)")
    p.add_argument("--itm-rerank", type=int, default=0,
                   help="shorthand for --set task_options.itm_rerank=K (re-rank each query's top-K by ITM); "
                        "for audio_retrieval task_options.atm_rerank=K (by ATM)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="task_options.KEY=VALUE",
                   help="override one of the task's options of the run's recipe (repeatable)")
    p.add_argument("--eval-capacity-factor", type=float, default=None,
                   help="override moe.eval_capacity_factor (e.g. num_experts: no token dropping at eval)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 when the run's ds_config trained in bf16, else fp32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher arg
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.batch_size <= 0 or args.itm_rerank < 0:
        p.error("--batch-size must be > 0 and --itm-rerank >= 0")
    bad = [item for item in args.overrides if not item.startswith("task_options.") or "=" not in item]
    if bad:
        p.error(f"--set {bad[0]!r}: expected task_options.KEY=VALUE")
    from pipeline.tasks import evaluable_tasks, get_task_class  # after parsing: --help must not import torch

    try:
        evaluable = get_task_class(args.task).headline is not None
    except ConfigError:
        evaluable = False
    if not evaluable:
        p.error(f"--task {args.task!r}: choose a task that evaluates: {evaluable_tasks()} (or the import path "
                "of a task class with a headline metric)")
    return args


def task_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set task_options.*`` items for the run's recipe (``--itm-rerank K`` included: the task's own
    re-rank option, ``atm_rerank`` for a task whose options have that one instead)."""
    if not args.itm_rerank:
        return [*args.overrides]
    import dataclasses

    from pipeline.tasks import get_task_class

    fields = {f.name for f in dataclasses.fields(get_task_class(args.task).Options)}
    option = "atm_rerank" if "atm_rerank" in fields and "itm_rerank" not in fields else "itm_rerank"
    return [*args.overrides, f"task_options.{option}={args.itm_rerank}"]


def check_inputs(args: argparse.Namespace) -> None:
    """Before any rank work: the checkpoint exists, was trained for ``--task``, and ``--data``/``--split``,
    the run's vocabulary (its first training folder) and tokenizer are usable (ConfigError otherwise)."""
    from pipeline.run.preflight import eval_input_problems, require_no_problems
    from pipeline.run.run_dir import RunDir
    from pipeline.recipe import load_recipe

    run, _ = RunDir.resolve(args.checkpoint)
    recipe = load_recipe(run.saved_recipe(f"--checkpoint {args.checkpoint}"),
                         ["init_from=null", "model.moe.ep_size=1", *task_overrides(args)])
    require_no_problems(eval_input_problems(recipe, args.task, args.data, args.split),
                        f"pipeline.evaluate --checkpoint {args.checkpoint}")


def eval_dtype(choice: str, ds_config: Path) -> Any:
    """The --dtype choice; auto: bf16 when ``ds_config`` (the checkpoint's engine config) trained in bf16."""
    import torch

    if choice != "auto":
        return torch.bfloat16 if choice == "bf16" else torch.float32
    if ds_config.is_file() and json.loads(ds_config.read_text()).get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float32


def format_table(metrics: dict[str, float], baseline: dict[str, float], baseline_name: str) -> str:
    rows = [("metric", "score", baseline_name)]
    for key, value in metrics.items():
        if key.startswith("num_"):
            rows.append((key, f"{value:.0f}", ""))
            continue
        base = baseline.get(key)
        rows.append((key, f"{100 * value:6.2f}", f"{100 * base:6.2f}" if base is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from pipeline.run.run_dir import RunDir
    from pipeline.data.loader import build_eval_loader, num_samples
    from pipeline.run.distributed import init_distributed, single_process
    from pipeline.run.eval_loop import load_for_eval, require_complete, run_eval
    from pipeline.recipe import SourceConfig

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by the deepspeed launcher
    dist = init_distributed() if launched else single_process()
    run_dir, tag = RunDir.resolve(args.checkpoint)
    ckpt_dir = run_dir.checkpoint(tag)
    overrides = task_overrides(args)
    if args.eval_capacity_factor is not None:
        overrides.append(f"model.moe.eval_capacity_factor={args.eval_capacity_factor}")
    run = load_for_eval(ckpt_dir, dist, overrides)
    run.task.to(eval_dtype(args.dtype, run_dir.ds_config_of(tag)))
    source = SourceConfig(path=args.data, split=args.split)
    loader = build_eval_loader(source, run.recipe.data, run.task, args.batch_size, dist.rank, dist.world_size)
    count = num_samples(args.data, args.split)
    steps = -(-count // (args.batch_size * dist.world_size)) if count else None
    show = not args.no_progress and dist.is_main
    started = time.time()
    metrics, outputs = run_eval(run.task, run.task,
                                tqdm(loader, total=steps, desc=f"eval {args.task}/{args.split}",
                                     unit="batch", file=sys.stderr, disable=not show),
                                dist, args.batch_size)
    require_complete(metrics, f"--data {args.data} --split {args.split}")  # every rank: all exit 2
    with tqdm(desc="after eval", unit="batch", file=sys.stderr, disable=not show) as bar:
        metrics.update(run.task.extra_metrics(outputs, args.batch_size, bar))  # e.g. a re-rank by its options
    baseline_name, baseline = run.task.baseline(outputs, Path(args.data))
    result = {"task": args.task, "checkpoint": str(ckpt_dir), "data": args.data, "split": args.split,
              "world_size": dist.world_size, "seconds": round(time.time() - started, 2),
              "metrics": metrics, "baseline": {"name": baseline_name, "metrics": baseline}}
    if dist.is_main:
        print(format_table(metrics, baseline, baseline_name), flush=True)
        out_path = Path(args.output) if args.output else run_dir.eval_path(f"{args.task}_{args.split}_{tag}")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        pred_path = run.task.write_predictions(outputs, out_path.with_name(out_path.stem + "_predictions"))
        if pred_path is not None:  # the benchmark's submission format (JSON; NLVR2: CSV)
            result["predictions"] = str(pred_path)
        out_path.write_text(json.dumps(result, indent=2))
        print(f"wrote {out_path}" + (f" and {pred_path}" if pred_path else ""), flush=True)
    if metrics.get("num_scored") == 0:  # e.g. a VQA test split: predictions only, no accuracy to report
        raise ConfigError(f"--data {args.data} --split {args.split}: no sample has a ground-truth answer, so "
                          "there is no accuracy; the predictions file is for the benchmark's server")
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from pipeline.run.distributed import enable_stack_dumps, shutdown_distributed

    enable_stack_dumps()

    try:
        check_inputs(args)  # every rank, no process group yet: all exit 2 together, rank 0 says why
        evaluate(args)
    except (ConfigError, FileNotFoundError) as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pipeline.evaluate: error: {exc}", file=sys.stderr)
        return 2
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    status = main()  # --help exits inside, before torch is imported
    from pipeline.run.distributed import exit_process

    exit_process(status)
