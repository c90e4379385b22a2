"""Process-group facts and the few collectives the loop needs (rank logic lives here, not in data code)."""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as tdist


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: int = 30) -> Dist:
    """Initialise the default process group through DeepSpeed (NCCL on CUDA, gloo on CPU)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not tdist.is_initialized():
        deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
    rank, world = tdist.get_rank(), tdist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by the deepspeed launcher
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        accel.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(accel.device_name())
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


def single_process() -> Dist:
    return Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _ready() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def _backend_device(device: torch.device) -> torch.device:
    return device if tdist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_max(value: float, device: torch.device) -> float:
    if not _ready():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_backend_device(device))
    tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return float(tensor.item())


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum ``tensor`` over all ranks (returns a new tensor on the input's device)."""
    if not _ready():
        return tensor
    work = tensor.detach().to(_backend_device(device), torch.float64)
    tdist.all_reduce(work)
    return work.to(tensor.device)


def gather_objects(obj: Any) -> list[Any]:
    if not _ready():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _ready():
        tdist.barrier()
