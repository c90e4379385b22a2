"""DeepSpeed's CPU SHM comm op leaves a 66 MiB /dev/shm workspace per rank behind unless we unlink it, and
its JIT build lock behind when a rank is killed mid-build."""
import glob
import os
import time
from pathlib import Path

import pytest

from pipeline.run.distributed import remove_stale_build_lock, shm_workspace_path
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


def test_stale_extension_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A rank killed while torch JIT-builds DeepSpeed's comm op leaves ``.../deepspeed_shm_comm/lock``;
    every later rank on the machine would wait on it for ever in ``deepspeed.init_distributed``."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    assert not remove_stale_build_lock() and lock.exists()  # may be a build in progress
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert remove_stale_build_lock() and not lock.exists()
    assert not remove_stale_build_lock()  # nothing to do
