"""ds_config builder: one owner per value, batch arithmetic against the real world size, MoE checks."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config_utils import ConfigError
from pipeline.run.ds_config import build_ds_config, load_engine_json
from pipeline.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
VL = REPO / "launch/recipes/vl_pretrain.yaml"


def _build(overrides=(), engine="zero2_bf16", world=2, **engine_extra):
    recipe = load_recipe(VL, list(overrides))
    config = load_engine_json(REPO / "ds_configs" / f"{engine}.json")
    config.update(engine_extra)
    return build_ds_config(recipe, config, world)


def test_batch_fields_come_from_recipe_and_world_size():
    config = _build(["batch.micro_batch_size=4", "batch.grad_accum=3", "model.moe.ep_size=2"], world=4)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (48, 4, 3)
    assert config["zero_optimization"]["stage"] == 2 and config["bf16"]["enabled"]


def test_batch_arithmetic_mismatch_says_what_to_change():
    with pytest.raises(ConfigError, match=r"global_batch_size=64 but .* = 32; set batch.grad_accum=2"):
        _build(["batch.micro_batch_size=16", "batch.global_batch_size=64"], world=2)
    with pytest.raises(ConfigError, match="multiple of micro_batch_size\\*world_size=32"):
        _build(["batch.micro_batch_size=16", "batch.global_batch_size=40"], world=2)
    assert _build(["batch.micro_batch_size=16", "batch.global_batch_size=64", "batch.grad_accum=2"])


@pytest.mark.parametrize("key", ["train_batch_size", "optimizer", "scheduler", "gradient_clipping",
                                 "gradient_accumulation_steps", "train_micro_batch_size_per_gpu"])
def test_recipe_owned_keys_in_json_are_rejected(key):
    with pytest.raises(ConfigError, match=f"ds_config sets \\['{key}'\\].*remove them from the JSON"):
        _build(**{key: 1})


def test_zero3_with_moe_is_rejected_dense_is_not():
    with pytest.raises(ConfigError, match="ZeRO stage 3 is not supported with DeepSpeed MoE.*zero2"):
        _build(engine="zero3_bf16")
    assert _build(["model.moe.every=0", "model.moe.ep_size=1"], engine="zero3_bf16")


def test_ep_size_must_divide_world_and_experts():
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by model.moe.ep_size=2.*\[1\]"):
        _build(world=3)
    with pytest.raises(ConfigError, match="num_experts.*divisible.*ep_size"):
        _build(["model.moe.num_experts=6", "model.moe.ep_size=4"], world=4)


def test_both_half_precisions_rejected():
    with pytest.raises(ConfigError, match="both true"):
        _build(fp16={"enabled": True})


def test_shipped_ds_configs_hold_engine_settings_only():
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        data = json.loads(path.read_text())
        assert "zero_optimization" in data, path.name
        assert not {"train_batch_size", "optimizer", "scheduler", "gradient_clipping"} & set(data), path.name


@pytest.mark.parametrize("engine,message", [
    ({"zero_optimization": {"stage": "two"}},
     r"zero_optimization\.stage must be one of the integers 0, 1, 2, 3, got 'two'"),
    ({"zero_optimization": {"stage": 4}}, r"zero_optimization\.stage .* got 4"),
    ({"zero_optimization": {"stage": True}}, r"zero_optimization\.stage .* got True"),
    ({"zero_optimization": 2}, r"zero_optimization must be an object, got 2"),
    ({"bf16": {"enabled": "false"}}, r"bf16\.enabled must be true or false, got 'false'"),
    ({"fp16": {"enabled": 1}}, r"fp16\.enabled must be true or false, got 1"),
], ids=["stage_word", "stage_4", "stage_bool", "zero_not_object", "bf16_string", "fp16_int"])
def test_wrongly_typed_engine_settings_are_named_when_loaded(tmp_path, engine, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(engine))
    with pytest.raises(ConfigError, match=f"ds_config {path}: {message}"):
        load_engine_json(path)


def test_plan_reports_a_wrongly_typed_stage_without_a_traceback(tmp_path):
    """It used to die in int("two") with a ValueError traceback."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": "two"}}))
    proc = subprocess.run([sys.executable, "-m", "pipeline.plan", "--recipe", str(VL), "--ds-config", str(path),
                           "--world-size", "2", "--skip-input-checks"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "zero_optimization.stage must be one of the integers" in proc.stderr
    assert "Traceback" not in proc.stderr
