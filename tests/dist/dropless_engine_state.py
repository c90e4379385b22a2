"""Rank script: a dropless (``moe.impl: dropless``) run's checkpoint loaded into the DeepSpeed engine at the run's
own EP size and ZeRO stage; every rank writes its module state (its local experts' rows) and the model's eval
outputs on a fixed batch, for tests/test_moe_dropless_checkpoints.py.

    deepspeed --num_gpus 2 --module tests.dist.dropless_engine_state RUN_DIR BATCH.pt OUT_DIR

OUT_DIR/rank{R}.pt: {"state": module state dict, "pooled", "cls", "hidden", "ep_rank": per FFN, "ep_size",
"zero_stage"}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pipeline.recipe import load_recipe
from pipeline.run.build import build_engine, build_model, build_task, load_tokenizer
from pipeline.run.checkpoint import weights_only_loads
from pipeline.run.distributed import enable_stack_dumps, init_distributed, shutdown_distributed
from pipeline.run.run_dir import RunDir
from pipeline.tasks import DistInfo


def main(run_dir: str, batch_path: str, out_dir: str) -> None:
    enable_stack_dumps()
    torch.set_num_threads(1)
    dist = init_distributed()
    run, tag = RunDir.resolve(run_dir)
    recipe = load_recipe(run.saved_recipe(run_dir), ["init_from=null", "init={}"])  # its EP size stays
    task = build_task(recipe, load_tokenizer(recipe.data.tokenizer), DistInfo(dist.rank, dist.world_size),
                      build_model(recipe, recipe.train.seed))
    engine, _ = build_engine(task, recipe, json.loads(run.ds_config_of(tag).read_text()))
    weights_only_loads(engine)
    loaded, _ = engine.load_checkpoint(str(run.checkpoints), tag=tag, load_optimizer_states=False,
                                       load_lr_scheduler_states=False)
    assert loaded is not None, f"DeepSpeed could not load {run.checkpoint(tag)}"
    engine.eval()
    batch = torch.load(batch_path)
    module = engine.module
    with torch.no_grad():
        out = module.model(**batch)
    ffns = module.model.sparse_ffns()
    torch.save({"state": {k: v.detach().clone() for k, v in module.state_dict().items()},
                "pooled": out.pooled, "cls": out.cls, "hidden": out.hidden,
                "ep_rank": {name: m.ep_rank for name, m in ffns.items()},
                "ep_size": sorted({m.ep_size for m in ffns.values()}),
                "zero_stage": engine.zero_optimization_stage()}, Path(out_dir) / f"rank{dist.rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main(*[arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")][:3])  # the launcher adds it
