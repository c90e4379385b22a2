"""Rank side of tests/test_shm_comm_op.py: init through pipeline.run.distributed, one all-reduce and one
all-gather, then report whether DeepSpeed's CPU SHM comm op was loaded."""
import torch
import torch.distributed as tdist

from pipeline.run.distributed import enable_stack_dumps, init_distributed, shutdown_distributed

enable_stack_dumps()
dist = init_distributed()
x = torch.full((4,), float(dist.rank + 1))
tdist.all_reduce(x)
gathered = [torch.zeros(1) for _ in range(dist.world_size)]
tdist.all_gather(gathered, torch.tensor([float(dist.rank)]))
backend = __import__("deepspeed").comm.comm.cdb
print(f"rank {dist.rank} sum {x[0].item():.0f} gathered {[int(g.item()) for g in gathered]} "
      f"shm_op {backend.shm_comm_op is not None} "
      f"inference_op {hasattr(torch.ops.deepspeed, 'inference_all_reduce_')}", flush=True)
shutdown_distributed()  # as pipeline.train does: no gloo abort (exit 250) at teardown
