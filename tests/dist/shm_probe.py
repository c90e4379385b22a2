"""Rank side of tests/test_shm_cleanup.py: init through pipeline.run.distributed, then one all-reduce."""
import os

import torch
import torch.distributed as tdist

from pipeline.run.distributed import enable_stack_dumps, init_distributed, shm_workspace_path, shutdown_distributed

enable_stack_dumps()
dist = init_distributed()
x = torch.ones(4)
tdist.all_reduce(x)
print(f"rank {dist.rank} sum {x[0].item():.0f} workspace_left {os.path.exists(shm_workspace_path(dist.rank))}",
      flush=True)
shutdown_distributed()  # as pipeline.train does: no gloo abort (exit 250) at teardown
