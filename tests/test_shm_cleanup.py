"""DeepSpeed's CPU SHM comm op leaves a 66 MiB /dev/shm workspace per rank behind unless we unlink it."""
import glob
import os

import pytest

from pipeline.distributed import shm_workspace_path
from tests.launcher import run_deepspeed


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_no_shm_workspace_left_after_a_run():
    proc = run_deepspeed("tests.dist.shm_probe", [], nproc=2, timeout=180)
    assert "rank 0 sum 2 workspace_left False" in proc.stdout
    assert "rank 1 sum 2 workspace_left False" in proc.stdout
    port = proc.args[proc.args.index("--master_port") + 1]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


def test_workspace_name_matches_deepspeed(monkeypatch):
    env = {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29600"}
    assert shm_workspace_path(1, env) == f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_10.1.2.3_29600_1"
