"""Fault injection: a 2-rank training job through ``launch/pretrain.sh``, one fault per trial at a seeded
random moment, then the recovery a user would do, and what it cost.

    .venv/bin/python -m bench.fault_inject --trials 10 --seed 0
    .venv/bin/python -m bench.fault_inject --trials 1 --kinds sigterm

Each trial starts a fresh run folder (tiny model of tests/test_launch.py, ``--steps`` steps, a checkpoint
every ``--save-every``), waits until the launcher log shows a random step (then a random delay up to
``MAX_DELAY_S``), injects the trial's fault and waits for the job to end. Kinds (round-robin over ``--kinds``):

- ``kill_rank``: SIGKILL to one rank: the job must exit non-zero; rerun with RESUME=auto.
- ``kill_job``: SIGKILL to the whole process group; rerun with RESUME=auto.
- ``corrupt_shard``: truncate a training shard or overwrite bytes of it: the job goes on (skips counted) or
  exits 5 naming the shard; rerun ``data_prep synth`` (redoes the damaged shard), then RESUME=auto.
- ``fill_disk``: the run folder is on a small tmpfs; fill it after a checkpoint so the next one cannot fit:
  exit 4 with one ``pipeline.train: stopped:`` line, earlier checkpoints intact; remount bigger, rerun.
- ``sigterm``: SIGTERM to the process group: exit 0 with a checkpoint at the stop step; rerun finishes.

Measured: resumed (the rerun logs "resumed from" the newest complete checkpoint and writes FINISHED at the
final step), samples lost (final run_state samples_seen vs steps x global batch; eval num_samples vs the
manifest), checkpoints lost (complete before the fault, gone or not loadable by
``merge_moe_checkpoint`` after it, keep_last pruning aside), hangs (a run past ``--timeout``: its
processes and Python stacks are printed, then it is killed), unexpected (exit status or message not as
above, processes left behind, a COMPLETE checkpoint that does not load). Every wait is bounded.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from bench import common
from pipeline.run.checkpoint import RUN_STATE
from pipeline.run.checkpoint_merge import merge_moe_checkpoint
from pipeline.run.run_dir import RunDir
from tests.conftest import TINY_MODEL_SETS
from tests.launcher import run_processes, stop_with_stacks

KINDS = ("kill_rank", "kill_job", "corrupt_shard", "fill_disk", "sigterm")
WORK = common.BENCH_RUNS / "fault_inject"
SYNTH_ARGS = ["--num-samples", "240", "--num-val", "64", "--shard-size", "60", "--no-progress"]
TOKENIZER_VOCAB = 300
MAX_DELAY_S = 0.6  # after the trigger step appears in the log: lands anywhere in a step or a save
POLL_S = 0.1
EXIT_WAIT_S = 30  # for processes of a run still alive after its launcher exited
TMPFS_SIZE = "48m"  # the run folder of fill_disk (5 checkpoints of the tiny model)
TMPFS_ROOMY = "512m"
STEP_LINE = re.compile(r"\] pipeline\.trainer: step (\d+)/\d+ \|")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.fault_inject", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="faults to inject, one per trial (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the moments, ranks, shards and damage (default 0)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma list, round-robin (default {','.join(KINDS)})")
    parser.add_argument("--steps", type=int, default=10, help="training steps of each run (default 10)")
    parser.add_argument("--save-every", type=int, default=2, help="checkpoint interval in steps (default 2)")
    parser.add_argument("--keep-last", type=int, default=2, help="train.keep_last (default 2)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds before a run counts as a hang (default 300)")
    parser.add_argument("--work", type=Path, default=WORK,
                        help=f"data and run folders (default {WORK.relative_to(common.REPO)})")
    parser.add_argument("--output", type=Path, default=None,
                        help="result JSON (default bench/results/fault_inject_<time>.json)")
    args = parser.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown or not args.kinds:
        parser.error(f"--kinds {','.join(unknown) or '(empty)'}: expected some of {','.join(KINDS)}")
    if args.trials < 1 or args.save_every < 1 or args.steps < args.save_every + 3:
        parser.error(f"--trials {args.trials}, --steps {args.steps}, --save-every {args.save_every}: expected "
                     "--trials >= 1, --save-every >= 1 and --steps >= --save-every + 3")
    return args


# ------------------------------------------------------------------------------------------- data
def data_prep(work: Path, log_path: Path) -> str:
    """``data_prep synth`` into ``work/data`` (a rerun redoes damaged shards); its summary lines."""
    cmd = [sys.executable, "-m", "data_prep", "synth", "--output", str(work / "data"), *SYNTH_ARGS]
    proc = subprocess.run(cmd, cwd=common.REPO, env=common.launcher_env(), capture_output=True, text=True,
                          timeout=600)
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def ensure_data(work: Path) -> tuple[Path, Path]:
    """(captions folder, tokenizer folder) in ``work``: the data checked (and made once), the tokenizer made once."""
    work.mkdir(parents=True, exist_ok=True)
    captions, tokenizer = work / "data" / "captions", work / "tokenizer"
    data_prep(work, work / "data_prep.log")  # also redoes a shard an interrupted earlier run left damaged
    if not (tokenizer / "vocab.txt").is_file() and not (tokenizer / "tokenizer.json").is_file():
        common._data_prep("tokenizer", "--shards", captions, "--vocab-size", TOKENIZER_VOCAB, "--output", tokenizer)
    return captions, tokenizer


# ------------------------------------------------------------------------------------------ a run
class Run:
    """One ``launch/pretrain.sh`` in a session of its own, output to ``log_path``."""

    def __init__(self, args: argparse.Namespace, captions: Path, tokenizer: Path, run_dir: Path, log_path: Path):
        sets = [*TINY_MODEL_SETS, "batch.micro_batch_size=8", f"train.steps={args.steps}", "train.log_every=1",
                "train.eval_every=0", f"train.save_every={args.save_every}", f"train.keep_last={args.keep_last}",
                "data.shuffle_buffer=20", "data.num_workers=1", "train.peak_tflops=1.0"]
        self.port = common.free_port()
        self.cmd = ["bash", "launch/pretrain.sh", "launch/recipes/vl_pretrain.yaml", str(run_dir),
                    *[a for s in sets for a in ("--set", s)]]
        self.env = common.launcher_env()
        self.env.update(DATA=str(captions), TOKENIZER=str(tokenizer), MASTER_PORT=str(self.port), RESUME="auto",
                        PREEMPT_GRACE_S="60")
        self.log_path, self.timeout = log_path, args.timeout
        self.rc: int | None = None
        self.hang = False
        self.leftover: list[str] = []
        self.wall = 0.0

    def execute(self, on_poll: Callable[["Run"], None] | None = None) -> "Run":
        start = time.perf_counter()
        with self.log_path.open("w") as log:
            proc = subprocess.Popen(self.cmd, cwd=common.REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            self.proc = proc
            try:
                while proc.poll() is None and time.perf_counter() - start < self.timeout:
                    if on_poll is not None:
                        on_poll(self)
                    time.sleep(POLL_S)
            except BaseException:  # a bug here (or Ctrl-C): leave nothing running
                stop_with_stacks(proc.pid)
                raise
            if proc.poll() is None:
                self.hang = True
                print(f"HANG: {' '.join(self.cmd[:4])} still running after {self.timeout:.0f} s; processes:\n"
                      f"{stop_with_stacks(proc.pid)}\n--- log tail (Python stacks from SIGUSR2) ---\n"
                      f"{self.log_path.read_text()[-8000:]}", flush=True)
            self.rc = proc.wait(timeout=60)
        self.wall = time.perf_counter() - start
        self._reap()
        common.remove_shm_buffers(self.port)
        return self

    def _reap(self) -> None:
        """Processes of the run alive after its launcher exited are a bug: listed, then killed."""
        deadline = time.time() + EXIT_WAIT_S
        while run_processes(self.proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        if run_processes(self.proc.pid):
            self.leftover = stop_with_stacks(self.proc.pid).splitlines()
            print("LEFT BEHIND:\n" + "\n".join(self.leftover), flush=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def step(self) -> int:
        found = STEP_LINE.findall(self.log())
        return int(found[-1]) if found else 0

    def ranks(self) -> list[psutil.Process]:
        """The rank processes (children of deepspeed's launch.py; not their DataLoader workers)."""
        out = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                parent = " ".join(p.parent().cmdline())
                if "--local_rank=" in " ".join(p.cmdline()) and "deepspeed.launcher.launch" in parent:
                    out.append(p)
            except psutil.Error:
                pass
        return sorted(out, key=lambda p: " ".join(p.cmdline()))


# ----------------------------------------------------------------------------------------- faults
class Trial:
    """One fault: its seeded choices, the run folder, and what was seen."""

    def __init__(self, index: int, kind: str, args: argparse.Namespace, rng: random.Random):
        self.index, self.kind, self.args = index, kind, args
        self.folder = args.work / f"trial_{index:02d}_{kind}"
        self.disk = self.folder / "disk"  # tmpfs mount point (fill_disk)
        self.run_dir = (self.disk if kind == "fill_disk" else self.folder) / "run"
        # after the first checkpoint (step save_every) is complete, so every trial has one to resume from, and
        # a step before the last, so that (with the delay) the fault usually lands before the final save
        self.trigger_step = rng.randint(args.save_every + 1, args.steps - 2)
        self.delay = rng.uniform(0, MAX_DELAY_S)
        self.choice = {"rank": rng.randrange(2), "shard": rng.randrange(4),
                       "damage": rng.choice(["truncate", "overwrite"]), "fraction": rng.uniform(0.05, 0.9),
                       "free_fraction": rng.uniform(0.1, 0.7)}
        self.record: dict[str, Any] = {"trial": index, "kind": kind, "trigger_step": self.trigger_step,
                                       "delay_s": round(self.delay, 3), "problems": []}
        self.before: list[str] = []
        self.reached_at: float | None = None
        self.injected = False

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)

    def poll(self, run: Run) -> None:
        """Called while the fault run runs: inject once the trigger step (and delay) has passed."""
        if self.injected or run.step() < self.trigger_step:
            return
        if self.reached_at is None:
            self.reached_at = time.perf_counter()
        if time.perf_counter() - self.reached_at < self.delay:
            return
        self.before = self.run.complete_tags()
        done = INJECT[self.kind](self, run)
        if done:
            self.injected = True
            self.record.update(injected_at_step=run.step(), complete_before=self.before, fault=done)


def inject_kill_rank(trial: Trial, run: Run) -> str | None:
    ranks = run.ranks()
    if len(ranks) < 2:
        return None
    victim = ranks[trial.choice["rank"]]
    which = " ".join(a for a in victim.cmdline() if a.startswith("--local_rank"))
    victim.send_signal(signal.SIGKILL)
    return f"SIGKILL rank pid {victim.pid} ({which})"


def inject_kill_job(trial: Trial, run: Run) -> str:
    os.killpg(run.proc.pid, signal.SIGKILL)
    return f"SIGKILL process group {run.proc.pid}"


def inject_sigterm(trial: Trial, run: Run) -> str:
    os.killpg(run.proc.pid, signal.SIGTERM)
    return f"SIGTERM process group {run.proc.pid}"


def inject_corrupt_shard(trial: Trial, run: Run) -> str:
    shard = trial.args.work / "data" / "captions" / f"train-{trial.choice['shard']:06d}.tar"
    data = bytearray(shard.read_bytes())
    cut = int(len(data) * trial.choice["fraction"])
    if trial.choice["damage"] == "truncate":
        shard.write_bytes(bytes(data[:cut]))
        return f"truncated {shard.name} to {cut} of {len(data)} bytes"
    length = min(4096, len(data) - cut)
    data[cut:cut + length] = random.Random(cut).randbytes(length)
    shard.write_bytes(bytes(data))
    return f"overwrote bytes {cut}..{cut + length} of {shard.name} ({len(data)} bytes) with random bytes"


def inject_fill_disk(trial: Trial, run: Run) -> str | None:
    if not trial.before:
        return None  # wait for a complete checkpoint: its size says what cannot fit
    size = sum(p.stat().st_size for p in trial.run.checkpoint(trial.before[-1]).rglob("*") if p.is_file())
    leave = int(size * trial.choice["free_fraction"])
    filler = trial.disk / "filler"
    with filler.open("wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, max(free_bytes(trial.disk) - leave, 1))
    free = free_bytes(trial.disk)
    return f"filled the tmpfs: {free >> 10} KiB left, a checkpoint is {size >> 10} KiB"


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


INJECT = {"kill_rank": inject_kill_rank, "kill_job": inject_kill_job, "corrupt_shard": inject_corrupt_shard,
          "fill_disk": inject_fill_disk, "sigterm": inject_sigterm}


def outcome_problems(trial: Trial, run: Run) -> list[str]:
    """How the fault run's ending differs from what its kind should give (empty: as specified)."""
    log, rc = run.log(), run.rc
    stopped = [line for line in log.splitlines() if line.startswith("pipeline.train: stopped")]
    if trial.kind == "kill_rank" and rc == 0:
        return ["exit 0 after a rank was killed"]
    if trial.kind == "corrupt_shard":
        shard = f"train-{trial.choice['shard']:06d}.tar"
        if rc == 5 and shard not in "\n".join(stopped):
            return [f"exit 5 without naming {shard}: {stopped}"]
        return [] if rc in (0, 5) else [f"exit {rc}, expected 0 (skips) or 5 (data failure budget)"]
    if trial.kind == "fill_disk" and RunDir.tag_for(trial.args.steps) in trial.before:  # no save left to fail
        return [] if rc == 0 and trial.run.finished_path.is_file() else [f"exit {rc} after the final save"]
    if trial.kind == "fill_disk":
        problems = [] if rc == 4 else [f"exit {rc}, expected 4"]
        if len(stopped) != 1 or "checkpoint" not in stopped[0]:
            problems.append(f"expected one 'pipeline.train: stopped: ... checkpoint ...' line, got {stopped}")
        return problems
    if trial.kind == "sigterm":
        if rc != 0:
            return [f"exit {rc} after SIGTERM, expected 0"]
        stop = re.findall(r"checkpointing at step (\d+) and exiting", log)
        if not stop and not trial.run.finished_path.is_file():
            return ["no 'checkpointing at step N' line and not FINISHED"]
        if stop and not trial.run.is_complete(RunDir.tag_for(int(stop[-1]))):
            return [f"no complete checkpoint at the stop step {stop[-1]}"]
    return []


def checkpoint_losses(trial: Trial) -> tuple[list[str], list[str]]:
    """(checkpoints complete before the fault now gone or unreadable (keep_last pruning aside),
    COMPLETE checkpoints that do not load)."""
    now = trial.run.complete_tags()
    bad = []
    for tag in now:
        try:
            merge_moe_checkpoint(trial.run.checkpoint(tag))
            json.loads((trial.run.checkpoint(tag) / RUN_STATE).read_text())
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            bad.append(f"{tag}: {type(exc).__name__}: {str(exc)[:200]}")
    lost = []
    for tag in trial.before:
        if tag in now:
            lost += [b for b in bad if b.startswith(tag)]
        elif len(newer := [t for t in now if RunDir.step_of(t) > RunDir.step_of(tag)]) < trial.args.keep_last:
            lost.append(f"{tag}: gone ({len(newer)} newer complete, keep_last "
                        f"{trial.args.keep_last})")
    return lost, bad


# -------------------------------------------------------------------------------------- recovery
def samples_lost(trial: Trial, captions: Path) -> int | None:
    """Training samples (run_state samples_seen vs steps x global batch) plus eval samples (num_samples vs
    the manifest's val split) missing or extra at the end; None when the run did not finish."""
    run = trial.run
    if not run.finished_path.is_file():
        return None
    tag = run.finished_path.read_text().strip()
    state = json.loads((run.checkpoint(tag) / RUN_STATE).read_text())
    batch = json.loads(run.ds_config_path.read_text())["train_batch_size"]
    evaluated = json.loads(run.eval_path(tag).read_text())["num_samples"]
    expected_eval = json.loads((captions / "manifest.json").read_text())["splits"]["val"]["num_samples"]
    trial.record.update(samples_seen=state["samples_seen"], expected_samples=trial.args.steps * batch,
                        eval_num_samples=evaluated, manifest_val_samples=expected_eval)
    return abs(state["samples_seen"] - trial.args.steps * batch) + abs(int(evaluated) - expected_eval)


def recover_and_rerun(trial: Trial, run_args: tuple) -> Run:
    """What a user does after this kind of fault, then the rerun with RESUME=auto."""
    if trial.kind == "corrupt_shard":
        out = data_prep(trial.args.work, trial.folder / "data_prep.log")
        summary = [line for line in out.splitlines() if line.startswith("data_prep pairs")]
        trial.record["data_prep_rerun"] = summary[0] if summary else out[-300:]
    if trial.kind == "fill_disk":
        subprocess.run(["mount", "-o", f"remount,size={TMPFS_ROOMY}", str(trial.disk)], check=True)
    newest = trial.run.complete_tags()
    trial.record["newest_complete_at_rerun"] = newest[-1] if newest else None
    rerun = Run(*run_args, trial.run_dir, trial.folder / "rerun.log").execute()
    found = re.search(r"resumed from (\S+) \(step (\d+)\)", rerun.log())
    finished = trial.run.finished_path
    final = finished.is_file() and finished.read_text().strip() == RunDir.tag_for(trial.args.steps)
    trial.record.update(rerun_rc=rerun.rc, rerun_s=round(rerun.wall, 1), rerun_hang=rerun.hang,
                        resumed_from=Path(found.group(1)).name if found else None, finished=final)
    trial.record["resumed"] = bool(found) and final and rerun.rc == 0
    if found and Path(found.group(1)).name != trial.record["newest_complete_at_rerun"]:
        trial.record["problems"].append(f"resumed from {found.group(1)}, newest complete was "
                                        f"{trial.record['newest_complete_at_rerun']}")
    if rerun.leftover:
        trial.record["problems"].append(f"rerun left processes behind: {rerun.leftover}")
    return rerun


def run_trial(trial: Trial, captions: Path, tokenizer: Path) -> dict[str, Any]:
    trial.disk.mkdir(parents=True, exist_ok=True)
    run_args = (trial.args, captions, tokenizer)
    if trial.kind == "fill_disk":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(trial.disk)], check=True)
    try:
        start = time.perf_counter()
        run = Run(*run_args, trial.run_dir, trial.folder / "fault.log").execute(trial.poll)
        rec = trial.record
        rec.update(fault_rc=run.rc, fault_s=round(run.wall, 1), fault_hang=run.hang, fault_leftover=run.leftover,
                   data_skips=max([row.get("data/skipped_samples", 0) for row in common.read_log(trial.run_dir)] + [0]))
        if not trial.injected:
            rec["problems"].append(f"fault not injected: the run ended (exit {run.rc}) before step "
                                   f"{trial.trigger_step} + {trial.delay:.2f} s")
        rec["problems"] += outcome_problems(trial, run) if trial.injected else []
        if run.leftover:
            rec["problems"].append(f"processes left behind after exit: {run.leftover}")
        rec["checkpoints_lost"], rec["complete_but_unloadable"] = checkpoint_losses(trial)
        rec["problems"] += [f"COMPLETE checkpoint does not load: {b}" for b in rec["complete_but_unloadable"]]
        rerun = recover_and_rerun(trial, run_args)
        rec["samples_lost"] = samples_lost(trial, captions)
        rec["hangs"] = int(run.hang) + int(rerun.hang)
        rec["trial_s"] = round(time.perf_counter() - start, 1)
        if rec["problems"] or rec["checkpoints_lost"] or rec["samples_lost"] or rec["hangs"] or not rec["resumed"]:
            rec["logs"] = {"fault": run.log()[-6000:], "rerun": rerun.log()[-6000:]}
        return rec
    finally:
        if trial.kind == "fill_disk" and os.path.ismount(trial.disk):
            subprocess.run(["umount", str(trial.disk)], check=False)


def tmpfs_problem(work: Path) -> str | None:
    """None when ``mount -t tmpfs`` works here (root), else why not."""
    probe = work / "tmpfs_probe"
    probe.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True,
                          text=True)
    if proc.returncode:
        return f"mount -t tmpfs failed ({proc.returncode}): {proc.stderr.strip()[:200]}"
    subprocess.run(["umount", str(probe)], check=False)
    return None


# ------------------------------------------------------------------------------------------ report
def summary_rows(records: list[dict[str, Any]], kinds: list[str]) -> list[list[Any]]:
    rows = []
    for kind in [*kinds, "all"]:
        recs = [r for r in records if kind in ("all", r["kind"])]
        done = [r for r in recs if "skipped" not in r]
        if not done:
            rows.append([kind, 0, "-", "-", "-", "-", "-", f"skipped: {recs[0]['skipped']}" if recs else "-"])
            continue
        lost = [r["samples_lost"] for r in done]
        rows.append([kind, sum("fault" in r for r in done), f"{sum(r['resumed'] for r in done)}/{len(done)}",
                     sum(lost) if None not in lost else f"n/a ({lost.count(None)} unfinished)",
                     sum(len(r["checkpoints_lost"]) for r in done), sum(r["hangs"] for r in done),
                     sum(bool(r["problems"]) for r in done), sum(r["trial_s"] for r in done) / len(done)])
    return rows


def trial_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    return [[r["trial"], r["kind"], r.get("injected_at_step", "-"), r.get("fault", "-"), r.get("fault_rc"),
             r.get("data_skips"), r.get("resumed_from"), r.get("rerun_rc"), r.get("samples_lost"),
             len(r.get("checkpoints_lost", [])), r.get("hangs"), "; ".join(r.get("problems", [])) or "-",
             r.get("trial_s")]
            for r in records if "skipped" not in r]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work = args.work.absolute()
    captions, tokenizer = ensure_data(args.work)
    no_tmpfs = tmpfs_problem(args.work) if "fill_disk" in args.kinds else None
    rng = random.Random(args.seed)
    records = []
    for index in range(args.trials):
        trial = Trial(index, args.kinds[index % len(args.kinds)], args, rng)
        if trial.kind == "fill_disk" and no_tmpfs:
            records.append({"trial": index, "kind": trial.kind, "skipped": no_tmpfs})
            continue
        subprocess.run(["rm", "-rf", "--one-file-system", str(trial.folder)], check=False)
        record = run_trial(trial, captions, tokenizer)
        records.append(record)
        print(f"trial {index} {trial.kind}: {record.get('fault')} at step {record.get('injected_at_step')}; exit "
              f"{record['fault_rc']}, rerun exit {record['rerun_rc']} resumed from {record['resumed_from']}; "
              f"problems {record['problems'] or 'none'} ({record['trial_s']:.0f} s)", flush=True)
    print(f"\nfault injection, {args.trials} trials, seed {args.seed}, {args.steps} steps, checkpoint every "
          f"{args.save_every}, keep_last {args.keep_last}, hang timeout {args.timeout:.0f} s; {common.load_line()}")
    table = common.print_table(["kind", "injected", "resumed", "samples lost", "checkpoints lost", "hangs",
                                "unexpected", "s per trial"], summary_rows(records, args.kinds))
    print()
    common.print_table(["trial", "kind", "step", "fault", "exit", "data skips", "resumed from", "rerun exit",
                        "samples lost", "ckpts lost", "hangs", "problems", "s"], trial_rows(records))
    payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "tmpfs": no_tmpfs or "mount -t tmpfs works", "table": table, "trials": records}
    if args.output is None:
        common.write_result("fault_inject", payload)
    else:
        payload = {"benchmark": "fault_inject", "command": " ".join([Path(sys.executable).name, *sys.argv]),
                   "machine": common.machine(), **payload}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"wrote {args.output}")
    bad = [r for r in records if "skipped" not in r and (r["problems"] or r["checkpoints_lost"] or r["hangs"]
                                                         or r["samples_lost"] or not r["resumed"])]
    for r in bad:
        print(f"\n=== trial {r['trial']} ({r['kind']}): {r['problems']} lost {r['checkpoints_lost']} ===\n"
              f"--- fault run log (tail) ---\n{r['logs']['fault'][-3000:]}\n--- rerun log (tail) ---\n"
              f"{r['logs']['rerun'][-3000:]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
