"""Rank side of tests/test_fail_fast.py: rank 0 sleeps in ``hang_in_sleep``, the others wait for it in a
barrier (``wait_in_collective``); each writes OUT/rank{N}.ready first. Never exits by itself."""
import sys
import time
from pathlib import Path

import torch.distributed as tdist

from tests.dist.common import init_dist


def hang_in_sleep() -> None:
    while True:
        time.sleep(1)


def wait_in_collective() -> None:
    tdist.barrier()


if __name__ == "__main__":
    rank, _ = init_dist()
    (Path(sys.argv[-1]) / f"rank{rank}.ready").write_text("ready")
    hang_in_sleep() if rank == 0 else wait_in_collective()
