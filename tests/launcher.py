"""Run a module under the real `deepspeed` launcher with N CPU ranks (gloo) from tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def run_deepspeed(module: str, args: list[str], nproc: int = 2, timeout: float = 300,
                  launcher_args: list[str] | None = None, check: bool = True,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N --master_port P --module MODULE ARGS`; output captured as text."""
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           *(launcher_args or []), "--module", module, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env or launcher_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n"
                             f"{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc
