"""Stopping a run the way clusters do (launch/README.md "Stopping and preemption").

Unit tests (one process tree of small Python stand-ins, seconds): pipeline.launch_guard blocks the stop
signals for the launcher, asks the ranks, kills what outlives the grace period, orphans included;
pipeline.run.distributed.watch_launcher stops a rank whose launcher died; DataLoader workers survive them.
Launcher tests (real deepspeed, 2 CPU ranks): a group-wide SIGUSR1 during a checkpoint save, SLURM's SIGTERM
to every process of the job step (launch/slurm.sbatch under a fake srun/scontrol: requeue, then resume at
the same data position), and SIGTERM to a bare `deepspeed` runner. Each run must end with every process gone.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import TINY_MODEL_SETS
from tests.launcher import REPO, free_port, launcher_env, stop_with_stacks, timeout_message

STOPPABLE = [*TINY_MODEL_SETS, "batch.micro_batch_size=8", "train.steps=400", "train.log_every=1",
             "train.eval_every=0", "train.eval_max_batches=1", "data.shuffle_buffer=20", "data.num_workers=1",
             "train.peak_tflops=1.0"]
SEED, DATA_SEED_STRIDE = 1234, 1_000_003  # recipe default train.seed; pipeline.run.trainer.DATA_SEED_STRIDE


def sets(items):
    return [arg for item in items for arg in ("--set", item)]


# ------------------------------------------------------------------------------ process bookkeeping
def session(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            pass
    return found


def describe(sid: int, log: Path | None) -> str:
    """The session's processes and their Python stacks (tests/launcher.py stop_with_stacks: SIGUSR2 to every
    process that handles it), the log before them; then kill all."""
    listing = stop_with_stacks(sid)
    output = log.read_text(errors="replace") if log is not None and log.is_file() else ""
    return timeout_message("", listing, output)


def wait_gone(proc: subprocess.Popen, timeout: float, log: Path | None = None) -> int:
    """Exit status of ``proc`` once it and every process of its session are gone; fails fast with a
    description of what is left (stacks included) after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None and not session(proc.pid):
            return proc.returncode
        time.sleep(0.2)
    leftover = describe(proc.pid, log)
    proc.wait(timeout=30)
    raise AssertionError(f"still running {timeout:.0f} s later (exit {proc.returncode})\n{leftover}")


def wait_until(predicate, proc: subprocess.Popen, what: str, log: Path, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}\n{describe(proc.pid, log)}")
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}\n{describe(proc.pid, log)}")


def start(cmd: list[str], log: Path, cwd: Path = REPO, **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=launcher_env(**env), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


# --------------------------------------------------------------------------------------- unit tests
FAKE_RANK = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    out, mode = Path(sys.argv[1]), sys.argv[2]
    def stop(signum, frame):
        out.write_text(signal.Signals(signum).name)
        sys.exit(0)
    if mode == "trainer":  # what pipeline.run.trainer does: handle, then unblock
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, stop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
    elif mode == "orphan":  # leaves a child behind when it exits
        import subprocess
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        out.write_text("started")
        sys.exit(0)
    out.with_suffix(".ready").write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)
""")
FAKE_LAUNCH = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    # argv: FAKE_RANK_FILE OUT_DIR deepspeed.launcher.launch MODE...; a stand-in for launch.py
    out = Path(sys.argv[2])
    (out / "launcher_sigblk").write_text([l for l in open("/proc/self/status") if l.startswith("SigBlk")][0])
    ranks = [subprocess.Popen([sys.executable, sys.argv[1], str(out / f"rank{i}"), mode])
             for i, mode in enumerate(sys.argv[4:])]
    sys.exit(max(rank.wait() for rank in ranks))
""")


def guard(tmp_path: Path, modes: list[str], grace: float = 30) -> subprocess.Popen:
    (tmp_path / "rank.py").write_text(FAKE_RANK)
    (tmp_path / "launch.py").write_text(FAKE_LAUNCH)
    cmd = [sys.executable, "-m", "pipeline.launch_guard", "--grace-period", str(grace), "--",
           sys.executable, str(tmp_path / "launch.py"), str(tmp_path / "rank.py"), str(tmp_path),
           "deepspeed.launcher.launch", *modes]
    return start(cmd, tmp_path / "guard.log")


def test_guard_blocks_stop_signals_in_the_launcher(tmp_path):
    proc = guard(tmp_path, ["trainer", "trainer"])
    wait_until(lambda: all((tmp_path / f"rank{i}.ready").is_file() for i in (0, 1)), proc, "ranks",
               tmp_path / "guard.log")
    os.killpg(proc.pid, signal.SIGTERM)  # Ctrl-C / docker / kubernetes: the whole group
    # launch.py survives it (it would terminate the ranks), the ranks stop by themselves, all exit 0
    assert wait_gone(proc, 20, tmp_path / "guard.log") == 0, (tmp_path / "guard.log").read_text()
    blocked = int((tmp_path / "launcher_sigblk").read_text().split()[1], 16)
    assert all(blocked & (1 << (sig - 1)) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1))
    assert [(tmp_path / f"rank{i}").read_text() for i in (0, 1)] == ["SIGTERM", "SIGTERM"]
    assert "SIGTERM: asking the ranks to checkpoint" in (tmp_path / "guard.log").read_text()


def test_guard_asks_ranks_kills_them_past_the_grace_period_and_collects_orphans(tmp_path):
    proc = guard(tmp_path, ["trainer", "stuck", "orphan"], grace=1)  # "stuck" never unblocks its signals
    ready = ("rank0.ready", "rank1.ready", "rank2")
    wait_until(lambda: all((tmp_path / name).is_file() for name in ready), proc, "ranks", tmp_path / "guard.log")
    os.kill(proc.pid, signal.SIGTERM)  # the guard alone (PID 1 of a container, SLURM --signal=B:...)
    assert wait_gone(proc, 20, tmp_path / "guard.log") == 1  # the orphaned sleeper is gone too
    assert (tmp_path / "rank0").read_text() == "SIGUSR1"  # asked by the guard
    assert "killing" in (tmp_path / "guard.log").read_text()


def test_rank_checkpoints_then_exits_when_its_launcher_dies(tmp_path):
    rank = textwrap.dedent(f"""
        import signal, time
        from pathlib import Path
        from pipeline.run.distributed import watch_launcher
        signal.signal(signal.SIGUSR1, lambda *_: Path({str(tmp_path / 'asked')!r}).touch())
        assert watch_launcher(grace_s=1.0, poll_s=0.05) is not None
        Path({str(tmp_path / 'ready')!r}).touch()
        while True:  # stuck (e.g. in a data loader): never reaches a step boundary
            time.sleep(0.05)
    """)
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {rank!r}])"
    proc = start([sys.executable, "-c", launcher, "deepspeed.launcher.launch"], tmp_path / "log.txt")
    wait_until(lambda: (tmp_path / "ready").is_file(), proc, "rank start", tmp_path / "log.txt")
    proc.kill()  # SIGKILL to launch.py: its rank is orphaned
    wait_gone(proc, 15, tmp_path / "log.txt")
    assert (tmp_path / "asked").is_file()  # asked to checkpoint first, then exited after the grace period


class Counting(torch.utils.data.IterableDataset):
    def __iter__(self):
        step = 0
        while True:
            yield torch.tensor(step)
            step += 1


def test_dataloader_workers_outlive_stop_signals_sent_to_every_process():
    from pipeline.data.loader import _loader

    batches = iter(_loader(Counting(), num_workers=1))
    assert int(next(batches)) == 0
    worker = batches._workers[0]
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM):  # Ctrl-C, SLURM's USR1, the first SIGTERM
        os.kill(worker.pid, sig)
    time.sleep(0.5)
    assert [int(next(batches)) for _ in range(10)] == list(range(1, 11)) and worker.is_alive()
    del batches


# ---------------------------------------------------------------------------------- launcher tests
def newest_complete(run: Path) -> str | None:
    tags = sorted(p.parent.name for p in (run / "checkpoints").glob("step_*/COMPLETE"))
    return tags[-1] if tags else None


def run_state(run: Path, tag: str) -> dict:
    return json.loads((run / "checkpoints" / tag / "run_state.json").read_text())


def saving(run: Path, after: int) -> str | None:
    """Tag of a checkpoint being written (folder without COMPLETE) past step ``after``."""
    for folder in (run / "checkpoints").glob("step_*"):
        if int(folder.name[5:]) > after and not (folder / "COMPLETE").is_file():
            return folder.name
    return None


@pytest.fixture(scope="module")
def preempted_during_save(synth_data, tmp_path_factory):
    """launch/pretrain.sh saving every step; a group-wide SIGUSR1 while a checkpoint is being written."""
    tmp = tmp_path_factory.mktemp("preempt")
    run, log = tmp / "run", tmp / "log.txt"
    proc = start(["bash", "launch/pretrain.sh", "launch/recipes/vl_pretrain.yaml", str(run),
                  *sets([*STOPPABLE, "train.save_every=1"])], log, MASTER_PORT=str(free_port()),
                 DATA=str(synth_data.captions), TOKENIZER=str(synth_data.tokenizer))
    tag = wait_until(lambda: saving(run, after=2), proc, "a checkpoint save past step 2", log)
    os.killpg(proc.pid, signal.SIGUSR1)
    rc = wait_gone(proc, 240, log)
    return run, tag, rc, log.read_text()


@pytest.mark.slow
def test_group_sigusr1_during_a_save_finishes_that_checkpoint_and_exits_zero(preempted_during_save):
    run, tag, rc, out = preempted_during_save
    assert rc == 0, out[-5000:]
    assert newest_complete(run) == tag, out[-5000:]  # the checkpoint being written, not one more step
    step = int(tag[5:])
    assert run_state(run, tag)["step"] == step and not (run / "FINISHED").exists()
    assert f"launch: preempted at step {step} ({run}/checkpoints/{tag}), rerun to resume" in out


@pytest.mark.slow
def test_slurm_sigterm_to_every_step_process_requeues_and_resume_keeps_data_position(
        preempted_during_save, synth_data, tmp_path):
    run, tag, _, _ = preempted_during_save
    first = int(tag[5:])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log, trigger = tmp_path / "log.txt", tmp_path / "trigger"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "localhost", "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()),
           "FAKE_SLURM_TRIGGER": str(trigger), "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
           "DATA": str(synth_data.captions), "TOKENIZER": str(synth_data.tokenizer)}
    proc = start(["bash", str(REPO / "launch" / "slurm.sbatch"), str(REPO / "launch" / "pretrain.sh"),
                  "launch/recipes/vl_pretrain.yaml", str(run), *sets([*STOPPABLE, "train.save_every=0"])],
                 log, cwd=tmp_path, **env)
    lines = run / "train_log.jsonl"
    wait_until(lambda: lines.is_file() and f'"step": {first + 2}' in lines.read_text(), proc, "2 resumed steps", log)
    trigger.write_text("TERM")  # the fake srun signals every process of the job step, as slurmd does
    rc = wait_gone(proc, 240, log)
    out = log.read_text()
    assert rc == 0, out[-5000:]
    assert len((tmp_path / "trigger.sent").read_text().split()) >= 8  # script, guard, runner, launch, 2 ranks, ...
    assert (tmp_path / "scontrol.log").read_text().split("\n")[0] == "requeue 4242"
    assert "resumed from" in out and f"(step {first})" in out
    final = newest_complete(run)
    state = run_state(run, final)
    assert state["step"] > first + 1 and state["resumes"] == 1
    assert state["samples_seen"] == state["step"] * 16  # micro 8 x 2 ranks, no step lost or repeated
    assert state["data_seed"] == SEED + DATA_SEED_STRIDE * first  # the stream restarted where it stopped
    assert not (tmp_path / "preempted.4242").exists()


@pytest.mark.slow
def test_direct_deepspeed_runner_sigterm_leaves_a_checkpoint_and_no_process(tiny_train_args, tmp_path):
    """The README's bare `deepspeed ...` command: the runner dies on SIGTERM (no handler on one node);
    launch.py and the ranks must not run on as orphans."""
    run, log = tmp_path / "run", tmp_path / "log.txt"
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    proc = start([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pipeline.train",
                  "--recipe", "launch/recipes/vl_pretrain.yaml", "--ds-config", "ds_configs/zero2_bf16.json",
                  "--output-dir", str(run), *tiny_train_args, *sets(["train.steps=400", "train.eval_every=0",
                                                                     "train.save_every=0"])], log)
    lines = run / "train_log.jsonl"
    wait_until(lambda: lines.is_file() and lines.read_text().count("\n") >= 1, proc, "first log line", log)
    proc.send_signal(signal.SIGTERM)  # `kill RUNNER_PID`
    wait_gone(proc, 120, log)
    tag = newest_complete(run)
    assert tag is not None and 2 <= run_state(run, tag)["step"] < 400, log.read_text()[-5000:]
    assert "launcher process" in log.read_text()


FAKE_SRUN = """#!/usr/bin/env bash
# fake srun (one node): runs the task; when the file $FAKE_SLURM_TRIGGER holds a signal name, sends that
# signal to every process of the job step (the task and all its descendants), as slurmd does
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 "$@" &
task=$!
step_pids() { echo "$1"; local c; for c in $(pgrep -P "$1"); do step_pids "$c"; done; }
while kill -0 "$task" 2>/dev/null; do
  if [[ -s "$FAKE_SLURM_TRIGGER" ]]; then
    sig="$(<"$FAKE_SLURM_TRIGGER")"; rm -f "$FAKE_SLURM_TRIGGER"
    pids="$(step_pids "$task")"
    kill -"$sig" $pids 2>/dev/null || true
    echo $pids >> "$FAKE_SLURM_TRIGGER.sent"
  fi
  sleep 0.05
done
wait "$task"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# fake scontrol: "show hostnames LIST" prints localhost; any other call is recorded
if [[ "$1 $2" == "show hostnames" ]]; then echo localhost; else echo "$*" >> "$FAKE_SCONTROL_LOG"; fi
"""
