"""Rank script: the DeepSpeed engine's eval outputs of a run's checkpoint on a fixed batch, for the export
round trip (tests/test_export.py).

    deepspeed --num_gpus 2 --module tests.dist.export_engine_outputs RUN_DIR BATCH.pt OUT_DIR

Rebuilds the run's task with its own EP size and engine config (``ds_config.json`` of the checkpoint: ZeRO
stage and all), loads the newest complete checkpoint into the engine, and writes what every rank computes on
the same batch in eval mode to OUT_DIR/rank{R}.pt: pooled, cls, hidden, the VQA logits and predicted answer ids.
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
        out = module.model.fuse(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        logits = module.heads["vqa"](out.pooled).float()
        pred = module.logits(batch).argmax(1)  # what VQATask.eval_outputs predicts
    ep_size = {m.ep_size for m in module.model.sparse_ffns().values()}
    torch.save({"pooled": out.pooled, "cls": out.cls, "hidden": out.hidden, "logits": logits, "pred": pred,
                "ep_size": sorted(ep_size), "zero_stage": engine.zero_optimization_stage()},
               Path(out_dir) / f"rank{dist.rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main(*[arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")][:3])  # the launcher adds it
