"""Run a module under the real `deepspeed` launcher with N CPU ranks (gloo) from tests.

Every wait on other processes fails fast with their Python stacks: on a timeout ``stop_with_stacks`` sends
SIGUSR2 to each process of the run that handles it (our entry points and rank probes call
``pipeline.run.distributed.enable_stack_dumps``), gives them ``STACK_DUMP_WAIT_S`` to print, then kills them all.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
STACK_DUMP_WAIT_S = 2.0
_STACKS_START = re.compile(r"^(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):", re.M)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"),
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------- timeouts
def handles_signal(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (/proc SigCgt): SIGUSR2 kills one without."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M)
    return bool(caught and int(caught.group(1), 16) >> (signum - 1) & 1)


def run_processes(root_pid: int) -> list[psutil.Process]:
    """``root_pid``, its descendants and whatever else runs in its session (orphans), parents first; not
    the exited ones (zombies)."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = []
    known = {p.pid for p in procs}
    for proc in psutil.process_iter():
        try:
            if proc.pid not in known and os.getsid(proc.pid) == root_pid:
                procs.append(proc)
        except (OSError, psutil.Error):
            pass
    return [p for p in procs if _running(p)]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_with_stacks(root_pid: int, read_output=None) -> str:
    """SIGUSR2 to every process of the run (``run_processes``) that handles it, one at a time so that their
    stacks do not interleave, ``STACK_DUMP_WAIT_S`` to write them, then SIGKILL to all; ``read_output(s)``
    drains a pipe meanwhile. Returns the process listing. The run's first process leads a session."""
    procs, lines = run_processes(root_pid), []
    for p in procs:
        try:
            dumps = handles_signal(p.pid, signal.SIGUSR2)
            lines.append(f"{p.pid} (parent {p.ppid()}) {p.status()}{' [stacks]' if dumps else ''}: "
                         f"{' '.join(p.cmdline())[:200]}")
            if dumps:
                p.send_signal(signal.SIGUSR2)
                time.sleep(0.2)
        except psutil.Error:
            pass
    (read_output or time.sleep)(STACK_DUMP_WAIT_S)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(root_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.time() + 30
    while any(_running(p) for p in procs) and time.time() < deadline:  # SIGKILLed is not yet gone
        time.sleep(0.05)
    return "\n".join(lines)


def timeout_message(what: str, listing: str, output: str) -> str:
    """What timed out, the processes, their Python stacks, and the output before them."""
    found = _STACKS_START.search(output)
    stacks = output[found.start():][-30000:] if found else "(none: no process of the run handles SIGUSR2)"
    before = output[:found.start()] if found else output
    return (f"{what}\n--- processes ---\n{listing}\n--- output (last 6000 characters before the stacks) ---\n"
            f"{before[-6000:]}\n--- Python stacks (SIGUSR2), in the order of the [stacks] processes ---\n{stacks}")


def communicate_or_fail(proc: subprocess.Popen, timeout: float, what: str) -> tuple[str, str]:
    """``proc.communicate(timeout)``; on a timeout, AssertionError with the run's stacks (pipes of text)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass

    def drain(seconds: float) -> None:
        try:
            proc.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass

    listing = stop_with_stacks(proc.pid, drain)
    out, err = proc.communicate(timeout=60)
    raise AssertionError(timeout_message(f"{what}: still running after {timeout:.0f} s", listing,
                                         f"{out or ''}\n{err or ''}"))


def run_captured(cmd: list[str], timeout: float, **popen) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a session of its own, failing fast with
    the stacks of every process of the run after ``timeout`` seconds."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen)
    out, err = communicate_or_fail(proc, timeout, " ".join(map(str, cmd)))
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ------------------------------------------------------------------------------ torch extension lock
def run_deepspeed(module: str, args: list[str], nproc: int = 2, timeout: float = 300,
                  launcher_args: list[str] | None = None, check: bool = True,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --master_port P --module MODULE ARGS`; output captured as text."""
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           *(launcher_args or []), "--module", module, *args]
    proc = run_captured(cmd, timeout, cwd=REPO, env=env or launcher_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n"
                             f"{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc
