"""Run pytest node ids again and again under extra CPU load: is a test that timed out a real hang or slow?

    .venv/bin/python bench/stress_tests.py --tests \\
        tests/test_model_distributed.py::test_ranks_with_different_batches_neither_crash_nor_hang \\
        tests/test_finetune_vqa_retrieval.py::test_retrieval_finetune_then_evaluate_any_world_size \\
        --repeats 5 --load-procs 2

Starts ``--load-procs`` busy-loop processes (pure Python, nice 0), then runs each node id ``--repeats`` times,
each in a fresh ``python -m pytest NODEID -p no:cacheprovider -q`` process (OMP_NUM_THREADS=1, session of its
own, killed with all its descendants after ``--run-timeout`` s). Records per run the outcome (passed, failed, timed
out: the test's own wait gave up, pytest-timeout fired, or the run hit ``--run-timeout``), the seconds and the
1-minute load average at its start (``os.getloadavg``, which counts everything on the machine, not only the
load processes). Prints each run as it ends (the tail of its output when it did not pass), then a table per
test: runs, passed, failed, timed out, min/median/max seconds, load averages at the runs' starts. Writes JSON
to bench/results/stress_<time>.json and the full output of every run that did not pass next to it
(``stress_<time>/<test>_<run>.log``): a timed-out launcher test ends with each rank's Python stacks.
The load processes and the running test are stopped however the script ends (normal exit, exception, Ctrl-C,
SIGTERM). A SIGKILL of this script still kills the load processes and the pytest process (the kernel's
parent-death signal), but not the ranks a launcher test started.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BUSY_LOOP = "while True:\n    pass\n"
PR_SET_PDEATHSIG = 1
#: what a timeout looks like in a pytest run's output: tests.launcher's communicate_or_fail, a plain
#: subprocess timeout, pytest-timeout
TIMEOUT_MARKERS = re.compile(r"still running after \d+ s|subprocess\.TimeoutExpired|Timeout \(>|"
                             r"\+{5,} Timeout \+{5,}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tests", nargs="+", required=True, metavar="NODEID",
                   help="pytest node ids (tests/test_x.py::test_name), run in this order, --repeats times each")
    p.add_argument("--repeats", type=int, default=5, help="runs per node id, each a fresh pytest process")
    p.add_argument("--load-procs", type=int, default=2, help="busy-loop processes running meanwhile (0: none)")
    p.add_argument("--run-timeout", type=float, default=1200.0,
                   help="seconds before a pytest process and its children are killed (counted as timed out)")
    p.add_argument("--tail-chars", type=int, default=3000, help="output shown for a run that did not pass")
    args = p.parse_args(argv)
    for name, value, low in (("--repeats", args.repeats, 1), ("--load-procs", args.load_procs, 0),
                             ("--tail-chars", args.tail_chars, 0)):
        if value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    if args.run_timeout <= 0:
        p.error(f"--run-timeout must be > 0 seconds, got {args.run_timeout}")
    return args


# ------------------------------------------------------------------------------------------- load
def _die_with_parent() -> None:
    """preexec_fn of a child: SIGKILL to it when this script dies, even by SIGKILL (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _load_process_setup() -> None:
    """preexec_fn of a load process: nice 0 (as the tests' processes, even when this script runs niced)
    and killed with this script."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except PermissionError:  # lowering an inherited niceness needs root: the load then runs niced too
        pass
    _die_with_parent()


def start_load(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], preexec_fn=_load_process_setup,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(count)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


def _raise_exit(signum, _frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the load and the run


# ------------------------------------------------------------------------------------------- runs
def pytest_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_once(node_id: str, timeout: float) -> dict:
    """One fresh pytest process for ``node_id``: {outcome, seconds, load_at_start, returncode, output}."""
    load = os.getloadavg()[0]
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", node_id, "-p", "no:cacheprovider", "-q"],
                            cwd=REPO, env=pytest_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_die_with_parent)
    killed = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        killed = True
        _kill_session(proc.pid)
        output, _ = proc.communicate()
    finally:
        if proc.poll() is None:  # Ctrl-C or SIGTERM of this script: no run left behind
            _kill_session(proc.pid)
            proc.wait()
    seconds = time.monotonic() - start
    if killed:
        outcome = "timed_out"
        output += f"\n[stress_tests] killed after {timeout:.0f} s (--run-timeout)\n"
    elif proc.returncode == 0:
        outcome = "passed"
    else:
        outcome = "timed_out" if TIMEOUT_MARKERS.search(output) else "failed"
    return {"outcome": outcome, "seconds": round(seconds, 1), "load_at_start": round(load, 2),
            "returncode": proc.returncode, "output": output}


def _kill_session(pid: int) -> None:
    """SIGKILL to the pytest process, its process group and all its descendants (tests.launcher starts the
    deepspeed launcher in a session of its own, so the group alone would leave the ranks running)."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        procs = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


# ----------------------------------------------------------------------------------------- report
def summarise(node_id: str, runs: list[dict]) -> dict:
    times = [r["seconds"] for r in runs]
    count = {o: sum(r["outcome"] == o for r in runs) for o in ("passed", "failed", "timed_out")}
    return {"test": node_id, "runs": len(runs), **count, "min_s": min(times),
            "median_s": statistics.median(times), "max_s": max(times),
            "load_at_starts": [r["load_at_start"] for r in runs]}


def format_table(rows: list[dict]) -> str:
    """One line per test (its function name; the JSON has the node id)."""
    names = [r["test"].split("::")[-1] for r in rows]
    width = max(len("test"), *map(len, names))
    header = (f"{'test':<{width}} {'runs':>4} {'pass':>4} {'fail':>4} {'t/o':>4} {'min s':>7} {'med s':>7} "
              f"{'max s':>7}  load avg (1 min) at each run's start")
    lines = [header, "-" * len(header)]
    for name, r in zip(names, rows):
        loads = " ".join(f"{x:.1f}" for x in r["load_at_starts"])
        lines.append(f"{name:<{width}} {r['runs']:>4} {r['passed']:>4} {r['failed']:>4} {r['timed_out']:>4} "
                     f"{r['min_s']:>7.1f} {r['median_s']:>7.1f} {r['max_s']:>7.1f}  {loads}")
    return "\n".join(lines)


def log_name(node_id: str, index: int) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", node_id.split("::")[-1]) + f"_{index}.log"


def stress(args: argparse.Namespace, logs: Path) -> list[dict]:
    """Every node id ``args.repeats`` times; prints each run; keeps the full output of runs not passed."""
    results = []
    for node_id in args.tests:
        runs = []
        for index in range(1, args.repeats + 1):
            run = run_once(node_id, args.run_timeout)
            print(f"{node_id} run {index}/{args.repeats}: {run['outcome']} in {run['seconds']:.1f} s "
                  f"(load avg at start {run['load_at_start']:.2f})", flush=True)
            output = run.pop("output")
            if run["outcome"] != "passed":
                logs.mkdir(parents=True, exist_ok=True)
                run["log"] = str(logs / log_name(node_id, index))
                Path(run["log"]).write_text(output)
                run["tail"] = output[-args.tail_chars:]
                print(f"--- last {args.tail_chars} characters (all in {run['log']}) ---\n{run['tail']}\n---",
                      flush=True)
            runs.append(run)
        results.append({**summarise(node_id, runs), "per_run": runs})
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    load = start_load(args.load_procs)
    try:
        print(f"{args.load_procs} load processes (pids {[p.pid for p in load]}), {os.cpu_count()} CPUs, "
              f"load avg {os.getloadavg()[0]:.2f}", flush=True)
        results = stress(args, RESULTS / f"stress_{stamp}")
    finally:
        stop_load(load)
        signal.signal(signal.SIGTERM, previous)
    print(format_table(results))
    out = RESULTS / f"stress_{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "cpus": os.cpu_count(), "results": results}, indent=1))
    print(f"wrote {out}")
    return 0 if all(r["passed"] == r["runs"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
