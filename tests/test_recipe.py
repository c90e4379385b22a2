"""Recipes: strict loading, --set overrides, init_from model merge, and every shipped recipe against every
ds_config it claims to support (a drifted recipe or ds_config fails here)."""
from pathlib import Path

import pytest
import yaml

from pipeline.config_utils import ConfigError
from pipeline.run.ds_config import build_ds_config, load_engine_json
from pipeline.model.config import ModelConfig
from pipeline.recipe import dump_recipe, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "launch" / "recipes").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def test_shipped_recipes_include_both_pretraining_stages():
    assert {"text_mlm", "vl_pretrain"} <= {p.stem for p in RECIPES}


def _claimed(recipe) -> list[Path]:
    if recipe.supports_ds_configs:
        return [REPO / "ds_configs" / f"{name}.json" for name in recipe.supports_ds_configs]
    # no list: any ds_config the model can run (ZeRO-3 only for dense models)
    return [p for p in DS_CONFIGS if not (recipe.model.moe_layers and load_engine_json(p)
                                          .get("zero_optimization", {}).get("stage") == 3)]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_builds_with_every_claimed_ds_config(path):
    recipe = load_recipe(path, ["init_from=null"])
    claimed = _claimed(recipe)
    assert claimed, f"{path.name} supports no ds_config"
    for ds_path in claimed:
        assert ds_path.is_file(), f"{path.name} claims {ds_path.name}, which is not shipped"
        world = max(2, recipe.model.moe.ep_size)
        config = build_ds_config(recipe, load_engine_json(ds_path), world_size=world)
        assert config["train_batch_size"] == recipe.batch.micro_batch_size * recipe.batch.grad_accum * world
        assert config["gradient_clipping"] == recipe.optim.grad_clip


def test_unknown_key_names_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrr'\].*valid keys are .*'lr'"):
        load_recipe(REPO / "launch/recipes/vl_pretrain.yaml", ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="model.*unknown key.*hiddne_size"):
        load_recipe(REPO / "launch/recipes/vl_pretrain.yaml", ["model.hiddne_size=64"])


def test_set_overrides_are_type_checked():
    recipe = load_recipe(REPO / "launch/recipes/vl_pretrain.yaml",
                                    ["train.steps=7", "model.moe.num_experts=8", "optim.betas=[0.9, 0.95]"])
    assert recipe.train.steps == 7 and recipe.model.moe.num_experts == 8 and recipe.optim.betas == [0.9, 0.95]
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_recipe(REPO / "launch/recipes/vl_pretrain.yaml", ["train.steps=many"])
    with pytest.raises(ConfigError, match="schedule.kind"):
        load_recipe(REPO / "launch/recipes/vl_pretrain.yaml", ["schedule.kind=exponential"])
    with pytest.raises(ConfigError, match="unknown"):
        load_recipe(REPO / "launch/recipes/vl_pretrain.yaml", ["task=captioning_xl"])


def test_init_from_merges_model_over_previous_stage(tmp_path):
    first = load_recipe(REPO / "launch/recipes/text_mlm.yaml",
                           ["model.hidden_size=96", "model.num_heads=3", "model.moe.ep_size=2"])
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "resolved_recipe.yaml").write_text(dump_recipe(first))
    data = yaml.safe_load((REPO / "launch/recipes/vl_pretrain.yaml").read_text())
    data.update(init_from=str(tmp_path / "stage1"), model={"moe": {"ep_size": 1}})
    recipe = recipe_from_dict(data)
    assert recipe.model.hidden_size == 96 and recipe.model.num_heads == 3 and recipe.model.moe.ep_size == 1
    data["init_from"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="init_from.*not a run folder"):
        recipe_from_dict(data)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(REPO / "launch/recipes/vl_pretrain.yaml", ["train.steps=3"])
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(recipe))
    again = load_recipe(path)
    assert again == recipe and isinstance(again.model, ModelConfig)


def test_task_options_of_a_task_without_options_are_refused():
    with pytest.raises(ConfigError, match=r"task_options: task gqa takes no options, got \['answer_count'\]"):
        load_recipe(REPO / "launch/recipes/gqa.yaml", ["init_from=null", "task_options.answer_count=3"])


def test_data_sizes_are_checked_against_the_model_before_launch():
    """A larger image than the model's positions were learned for is allowed (they are interpolated: fine-tuning
    at a higher resolution); a size that is not a multiple of the patch, or text longer than the learned text
    positions, is refused when the recipe loads (before any rank starts)."""
    path = REPO / "launch/recipes/vl_pretrain.yaml"
    recipe = load_recipe(path, ["data.image_size=256", "model.image_size=64", "model.patch_size=16"])
    assert recipe.data.image_size == 256
    with pytest.raises(ConfigError, match="data.image_size=100 is not a multiple of model.patch_size=16"):
        load_recipe(path, ["data.image_size=100", "model.patch_size=16"])
    with pytest.raises(ConfigError, match="data.text_len=64 exceeds model.max_text_len=32"):
        load_recipe(path, ["data.text_len=64", "model.max_text_len=32"])
    # token merging is sized for the data's images, not model.image_size: fine-tuning at 128 px merges more
    sets = ["model.image_size=64", "model.patch_size=16", "model.token_merge=16", "model.token_merge_layers=[0, 1]"]
    assert load_recipe(path, [*sets, "data.image_size=128"]).model.token_merge == 16
    with pytest.raises(ConfigError, match=r"token_merge \(16\) after block 0: only 16 image patches .*data.image_size"):
        load_recipe(path, [*sets, "data.image_size=64"])
