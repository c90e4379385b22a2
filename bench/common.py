"""Shared pieces of the end-to-end benchmarks (bench_train, bench_scaling, bench_memory, bench_moe_quality,
bench_data_loading): the cached synth corpus, launching ``pipeline.train`` under the real ``deepspeed``
launcher, reading ``RUN/train_log.jsonl``, machine facts, tables and result JSON.

Runs go through ``bench/rank_probe.py`` (``--module bench.rank_probe``), which calls ``pipeline.train``'s
``main`` unchanged and writes each rank's peak RSS to ``RUN/probe/rank{R}.json``.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BENCH_RUNS = REPO / "runs" / "bench"  # git-ignored: cached synth data, tokenizer, run folders
VL_RECIPE = "launch/recipes/vl_pretrain.yaml"
DEMO_TOKENS_VOCAB = 1000

#: the demo model of launch/recipes/vl_pretrain.yaml, and a larger one (~4x FLOPs per sample) that still
#: trains in seconds per step on 2 CPU cores
MODEL_SIZES: dict[str, list[str]] = {
    "demo": [],
    "large": ["model.hidden_size=384", "model.num_heads=6", "model.num_layers=8", "model.num_fusion_layers=2"],
}


def moe_sets(experts: int, ep_size: int, impl: str = "gshard") -> list[str]:
    """``--set`` args: dense baseline (experts <= 1: no MoE layer, same active parameters) or top-1 MoE
    with ``experts`` experts in every other block, implementation ``impl`` (``model.moe.impl``)."""
    if experts <= 1:
        return ["model.moe.every=0", "model.moe.num_experts=1", "model.moe.ep_size=1"]
    return ["model.moe.every=2", f"model.moe.num_experts={experts}", "model.moe.top_k=1",
            f"model.moe.ep_size={ep_size}", f"model.moe.impl={impl}"]


# ------------------------------------------------------------------------------------------- data
def ensure_synth(root: Path = BENCH_RUNS, num_samples: int = 4000,
                 tokenizer_parts: tuple[str, ...] = ("captions",)) -> tuple[Path, Path]:
    """(captions folder, tokenizer folder): ``data_prep synth`` + ``data_prep tokenizer`` trained on the synth
    ``tokenizer_parts`` (captions, vqa, retrieval), each made once."""
    data = root / f"synth{num_samples}"
    suffix = "" if tokenizer_parts == ("captions",) else "_" + "_".join(tokenizer_parts)
    tokenizer = root / f"tokenizer{num_samples}{suffix}"
    if not (data / "captions" / "manifest.json").is_file():
        _data_prep("synth", "--output", data, "--num-samples", num_samples, "--no-progress")
    if not (tokenizer / "tokenizer.json").is_file() and not (tokenizer / "vocab.txt").is_file():
        _data_prep("tokenizer", "--shards", *(data / part for part in tokenizer_parts), "--vocab-size",
                   DEMO_TOKENS_VOCAB, "--output", tokenizer)
    return data / "captions", tokenizer


def _data_prep(*args: Any) -> None:
    cmd = [sys.executable, "-m", "data_prep", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def data_sets(captions: Path, tokenizer: Path, eval_split: str | None = None, workers: int = 1) -> list[str]:
    sets = [f"data.train=[{{path: {captions}, split: train}}]", f"data.tokenizer={tokenizer}",
            f"data.num_workers={workers}"]
    sets.append(f"data.eval={{path: {captions}, split: {eval_split}}}" if eval_split else "data.eval=null")
    return sets


# ------------------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    return env


def train_command(run_dir: Path, sets: Iterable[str], nproc: int = 2, ds_config: str = "ds_configs/zero2_bf16.json",
                  recipe: str = VL_RECIPE, port: int | None = None) -> list[str]:
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    port = port or free_port()
    args = [deepspeed, "--num_gpus", str(nproc), "--master_port", str(port), "--module", "bench.rank_probe",
            "--recipe", recipe, "--ds-config", ds_config, "--output-dir", str(run_dir)]
    for item in sets:
        args += ["--set", item]
    return args


def shell_line(cmd: list[str]) -> str:
    """The command as a user would paste it (repo-relative where possible)."""
    import shlex

    parts = [os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c for c in cmd]
    parts = ["deepspeed" if p.endswith("/deepspeed") else p for p in parts]
    return " ".join(shlex.quote(p) for p in parts)


def run_training(run_dir: Path, sets: list[str], nproc: int = 2, ds_config: str = "ds_configs/zero2_bf16.json",
                 timeout: float = 900, recipe: str = VL_RECIPE, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Launch one ``pipeline.train`` run (fresh ``run_dir``); returns wall time, log rows, probe reports.
    ``env``: extra environment variables for the launcher and its ranks (e.g. ``bench.rank_probe`` switches)."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    port = free_port()
    cmd = train_command(run_dir, sets, nproc, ds_config, recipe, port)
    start = time.perf_counter()
    try:
        with (run_dir / "launcher.log").open("w") as log:
            proc = subprocess.run(cmd, cwd=REPO, env={**launcher_env(), **(env or {})}, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout)
    finally:
        remove_shm_buffers(port)
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = (run_dir / "launcher.log").read_text()[-4000:]
        raise RuntimeError(f"run {run_dir} failed ({proc.returncode}); log tail:\n{tail}")
    return {"run_dir": str(run_dir), "command": shell_line(cmd), "wall_s": wall, "log": read_log(run_dir),
            "probe": read_probe(run_dir), "load_average": os.getloadavg()}


def remove_shm_buffers(port: int) -> list[str]:
    """Unlink the /dev/shm all-reduce workspaces (66 MiB per rank) that DeepSpeed's CPU SHM comm op
    creates for a run on ``port`` and never removes; safe once that run's ranks have exited."""
    removed = []
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_probe(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((Path(run_dir) / "probe").glob("rank*.json"))]


def read_eval(run_dir: Path) -> dict[str, float]:
    files = sorted((Path(run_dir) / "eval").glob("step_??????.json"))
    return json.loads(files[-1].read_text()) if files else {}


def measured_window(rows: list[dict[str, Any]], warmup_steps: int) -> dict[str, float]:
    """Step-weighted means over the log rows after ``warmup_steps`` (rows cover log_every steps each)."""
    kept, previous = [], 0
    for row in rows:
        if "train/step_time_s" not in row:
            continue
        steps = row["step"] - previous
        previous = row["step"]
        if row["step"] > warmup_steps:
            kept.append((steps, row))
    if not kept:
        raise ValueError(f"no log rows after step {warmup_steps}")
    total = sum(s for s, _ in kept)
    time_total = sum(s * r["train/step_time_s"] for s, r in kept)

    def mean(key: str) -> float | None:  # time-weighted (rates and fractions are per second)
        if any(key not in r for _, r in kept):
            return None
        return sum(s * r["train/step_time_s"] * r[key] for s, r in kept) / time_total

    return {"measured_steps": total, "step_time_s": time_total / total,
            "samples_per_s": mean("train/samples_per_s"), "tokens_per_s": mean("train/tokens_per_s"),
            "data_wait_frac": mean("train/data_wait_frac"), "trainer_mfu": mean("train/mfu"),
            "step_time_spread": _spread([r["train/step_time_s"] for _, r in kept])}


def _spread(values: list[float]) -> float:
    """(max - min) / median of per-window step times: how steady the machine was."""
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0


def plan(sets: list[str], world_size: int, ds_config: str = "ds_configs/zero2_bf16.json",
         recipe: str = VL_RECIPE) -> dict[str, Any]:
    """``pipeline.plan --json`` for the same recipe and overrides."""
    cmd = [sys.executable, "-m", "pipeline.plan", "--recipe", recipe, "--ds-config", ds_config,
           "--skip-input-checks", "--world-size", str(world_size), "--json"]
    for item in sets:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"pipeline.plan failed: {proc.stderr[-2000:]}")
    out = proc.stdout
    return json.loads(out[out.index("{"):])


# ----------------------------------------------------------------------------------- reporting
def machine() -> dict[str, Any]:
    import torch

    try:
        import deepspeed  # noqa: F401  (version only)
        ds_version = deepspeed.__version__
    except Exception:  # pragma: no cover - reported, not fatal
        ds_version = "unavailable"
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"cpu": model, "cpus": os.cpu_count(), "ram_gib": round(mem / 2**30, 1), "torch": torch.__version__,
            "deepspeed": ds_version, "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def print_table(headers: list[str], rows: list[list[Any]]) -> str:
    """Markdown table (printed and returned)."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{time.strftime('%Y%m%d_%H%M%S', time.gmtime())}.json"
    payload = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "machine": machine(), "load_average_end": os.getloadavg(), **payload}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return path


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def phase_means(probes: list[dict[str, Any]], skip: int) -> dict[str, float]:
    """Mean seconds per call of engine forward/backward/step after ``skip`` calls, averaged over ranks."""
    out: dict[str, float] = {}
    for phase in ("forward", "backward", "step"):
        values = [statistics.mean(p["phase_s"][phase][skip:]) for p in probes
                  if len(p.get("phase_s", {}).get(phase, [])) > skip]
        if values:
            out[f"{phase}_s"] = statistics.mean(values)
    return out
