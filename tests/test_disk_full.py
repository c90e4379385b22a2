"""A full disk: a checkpoint that cannot fit is refused before anything is written (one line naming the
folder, the need and the free space; ``pipeline.train`` exits 4 with the older checkpoints intact); a save
whose writes fail anyway names the file and the free space, leaves no partial folder and prunes nothing;
``data_prep`` says errno, path and free space in one line, exits 2 and leaves no partial shard.
Small disks: a tmpfs where ``mount`` is permitted (root), else RLIMIT_FSIZE (EFBIG past N bytes) and a
patched ``shutil.disk_usage``, which need no privileges."""
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.run.disk_space import FileWriteError, room_problem, save_torch
from tests.launcher import REPO, free_port, launcher_env, run_captured
from tests.train_helpers import complete, start, train_cmd, wait_for

MiB = 2 ** 20


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)`` -> a fresh tmpfs folder of that size (e.g. "2m"); skips where mounting is refused."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"mount -t tmpfs not permitted here (needs root): {proc.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fsize_limit(num_bytes: int):
    def limit() -> None:  # in the child: writing past num_bytes fails with EFBIG (SIGXFSZ ignored)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (num_bytes, num_bytes))
    return limit


def fake_checkpoint(ckpt_root: Path, tag: str, num_bytes: int) -> None:
    (ckpt_root / tag).mkdir(parents=True)
    (ckpt_root / tag / "mp_rank_00_model_states.pt").write_bytes(b"\0" * num_bytes)
    (ckpt_root / tag / "COMPLETE").write_text("1\n")


# --------------------------------------------------------------------------------------- the check
def test_a_checkpoint_bigger_than_the_free_space_is_refused_naming_folder_need_and_free(tmp_path, monkeypatch):
    ckpt_root = tmp_path / "run" / "checkpoints"
    fake_checkpoint(ckpt_root, "step_000100", 3 * MiB)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2 * MiB))
    problem = room_problem(ckpt_root, "step_000200", "step_000100", share_bytes=0)
    assert problem.startswith(f"not saving checkpoint step_000200: {ckpt_root} needs about 4.3 MiB (the size "
                              f"of step_000100"), problem
    assert "but has 2.0 MiB free" in problem and "step_000100 is kept" in problem
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=5 * MiB))
    assert room_problem(ckpt_root, "step_000200", "step_000100", share_bytes=0) is None


def test_a_first_checkpoint_is_checked_against_the_ranks_estimate_on_a_real_small_disk(tmpfs):
    ckpt_root = tmpfs("2m") / "run" / "checkpoints"  # not there yet: its nearest existing parent counts
    problem = room_problem(ckpt_root, "step_000001", None, share_bytes=2 * MiB)
    assert problem and f"{ckpt_root} needs about 3.2 MiB (weights and optimizer state of 1 ranks: 2.0 MiB" \
        in problem and "but has 2.0 MiB free" in problem, problem
    assert room_problem(ckpt_root, "step_000001", None, share_bytes=MiB // 2) is None


def test_torch_writes_on_a_full_disk_say_errno_path_and_free_space(tmpfs):
    path = tmpfs("1m") / "weights.pt"
    with pytest.raises(FileWriteError) as failure:
        save_torch({"w": torch.zeros(MiB // 2)}, path)  # 2 MiB of fp32
    assert str(failure.value).startswith(f"{path}: [Errno 28 ENOSPC] No space left on device; "), failure.value
    assert str(failure.value).endswith(f"free in {path.parent}")


# ------------------------------------------------------------------------------- failing writes
def test_a_save_whose_writes_fail_leaves_no_partial_checkpoint_and_keeps_the_older(tmp_path):
    env = launcher_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = run_captured([sys.executable, "-m", "tests.dist.checkpoint_disk_full", str(tmp_path)], 300, cwd=REPO,
                        env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.8 < result["size"] / result["estimate"] < 1.25, result  # the pre-save estimate is close
    step2 = tmp_path / "checkpoints" / "step_000002"
    assert result["error"].startswith(f"checkpoint step_000002 not saved: {step2}/mp_rank_00_model_states.pt: "
                                      "[Errno 27 EFBIG] File too large; "), result["error"]
    assert " free in " in result["error"] and result["error"].endswith("step_000001 is kept")
    assert result["complete"] == ["step_000001"] and "step_000002" not in result["folders"]


# ------------------------------------------------------------------------------------ data_prep
def data_prep_synth(out: Path, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", "synth", "--output", str(out), "--num-samples", "64",
                           "--num-val", "16", "--no-progress"], cwd=REPO, env=launcher_env(), capture_output=True,
                          text=True, timeout=120, **popen)


def assert_one_line_and_no_partial_shard(proc: subprocess.CompletedProcess, out: Path, cause: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    shard = out / "captions" / "train-000000.tar.tmp"
    assert proc.stderr.strip() == f"data_prep synth: error: cannot write {shard}: {cause}; " \
        f"{proc.stderr.split('; ')[-1].strip()}" and "MiB free in" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not list(out.rglob("*.tmp"))


def test_data_prep_on_a_full_disk_exits_2_with_one_line_and_no_partial_shard(tmpfs):
    out = tmpfs("256k") / "data"
    assert_one_line_and_no_partial_shard(data_prep_synth(out), out, "[Errno 28 ENOSPC] No space left on device")


def test_data_prep_write_failure_exits_2_with_one_line_and_no_partial_shard(tmp_path):
    out = tmp_path / "data"
    proc = data_prep_synth(out, preexec_fn=fsize_limit(40_000))
    assert_one_line_and_no_partial_shard(proc, out, "[Errno 27 EFBIG] File too large")


# ------------------------------------------------------------------------------ through the launcher
@pytest.mark.slow
def test_train_refuses_a_checkpoint_that_cannot_fit_and_exits_4_keeping_the_older(tmpfs, tiny_train_args):
    run = tmpfs("64m") / "run"
    cmd = train_cmd(run, tiny_train_args, ["--set", "train.steps=15", "--set", "train.save_every=5",
                                           "--set", "train.eval_every=0", "--set", "train.keep_last=1"])
    log = run.parent.parent / "train.log"
    proc = start(cmd, log)
    wait_for(lambda: complete(run, 5), proc, 300, "the step-5 checkpoint")
    used = shutil.disk_usage(run).used  # shrink the disk: step 10's checkpoint no longer fits
    subprocess.run(["mount", "-o", f"remount,size={used + MiB}", str(run.parent)], check=True)
    wait_for(lambda: proc.poll() is not None, proc, 300, "the run to stop")
    text = log.read_text()
    assert proc.returncode == 4, text[-5000:]
    line = next(line for line in text.splitlines() if line.startswith("pipeline.train: stopped:"))
    assert line.startswith(f"pipeline.train: stopped: not saving checkpoint step_000010: {run / 'checkpoints'} "
                           f"needs about "), line
    assert "(the size of step_000005" in line and "free" in line and "step_000005 is kept" in line
    assert complete(run, 5) and not (run / "checkpoints" / "step_000010").exists()
    assert "Traceback" not in text, text[-5000:]
