"""Rank script: a dropless (``moe.impl: dropless``) run's checkpoint loaded into the DeepSpeed engine at the run's
own EP size and ZeRO stage; every rank writes its module state (its local experts' rows) and the model's eval
outputs on a fixed batch, for tests/test_moe_dropless_checkpoints.py.

    deepspeed --num_gpus 2 --module tests.dist.dropless_engine_state RUN_DIR BATCH.pt OUT_DIR

OUT_DIR/rank{R}.pt: {"state": module state dict, "pooled", "cls", "hidden", "ep_rank": per FFN, "ep_size",
"zero_stage"}.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline.run.distributed import shutdown_distributed
from tests.dist.common import engine_of_run


def main(run_dir: str, batch_path: str, out_dir: str) -> None:
    engine, dist = engine_of_run(run_dir)
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
