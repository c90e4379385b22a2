"""Train one stage: the single entry point for every recipe (pretraining and fine-tuning).

    python -m pipeline.launch_guard -- deepspeed --num_gpus 2 --module pipeline.train \
        --recipe launch/recipes/vl_pretrain.yaml --ds-config ds_configs/zero2_bf16.json --output-dir runs/vl \
        [--set train.steps=50] [--resume auto]

Without CUDA the launcher starts CPU ranks over gloo (DS_ACCELERATOR=cpu). SIGTERM, SIGINT or SIGUSR1
save a checkpoint at the next step boundary (or finish the one being written) and exit 0; launch_guard
keeps the deepspeed runner and launch.py from killing the ranks first (launch/README.md). Run folder
layout: docs/INTERFACES.md section 5.
Exit codes: 2 configuration error, 3 non-finite training, 4 a checkpoint not saved (no room on its file
system: checked before writing; or a write failed), with one line naming the folder and the free space;
5 unreadable training data past the failure budget (data.max_consecutive_failures / max_failure_share).
`kill -USR2 RANK_PID` prints the rank's Python stacks.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.config_utils import ConfigError

log = logging.getLogger("pipeline.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="stage recipe YAML (launch/recipes/*.yaml)")
    parser.add_argument("--ds-config", required=True, help="engine settings JSON (ds_configs/*.json)")
    parser.add_argument("--output-dir", required=True, help="run folder (checkpoints, logs, evals)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set train.steps=10 (repeatable)")
    parser.add_argument("--resume", choices=["auto", "never"], default="never",
                        help="auto: continue from the newest complete checkpoint in --output-dir")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # launcher arg
    return parser


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)


def input_error(args: argparse.Namespace) -> str | None:
    """The recipe's and its inputs' problems as one message (``pipeline.run.preflight``), or None."""
    from pipeline.run.preflight import check_run_inputs, require_no_problems
    from pipeline.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        require_no_problems(check_run_inputs(recipe), args.recipe)
    except ConfigError as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.data.faults import DataFailure
    from pipeline.run.disk_space import CheckpointSaveError
    from pipeline.run.distributed import enable_stack_dumps, gather_objects, init_distributed, shutdown_distributed
    from pipeline.run.step_guard import NonFiniteTraining
    from pipeline.run.trainer import Trainer

    enable_stack_dumps()
    dist = init_distributed()
    setup_logging(dist.rank)
    error = gather_objects(input_error(args) if dist.is_main else None)[0]  # rank 0 checks, all ranks learn
    if error is not None:
        if dist.is_main:
            print(f"pipeline.train: configuration error: {error}", file=sys.stderr)
        shutdown_distributed()
        return 2
    try:
        trainer = Trainer.create(args.recipe, args.ds_config, Path(args.output_dir), args.overrides,
                                 args.resume == "auto", dist)
    except ConfigError as exc:
        if dist.is_main:
            print(f"pipeline.train: configuration error: {exc}", file=sys.stderr)
        return 2
    rc = 0
    try:
        trainer.fit()
    except NonFiniteTraining as exc:  # raised on every rank at the same step (decisions are all-reduced)
        if dist.is_main:
            print(f"pipeline.train: stopped: {exc}", file=sys.stderr)
        rc = 3
    except CheckpointSaveError as exc:  # also the same on every rank (pipeline.run.checkpoint.save_checkpoint)
        if dist.is_main:
            print(f"pipeline.train: stopped: {exc}", file=sys.stderr)
        rc = 4
    except DataFailure as exc:  # this rank's own data: its peers may be in another collective, so no
        # barrier; the launcher stops them when this rank exits non-zero (gloo fails their next collective)
        print(f"pipeline.train: stopped on rank {dist.rank}: {exc}", file=sys.stderr)
        return 5  # after ``finally`` closes the trainer
    finally:
        trainer.close()
    shutdown_distributed()
    return rc


if __name__ == "__main__":
    status = main()  # --help exits inside, before torch is imported
    from pipeline.run.distributed import exit_process

    exit_process(status)
