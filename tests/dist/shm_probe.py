"""Rank side of tests/test_shm_cleanup.py: init through pipeline.distributed, then one all-reduce."""
import os

import torch
import torch.distributed as tdist

from pipeline.distributed import init_distributed, shm_workspace_path

dist = init_distributed()
x = torch.ones(4)
tdist.all_reduce(x)
print(f"rank {dist.rank} sum {x[0].item():.0f} workspace_left {os.path.exists(shm_workspace_path(dist.rank))}",
      flush=True)
