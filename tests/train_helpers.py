"""Helpers for the pipeline.train launcher tests: start/stop runs, read checkpoints and TensorBoard."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import psutil
import torch

from tests.launcher import REPO, free_port, launcher_env, stop_with_stacks, timeout_message

VL_RECIPE = "launch/recipes/vl_pretrain.yaml"
DS_ZERO2_BF16 = "ds_configs/zero2_bf16.json"


def train_cmd(out: Path, tiny_args: list[str], extra: list[str], recipe: str = VL_RECIPE,
              ds_config: str = DS_ZERO2_BF16, nproc: int = 2, launcher_args: list[str] | None = None) -> list[str]:
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    launcher = launcher_args if launcher_args is not None else ["--num_gpus", str(nproc), "--master_port",
                                                                 str(free_port())]
    return [deepspeed, *launcher, "--module", "pipeline.train", "--recipe", recipe, "--ds-config", ds_config,
            "--output-dir", str(out), *tiny_args, *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start in its own session (so the test can signal exactly this run's processes)."""
    handle = log.open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=launcher_env(), stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log_path = log  # where fail_with_stacks finds the stacks
    return proc


def run(cmd: list[str], log: Path, timeout: float = 400) -> int:
    proc = start(cmd, log)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        fail_with_stacks(proc, f"run still running after {timeout:.0f} s")


def fail_with_stacks(proc: subprocess.Popen, what: str) -> NoReturn:
    """Stop a run begun by ``start`` (the stacks of its processes go to its log first); raise with them."""
    listing = stop_with_stacks(proc.pid)
    proc.wait(timeout=60)
    raise AssertionError(timeout_message(what, listing, proc.log_path.read_text(errors="replace")))


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, what: str = "condition") -> None:
    """Poll ``predicate`` until true; AssertionError when the run (begun by ``start``) exits first, or after
    ``timeout`` with the stacks of its processes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {what}; log tail:\n"
                                 f"{proc.log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.05)
    fail_with_stacks(proc, f"timed out after {timeout:.0f} s waiting for {what}")


def rank_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training ranks (`python -m pipeline.train --local_rank=N`) under a launcher."""
    children = psutil.Process(proc.pid).children(recursive=True)
    def is_train(p: psutil.Process) -> bool:
        cmd = p.cmdline()
        return "pipeline.train" in cmd and "deepspeed.launcher.launch" not in cmd

    return [p for p in children if is_train(p) and not is_train(p.parent())]  # not their data workers


def complete(out: Path, step: int) -> bool:
    return (out / "checkpoints" / f"step_{step:06d}" / "COMPLETE").is_file()


def log_lines(out: Path) -> list[dict[str, Any]]:
    path = out / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def load_tensors(folder: Path) -> dict[str, Any]:
    """Every .pt file of a checkpoint folder (model, experts, optimizer shards; not the RNG files)."""
    return {p.name: torch.load(p, map_location="cpu", weights_only=False) for p in sorted(folder.glob("*.pt"))}


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))[:5]} differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def save_run_folder(recipe, run: Path) -> Path:
    """A run folder as pipeline.train leaves it (resolved recipe, DeepSpeed file layout: dense file plus one
    file per expert, COMPLETE), saved from a freshly built model of ``recipe`` (EP=1) in this process, in
    seconds instead of a launch. Returns its step-1 checkpoint folder."""
    from pipeline.recipe import dump_recipe
    from pipeline.run.build import build_model, build_task, load_tokenizer
    from pipeline.run.checkpoint_merge import EXPERT_KEY, expert_key
    from pipeline.tasks import DistInfo

    task = build_task(recipe, load_tokenizer(recipe.data.tokenizer), DistInfo(0, 1), build_model(recipe, 0))
    state = task.state_dict()
    folder = run / "checkpoints" / "step_000001"
    folder.mkdir(parents=True)
    (run / "resolved_recipe.yaml").write_text(dump_recipe(recipe))
    torch.save({"module": {k: v for k, v in state.items() if not EXPERT_KEY.match(k)}},
               folder / "mp_rank_00_model_states.pt")
    modules = sorted({m.group(1) for m in map(EXPERT_KEY.match, state) if m})
    for layer, module in enumerate(modules):
        for expert in range(recipe.model.moe.num_experts):
            torch.save({k: v for k, v in state.items() if k.startswith(expert_key(module, expert, ""))},
                       folder / f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt")
    (folder / "COMPLETE").write_text("1\n")
    return folder
