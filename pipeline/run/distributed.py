"""Process-group facts and the few collectives the loop needs (rank logic lives here, not in data code)."""
from __future__ import annotations

import dataclasses
import datetime
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

DEFAULT_PREEMPT_GRACE_S = 180.0  # as pipeline.launch_guard; the guard passes its own in PREEMPT_GRACE_S

@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def enable_stack_dumps() -> None:
    """``kill -USR2 PID`` prints every thread's Python stack to stderr, as does a crash (faulthandler; forked DataLoader
    workers inherit it). Entry points call it first; the test helpers use it to show where a hung run is.
    A ``sys.stderr`` without a file descriptor (captured in-process) leaves the dumps to ``sys.__stderr__``."""
    stream = sys.stderr
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        stream = sys.__stderr__
    faulthandler.register(signal.SIGUSR2, file=stream, all_threads=True)
    faulthandler.enable(file=stream, all_threads=True)  # and on a fatal signal (SIGSEGV, SIGABRT, ...)


def init_distributed(timeout_minutes: int = 30) -> Dist:
    """Initialise the default process group through DeepSpeed (NCCL on CUDA, gloo on CPU)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not tdist.is_initialized():
        skip_shm_comm_op()
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


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from building its CPU SHM comm op; call before ``deepspeed.init_distributed`` or
    ``deepspeed.initialize`` (which initialises the process group when nothing has).

    On a CPU host ``deepspeed.comm.torch.TorchBackend`` JIT-compiles ``deepspeed_shm_comm`` (C++, ninja) in
    every new environment, under torch's extension build lock, which has no timeout, and maps a 66 MiB
    /dev/shm workspace per rank that DeepSpeed 0.19.8 never unlinks. The op serves one call only,
    ``inference_all_reduce`` (DeepSpeed-Inference tensor parallelism), which this pipeline never makes:
    training's all_reduce / all_gather / reduce_scatter go to ``torch.distributed`` (gloo) whether the op is
    built or not (deepspeed/comm/torch.py). Without it a first launch skips the compile, CPU nodes need no
    compiler, and a rank killed mid-build can no longer leave a lock that hangs every later rank.
    On CUDA the accelerator has no such op and this changes nothing."""
    import importlib

    # importlib, not ``import deepspeed.comm.torch as m``: that name resolves to the ``torch`` package
    # deepspeed.comm imports (an attribute of the same name), and the setattr would miss
    importlib.import_module("deepspeed.comm.torch").build_shm_op = _no_shm_comm_op


def _no_shm_comm_op() -> None:
    return None  # TorchBackend then leaves inference_all_reduce to torch.distributed.all_reduce


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


def shutdown_distributed() -> None:
    """Wait for every rank, then destroy the process groups, before interpreter teardown. Left to
    teardown, a gloo rank that exits while its peer still holds the connection can abort with
    "terminate called without an active exception" (exit 250) after its work is done."""
    if tdist.is_available() and tdist.is_initialized():
        barrier()
        tdist.destroy_process_group()


def exit_process(rc: int) -> None:
    """End a rank's process with ``rc`` once its work is done and its process groups are destroyed: flush
    logs and stdio, then ``os._exit`` without interpreter teardown. In teardown, C++ threads of the
    communication stack (gloo's, DeepSpeed's groups still referenced from Python) are destroyed in no set
    order, and a rank whose work had finished could still abort with "terminate called without an active
    exception" (SIGABRT, exit 250, seen in a CI run), failing a finished job."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


# ------------------------------------------------------------------------------------------ launcher
def _is_launcher(cmdline: list[str]) -> bool:
    """deepspeed's launch.py, the ``deepspeed`` runner script, or ``pipeline.launch_guard``."""
    return ("deepspeed.launcher.launch" in cmdline or "pipeline.launch_guard" in cmdline
            or "deepspeed.launcher.runner" in cmdline or any(Path(arg).name == "deepspeed" for arg in cmdline[:2]))


def launcher_chain() -> list[Any]:
    """The launcher processes above this one (launch.py, runner, guard), nearest first; [] when not launched."""
    import psutil

    chain, proc = [], psutil.Process().parent()
    while proc is not None and proc.pid > 1:
        try:
            if not _is_launcher(proc.cmdline()):
                break
            chain.append(proc)
            proc = proc.parent()
        except psutil.Error:
            break
    return chain


def watch_launcher(grace_s: float | None = None, poll_s: float = 1.0) -> threading.Thread | None:
    """Daemon thread: when a launcher process above this rank exits (a runner killed by SIGTERM leaves
    launch.py and the ranks running; a SIGKILLed launch.py orphans them), send this process SIGUSR1 (the
    trainer checkpoints at the next step and exits); if it still runs ``grace_s`` later (stuck in a
    collective or a data loader), exit at once. ``grace_s`` defaults to $PREEMPT_GRACE_S [180]."""
    chain = launcher_chain()
    if not chain:
        return None
    if grace_s is None:
        grace_s = float(os.environ.get("PREEMPT_GRACE_S", DEFAULT_PREEMPT_GRACE_S))
    thread = threading.Thread(target=_watch, args=(chain, grace_s, poll_s), name="watch_launcher", daemon=True)
    thread.start()
    return thread


def _alive(proc: Any) -> bool:
    import psutil

    try:  # is_running also compares the start time (pid reuse); an unreaped zombie has exited too
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _watch(chain: list[Any], grace_s: float, poll_s: float) -> None:
    while all(_alive(proc) for proc in chain):
        time.sleep(poll_s)
    gone = next(proc for proc in chain if not _alive(proc))
    log.warning("pid %d: launcher process %d exited: checkpointing at the next step, exiting within %.0f s",
                os.getpid(), gone.pid, grace_s)
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(grace_s)
    log.error("pid %d: still running %.0f s after its launcher exited: exiting now", os.getpid(), grace_s)
    os._exit(1)
