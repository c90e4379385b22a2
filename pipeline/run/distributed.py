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
        remove_stale_build_lock()
        deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
    rank, world = tdist.get_rank(), tdist.get_world_size()
    release_shm_workspace(rank, world)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by the deepspeed launcher
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        accel.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(accel.device_name())
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


SHM_OP = "deepspeed_shm_comm"  # the CPU comm op every rank JIT-builds (or checks) in init_distributed
STALE_LOCK_S = 600  # well above the longest build seen (BENCHMARKS.md, figures moved out of code)


def remove_stale_build_lock(op: str = SHM_OP, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove torch's extension build lock of ``op`` when it is older than ``max_age_s``.

    On CPU, ``deepspeed.init_distributed`` builds DeepSpeed's SHM comm op through torch's JIT loader, which
    holds ``TORCH_EXTENSIONS_DIR/.../deepspeed_shm_comm/lock`` while ninja runs and makes every other
    process wait for it without a timeout (``torch.utils.file_baton``). A process killed while holding it
    (SIGKILL, a launcher tearing ranks down) leaves the file behind, and from then on every DeepSpeed rank
    on the machine hangs in start-up. Returns True when a stale lock was removed."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = os.path.join(_get_build_directory(op, verbose=False), "lock")
        if time.time() - os.path.getmtime(lock) < max_age_s:
            return False
        os.unlink(lock)
    except (OSError, ImportError, RuntimeError):  # no lock (the usual case), or another rank removed it
        return False
    print(f"removed a stale torch extension build lock {lock} (left by a killed process)", file=sys.stderr)
    return True


def shm_workspace_path(rank: int, env: dict[str, str] | None = None) -> str:
    """/dev/shm name of the all-reduce workspace DeepSpeed's CPU SHM comm op creates for ``rank``
    (deepspeed/ops/csrc/cpu/comm/shm.cpp: ``deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}``)."""
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR", "127.0.0.1"), env.get("MASTER_PORT", "29500")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_workspace(rank: int, world_size: int) -> None:
    """Unlink this rank's SHM all-reduce workspace once every rank has mapped it.

    DeepSpeed 0.19.8 never unlinks these 66 MiB files, so every CPU run leaked one per rank into
    /dev/shm (RAM) until the machine ran out of memory. Each rank maps all peers' workspaces inside
    ``deepspeed.init_distributed``; after a barrier the names can go: the mappings stay valid and the
    memory is returned when the processes exit, however they exit.
    """
    if world_size <= 1:
        return
    tdist.barrier()  # every rank calls this, whether or not its workspace exists (multi-node: none)
    try:
        os.unlink(shm_workspace_path(rank))
    except FileNotFoundError:
        pass


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
