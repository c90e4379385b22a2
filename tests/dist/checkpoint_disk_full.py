"""Rank-side check, one process (world size 1, no launcher): a real DeepSpeed engine (ZeRO-2, bf16, MoE) saved
by pipeline.run.checkpoint.save_checkpoint into RUN_DIR at step 1, then at step 2 with every file write past
FSIZE_LIMIT bytes failing (RLIMIT_FSIZE: EFBIG). Prints one JSON line: the size estimate and the real size of
step 1, the error of step 2 and what is left on disk.
Run: RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=P \\
    python -m tests.dist.checkpoint_disk_full RUN_DIR
"""
from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from pipeline.run.checkpoint import save_checkpoint
from pipeline.run.disk_space import CheckpointSaveError, engine_share_bytes, folder_bytes
from pipeline.run.distributed import enable_stack_dumps, init_distributed, shutdown_distributed
from pipeline.run.run_dir import RunDir
from tests.dist.moe_zero_tokens import D, OneMoE

FSIZE_LIMIT = 64 * 1024  # smaller than the model-state file, larger than the RNG file


class Model(nn.Module):
    """A MoE layer and a dense 512x512 layer: weights and optimizer state dominate the checkpoint's size."""

    def __init__(self):
        super().__init__()
        self.moe, self.dense = OneMoE("indexed", ep_size=1), nn.Linear(512, 512)

    def forward(self, x_sd):
        return self.moe(x_sd)[0] + self.dense(x_sd.new_ones(512)).square().mean()


def main(run_dir: Path) -> dict:
    dist = init_distributed()
    torch.manual_seed(0)
    module = Model()
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(module.parameters()), "name": "all"})
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(groups, lr=1e-3), config=config)
    engine.backward(engine(torch.randn(16, D).to(torch.bfloat16)))
    engine.step()
    estimate = engine_share_bytes(engine, dist)
    save_checkpoint(engine, run_dir, 1, {"step": 1}, keep_last=1, dist=dist)
    size = folder_bytes(run_dir / "checkpoints" / "step_000001")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, resource.RLIM_INFINITY))
    try:
        save_checkpoint(engine, run_dir, 2, {"step": 2}, keep_last=1, dist=dist)
        error = None
    except CheckpointSaveError as exc:
        error = str(exc)
    run = RunDir(run_dir)
    return {"estimate": estimate, "size": size, "error": error, "complete": run.complete_tags(),
            "folders": sorted(p.name for p in run.checkpoints.iterdir())}


if __name__ == "__main__":
    enable_stack_dumps()
    print(json.dumps(main(Path(sys.argv[-1]))), flush=True)
    shutdown_distributed()
