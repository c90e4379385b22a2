"""DeepSpeed's CPU SHM comm op leaves a 66 MiB /dev/shm workspace per rank behind unless we unlink it, and
its JIT build lock behind when a rank is killed mid-build."""
import glob
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline.run.distributed import remove_stale_build_lock, shm_workspace_path
from tests.launcher import build_lock_holders, clear_stale_build_lock, run_deepspeed


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


BATON = textwrap.dedent("""
    import importlib.util, sys, time
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("file_baton", sys.argv[1])  # torch's, without importing torch
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lock, go = Path(sys.argv[2]), Path(sys.argv[3])
    baton = module.FileBaton(str(lock))
    assert baton.try_acquire()
    lock.with_suffix(".ready").write_text("ready")
    while not go.exists():
        time.sleep(0.02)
    baton.release()  # os.close, then os.remove: fails if someone removed the lock meanwhile
""")


def test_build_lock_of_a_live_build_is_waited_for_and_of_a_killed_one_removed(tmp_path):
    """tests/conftest.py's comm-op fixture: torch's ``FileBaton`` holds the lock's descriptor while the
    build runs; a lock nobody holds open was left by a killed process and is removed at once."""
    import torch.utils

    baton = Path(torch.utils.__file__).with_name("file_baton.py")
    lock, go = tmp_path / "lock", tmp_path / "go"
    assert clear_stale_build_lock(lock, timeout=5) == "none"
    holder = subprocess.Popen([sys.executable, "-c", BATON, str(baton), str(lock), str(go)])
    try:
        deadline = time.time() + 60
        while not lock.with_suffix(".ready").exists():
            assert holder.poll() is None and time.time() < deadline, "the holder did not start"
            time.sleep(0.02)
        assert build_lock_holders(lock) == [holder.pid]
        with pytest.raises(AssertionError, match=f"still held after 1 s by \\[{holder.pid}\\]"):
            clear_stale_build_lock(lock, timeout=1, poll_s=0.1)
        assert lock.exists()  # a live build's lock is never removed
        threading.Timer(1.0, go.touch).start()
        assert clear_stale_build_lock(lock, timeout=60, poll_s=0.1) == "released"
        assert holder.wait(timeout=60) == 0  # its own release found the lock: nobody removed it under it
    finally:
        holder.kill()
    lock.write_text("")  # as left by a build killed with SIGKILL: nobody holds it open
    assert build_lock_holders(lock) == [] and clear_stale_build_lock(lock, timeout=5, poll_s=0.1) == "removed"
    assert not lock.exists()
