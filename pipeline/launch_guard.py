"""Run the deepspeed launcher so that a preemption signal, however it is delivered, ends in one complete
checkpoint, exit 0 and no process left behind.

    python -m pipeline.launch_guard [--grace-period 180] -- deepspeed --num_gpus 2 --module pipeline.train ...

Clusters stop a job with SIGINT (Ctrl-C), SIGTERM or SIGUSR1 sent to the process group, to PID 1 only, or to
every process of the job step (SLURM). The deepspeed processes between a script and the ranks do the wrong
thing with them: the single-node runner dies and orphans launch.py and the ranks; launch.py answers SIGINT /
SIGTERM by terminating the ranks (SIGKILL after 30 s), mid-checkpoint; SIGUSR1 kills both. So:

- the launcher command starts with SIGINT, SIGTERM and SIGUSR1 *blocked*. A blocked mask is inherited across
  fork and exec and Python's ``signal.signal`` does not unblock, so the runner and launch.py never act on
  them, whoever sends them. The ranks (``pipeline.run.trainer``) install handlers, then unblock them.
- this process handles all three: from the first one on it sends SIGUSR1 to every rank (the children of
  launch.py), also to ranks that start later. The ranks checkpoint at the next step boundary (or finish the
  checkpoint they are writing) and exit 0; launch.py and the runner then exit 0 too. Repeated signals are
  only logged (a group-wide signal also arrives forwarded by the calling script).
- it is a child subreaper (Linux): a descendant orphaned by a dying launcher is re-parented here instead
  of to PID 1. When the launcher exits with descendants still alive, they are asked to stop the same way;
  ``--grace-period`` seconds after the first signal (or that exit) every descendant still alive is killed.

Exit status: the launcher's (0 after a preemption checkpoint); 1 when processes had to be killed.
The ranks get the grace period as ``PREEMPT_GRACE_S`` (``pipeline.run.distributed.watch_launcher``).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

import psutil

PREEMPTION_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
LAUNCH_MODULE = "deepspeed.launcher.launch"  # its children are the ranks
DEFAULT_GRACE_S = 180.0  # launch/slurm.sbatch asks SLURM for SIGUSR1 180 s before the time limit
POLL_S = 0.2
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def log(message: str) -> None:
    print(f"launch_guard: {message}", file=sys.stderr, flush=True)


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process (Linux >= 3.4); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def start_with_signals_blocked(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        return subprocess.Popen(command, env=env)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def live_descendants() -> list[psutil.Process]:
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def rank_processes(descendants: list[psutil.Process]) -> list[psutil.Process]:
    """Children of launch.py; before launch.py exists (or without one), the launched command itself."""
    launchers, ranks = set(), []
    for proc in descendants:
        try:
            if LAUNCH_MODULE in proc.cmdline():
                launchers.add(proc.pid)
        except psutil.Error:
            pass
    for proc in descendants:
        try:
            if proc.ppid() in launchers:
                ranks.append(proc)
        except psutil.Error:
            pass
    return ranks


class Guard:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.child: subprocess.Popen | None = None
        self.stop_since: float | None = None
        self.asked: set[int] = set()
        self.killed: list[int] = []
        self.received: list[str] = []
        self.logged = 0

    def on_signal(self, signum: int, _frame: object) -> None:
        self.received.append(signal.Signals(signum).name)  # logged by the loop: no I/O in a handler
        if self.stop_since is None:
            self.stop_since = time.monotonic()

    def log_signals(self) -> None:
        for i, name in enumerate(self.received[self.logged:], start=self.logged):
            log(f"{name}: asking the ranks to checkpoint and exit (grace period {self.grace_s:.0f} s)"
                if i == 0 else f"{name} again: already stopping")
        self.logged = len(self.received)

    def run(self) -> int:
        while True:
            self.reap()
            self.log_signals()
            descendants = live_descendants()
            if self.child.returncode is not None and not descendants:
                break
            if self.child.returncode is not None and self.stop_since is None:
                log(f"launcher exited ({self.child.returncode}) leaving {len(descendants)} processes: "
                    "asking them to stop")
                self.stop_since = time.monotonic()
            if self.stop_since is not None:
                self.ask_ranks(descendants)
                if time.monotonic() - self.stop_since > self.grace_s:
                    self.kill(descendants)
            time.sleep(POLL_S)
        if self.killed:
            return 1
        code = self.child.returncode
        return code if code >= 0 else 128 - code

    def ask_ranks(self, descendants: list[psutil.Process]) -> None:
        if self.child.returncode is not None:
            targets = descendants  # orphans: the ranks see their launcher gone; SIGUSR1 says the same
        else:
            targets = rank_processes(descendants) or [psutil.Process(self.child.pid)]
        for proc in targets:
            if proc.pid not in self.asked:
                self.asked.add(proc.pid)
                try:
                    proc.send_signal(signal.SIGUSR1)
                except psutil.Error:
                    pass

    def kill(self, descendants: list[psutil.Process]) -> None:
        targets = [p for p in descendants if p.pid not in self.killed]
        if targets:
            log(f"still running {self.grace_s:.0f} s after the stop request: killing "
                f"{[p.pid for p in targets]}")
        for proc in targets:
            self.killed.append(proc.pid)
            try:
                proc.kill()
            except psutil.Error:
                pass

    def reap(self) -> None:
        """Collect exited children: the launcher (its exit status) and orphans re-parented here."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child.pid:
                self.child.returncode = os.waitstatus_to_exitcode(status)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline.launch_guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grace-period", type=float, default=DEFAULT_GRACE_S, metavar="SECONDS",
                        help="after a stop signal, kill whatever still runs this many seconds later "
                             f"[{DEFAULT_GRACE_S:.0f}]")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the launcher command")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the launcher command after --, e.g. -- deepspeed --num_gpus 2 --module pipeline.train ...")
    if args.grace_period <= 0:
        parser.error(f"--grace-period must be > 0 seconds, got {args.grace_period}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not become_subreaper():
        log("not Linux: processes orphaned by the launcher cannot be collected")
    env = {**os.environ, "PREEMPT_GRACE_S": str(args.grace_period)}
    guard = Guard(args.grace_period)
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, guard.on_signal)
    try:
        guard.child = start_with_signals_blocked(args.command, env)
    except OSError as exc:
        log(f"cannot start {args.command[0]!r}: {exc}")
        return 127
    rc = guard.run()
    for sig in PREEMPTION_SIGNALS:  # a late one during interpreter teardown (default action again) would kill us
        signal.signal(sig, signal.SIG_IGN)
    return rc


if __name__ == "__main__":
    sys.exit(main())
