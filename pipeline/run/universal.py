"""Resume a run at another expert-parallel size or world size WITH its optimizer state: one command turns a
checkpoint into DeepSpeed's universal checkpoint in a new run folder, and the resume there needs nothing else.

    python -m pipeline.run.universal runs/vl --output runs/vl_ep1           # newest complete checkpoint
    python -m pipeline.run.universal runs/vl/checkpoints/step_000400 --output runs/vl_ep1
    launch/pretrain.sh launch/recipes/vl_pretrain.yaml runs/vl_ep1 --set model.moe.ep_size=1   # resume auto

What it writes: ``NEW/checkpoints/TAG`` = DeepSpeed's converter (``deepspeed.checkpoint.ds_to_universal``: every
parameter's fp32 weights and Adam moments under ``zero/``, the model files with their expert-placement metadata)
+ the step's ``run_state.json``, ``rng/``, a ``UNIVERSAL`` marker and ``COMPLETE`` (written last); ``NEW``'s
``resolved_recipe.yaml`` and ``ds_config.json`` are the run's. A resume (``--resume auto``) whose newest checkpoint
carries the marker switches DeepSpeed's ``checkpoint.load_universal`` on for that load
(``universal_resume_config``) and restores the module's buffers (the dropless expert bias) from the model file,
which a universal load skips; the checkpoints the run writes afterwards are ordinary ones, so later resumes need
nothing. RNG states are per rank: at another world size the new ranks start fresh streams (the run logs it).

Which runs: ZeRO stage 1 or 2 (the stages DeepSpeed's converter handles with expert parallelism), dense or
``model.moe.impl: dropless`` FFNs. ``gshard`` MoE runs are refused: DeepSpeed's universal checkpoint skips the
classic MoE's per-expert parameters (their optimizer state would be lost silently); resume those at their EP
size, or convert them first (``python -m pipeline.run.convert_moe``, weights only).
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.config_utils import ConfigError

log = logging.getLogger(__name__)

MARKER = "UNIVERSAL"  # in a checkpoint folder: written by this module; its resume needs load_universal


def refusal(recipe: dict[str, Any], ds_config: dict[str, Any] | None) -> str | None:
    """Why a run of this resolved recipe and engine config cannot become a universal checkpoint, or None."""
    from pipeline.model.config import ModelConfig

    cfg = ModelConfig(**recipe.get("model", {}))
    if cfg.moe_layers and cfg.moe.impl == "gshard":
        return ("its MoE layers are model.moe.impl: gshard, whose per-expert parameters DeepSpeed's universal "
                "checkpoint skips (their optimizer state would be lost): resume it at its EP size, or convert it "
                "with python -m pipeline.run.convert_moe (weights only) and start from that with init_from")
    stage = ((ds_config or {}).get("zero_optimization") or {}).get("stage", 0)
    if stage not in (1, 2):
        return (f"its engine ran ZeRO stage {stage}; DeepSpeed's converter reads the ZeRO-1/2 optimizer shards "
                "(stage 0 has none, and stage 3 with expert parallelism is not supported)")
    return None


def convert(checkpoint: str | Path, output: Path) -> Path:
    """Write the run folder ``output`` (module docstring) from ``checkpoint`` (RUN or RUN/TAG); returns its
    checkpoint folder. ConfigError when the run cannot be converted or ``output`` is in use."""
    from pipeline.recipe import read_yaml
    from pipeline.run.checkpoint import RUN_STATE
    from pipeline.run.run_dir import DS_CONFIG, RECIPE, RunDir, require_empty_output

    run, tag = RunDir.resolve(checkpoint)
    require_empty_output(output)
    source = run.checkpoint(tag)
    ds_config_path = run.ds_config_of(tag)
    ds_config = json.loads(ds_config_path.read_text()) if ds_config_path.is_file() else None
    why = refusal(read_yaml(run.saved_recipe(f"pipeline.run.universal {checkpoint}")), ds_config)
    if why:
        raise ConfigError(f"{source}: cannot become a universal checkpoint: {why}")
    target = RunDir(output)
    folder = target.checkpoint(tag)
    folder.parent.mkdir(parents=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
           "--output_folder", str(folder)]
    log.info("converting %s: %s", source, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        shutil.rmtree(output, ignore_errors=True)
        raise ConfigError(f"DeepSpeed's ds_to_universal failed on {source} (exit {proc.returncode}):\n"
                          f"{(proc.stdout + proc.stderr)[-3000:]}")
    shutil.copy2(source / RUN_STATE, folder / RUN_STATE)
    if (source / "rng").is_dir():
        shutil.copytree(source / "rng", folder / "rng")
    for name in (RECIPE, DS_CONFIG):  # the step's own copies, when the run kept them
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    shutil.copy2(run.recipe_path, target.recipe_path)
    if ds_config_path.is_file():
        shutil.copy2(ds_config_path, target.ds_config_path)
    (folder / MARKER).write_text(f"converted from {source}\n")
    target.mark_complete(tag, RunDir.step_of(tag))
    log.info("universal checkpoint of %s (%s): %s", run.path, tag, folder)
    return folder


def universal_resume_config(run_dir: Path, ds_config: dict[str, Any]) -> dict[str, Any]:
    """``ds_config`` with ``checkpoint.load_universal`` on when the newest complete checkpoint of ``run_dir``
    carries the marker (a resume from it), else unchanged."""
    from pipeline.run.run_dir import RunDir

    run = RunDir(run_dir)
    tag = run.latest()
    if tag is None or not (run.checkpoint(tag) / MARKER).is_file():
        return ds_config
    log.info("resuming from the universal checkpoint %s: checkpoint.load_universal on for this load",
             run.checkpoint(tag))
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def main(argv: list[str] | None = None) -> int:
    from pipeline.run.run_dir import run_folder_command

    return run_folder_command("python -m pipeline.run.universal", __doc__, convert, argv,
                              "; resume it in the --output folder with --resume auto (and --set model.moe.ep_size=...)")


if __name__ == "__main__":
    sys.exit(main())
