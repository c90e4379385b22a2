"""Pure builder of the DeepSpeed config: engine settings from ``ds_configs/*.json`` + batch, clipping and
step facts from the recipe, with the checks that must fail before launch.

``build_ds_config(recipe, engine, world_size)`` returns the dict handed to
``deepspeed.initialize``. It never touches the process group: ``world_size`` is passed in (the real one
inside ``pipeline.train``, ``--world-size`` in ``pipeline.plan`` and the launch scripts).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pipeline.config_utils import ConfigError

#: keys the recipe owns; a ds_config that sets them is rejected (one owner for each value)
RECIPE_OWNED_KEYS = {
    "train_batch_size": "batch.micro_batch_size / batch.grad_accum in the recipe",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_size in the recipe",
    "gradient_accumulation_steps": "batch.grad_accum in the recipe",
    "optimizer": "optim.* in the recipe",
    "scheduler": "schedule.* in the recipe",
    "gradient_clipping": "optim.grad_clip in the recipe",
}


def load_engine_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ds_config {path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"ds_config {path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"ds_config {path}: expected a JSON object")
    check_engine_types(data, str(path))
    return data


def check_engine_types(engine: dict[str, Any], where: str) -> None:
    """The shape of the keys we read: ``zero_optimization.stage`` an integer 0-3, ``bf16``/``fp16``
    ``enabled`` booleans (DeepSpeed would fail later, on every rank, or silently read ``"false"`` as true)."""
    for section in ("zero_optimization", "bf16", "fp16"):
        if not isinstance(engine.get(section, {}), dict):
            raise ConfigError(f"ds_config {where}: {section} must be an object, got {engine[section]!r}")
    stage = engine.get("zero_optimization", {}).get("stage", 0)
    if type(stage) is not int or stage not in range(4):
        raise ConfigError(f"ds_config {where}: zero_optimization.stage must be one of the integers 0, 1, 2, 3, "
                          f"got {stage!r}")
    for section in ("bf16", "fp16"):
        enabled = engine.get(section, {}).get("enabled", False)
        if not isinstance(enabled, bool):
            raise ConfigError(f"ds_config {where}: {section}.enabled must be true or false, got {enabled!r}")


def zero_stage(engine: dict[str, Any]) -> int:
    return int(engine.get("zero_optimization", {}).get("stage", 0))


def precision(engine: dict[str, Any]) -> str:
    bf16 = engine.get("bf16", {}).get("enabled", False)
    fp16 = engine.get("fp16", {}).get("enabled", False)
    if bf16 and fp16:
        raise ConfigError("ds_config: bf16.enabled and fp16.enabled are both true; enable one of them")
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def check_engine_keys(engine: dict[str, Any]) -> None:
    owned = [key for key in RECIPE_OWNED_KEYS if key in engine]
    if owned:
        hints = "; ".join(f"{key} -> {RECIPE_OWNED_KEYS[key]}" for key in owned)
        raise ConfigError(f"ds_config sets {owned}, which the recipe owns: remove them from the JSON "
                          f"and set them in the recipe ({hints})")


def check_moe(model_cfg: Any, engine: dict[str, Any], world_size: int) -> None:
    moe = model_cfg.moe
    if not model_cfg.moe_layers:
        return
    if zero_stage(engine) == 3:
        raise ConfigError("ZeRO stage 3 is not supported with DeepSpeed MoE layers: use a ZeRO-0/1/2 "
                          "ds_config (e.g. ds_configs/zero2_bf16.json), or a dense model "
                          "(--set model.moe.every=0)")
    if moe.num_experts % moe.ep_size:
        raise ConfigError(f"model.moe.num_experts={moe.num_experts} is not divisible by "
                          f"model.moe.ep_size={moe.ep_size}: pick an ep_size that divides it")
    if world_size % moe.ep_size:
        valid = [d for d in range(1, world_size + 1) if world_size % d == 0 and moe.num_experts % d == 0]
        raise ConfigError(f"world size {world_size} is not divisible by model.moe.ep_size={moe.ep_size}: "
                          f"set model.moe.ep_size to one of {valid} or change the number of ranks")
    zero = engine.get("zero_optimization", {})
    if zero_stage(engine) == 2 and not (zero.get("contiguous_gradients", True)
                                         and zero.get("reduce_scatter", True)):
        raise ConfigError("ZeRO-2 with MoE needs zero_optimization.contiguous_gradients and "
                          "reduce_scatter true in the ds_config")


def check_batch(recipe: Any, world_size: int) -> int:
    dp_size = world_size  # every rank reads its own data; EP splits experts, not batches
    global_batch = recipe.batch.global_size(dp_size)
    wanted = recipe.batch.global_batch_size
    if wanted is not None and wanted != global_batch:
        per_step = recipe.batch.micro_batch_size * dp_size
        hint = (f"set batch.grad_accum={wanted // per_step}" if wanted % per_step == 0
                else f"make batch.global_batch_size a multiple of micro_batch_size*world_size={per_step}")
        raise ConfigError(
            f"batch arithmetic: global_batch_size={wanted} but micro_batch_size "
            f"{recipe.batch.micro_batch_size} x grad_accum {recipe.batch.grad_accum} x data-parallel size "
            f"{dp_size} = {global_batch}; {hint}, or drop batch.global_batch_size")
    return global_batch


def build_ds_config(recipe: Any, engine: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Resolved DeepSpeed config; ConfigError (saying what to change) on an impossible combination."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    check_engine_keys(engine)
    precision(engine)
    check_moe(recipe.model, engine, world_size)
    global_batch = check_batch(recipe, world_size)
    config = copy.deepcopy(engine)
    config.update(
        train_batch_size=global_batch,
        train_micro_batch_size_per_gpu=recipe.batch.micro_batch_size,
        gradient_accumulation_steps=recipe.batch.grad_accum,
        gradient_clipping=recipe.optim.grad_clip,
    )
    config.setdefault("steps_per_print", 10**9)  # we log ourselves
    config.setdefault("wall_clock_breakdown", False)
    if zero_stage(engine) > 0:
        config.setdefault("zero_allow_untested_optimizer", True)
    return config
