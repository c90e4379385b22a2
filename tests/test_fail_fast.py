"""A test that waits on other processes fails soon after its timeout with their Python stacks
(tests/launcher.py ``stop_with_stacks``): SIGUSR2 to each process that handles it
(``pipeline.run.distributed.enable_stack_dumps``), then SIGKILL to all, nothing left running."""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.launcher import REPO, communicate_or_fail, free_port, launcher_env, run_processes
from tests.train_helpers import start, wait_for

TREE = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from pipeline.run.distributed import enable_stack_dumps

    def parent_waits_for_child(child):
        child.wait()

    def child_sleeps():
        while True:
            time.sleep(1)

    enable_stack_dumps()
    ready = Path(sys.argv[1])
    if len(sys.argv) > 2:
        ready.with_suffix(".child").write_text("ready")
        child_sleeps()
    plain = subprocess.Popen(["sleep", "600"])  # no SIGUSR2 handler: killed, not asked for stacks
    child = subprocess.Popen([sys.executable, __file__, str(ready), "child"])
    ready.write_text("ready")
    parent_waits_for_child(child)
""")


def wait_until(predicate, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "the processes did not start"
        time.sleep(0.05)


def test_communicate_timeout_reports_every_process_stack_then_kills_the_tree(tmp_path):
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, str(script), str(ready)], cwd=REPO, env=launcher_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_until(lambda: ready.is_file() and ready.with_suffix(".child").is_file())
    started = time.time()
    with pytest.raises(AssertionError) as failure:
        communicate_or_fail(proc, 1, "the tree")
    assert time.time() - started < 1 + 15
    message = str(failure.value)
    assert "the tree: still running after 1 s" in message
    assert "in parent_waits_for_child" in message and "in child_sleeps" in message, message
    assert "[stacks]: sleep 600" not in message and "sleep 600" in message, message
    assert proc.returncode is not None and run_processes(proc.pid) == []


@pytest.mark.slow
def test_wait_for_timeout_shows_where_each_launched_rank_hangs(tmp_path):
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "tests.dist.hang_probe",
           str(tmp_path)]
    proc = start(cmd, tmp_path / "log.txt")
    wait_for(lambda: all((tmp_path / f"rank{r}.ready").is_file() for r in (0, 1)), proc, 240, "ranks ready")
    started = time.time()
    with pytest.raises(AssertionError) as failure:
        wait_for(lambda: False, proc, 3, "the hung ranks")
    assert time.time() - started < 3 + 20
    message = str(failure.value)
    assert "timed out after 3 s waiting for the hung ranks" in message
    assert "in hang_in_sleep" in message and "in wait_in_collective" in message, message
    assert proc.returncode is not None and run_processes(proc.pid) == []
