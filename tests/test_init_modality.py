"""init_from that ADDS a modality: an image-text (vl_pretrain) checkpoint loads into an image-text-audio
model: every saved tensor loads, the audio embedding and FFNs/experts and the new heads keep their fresh init,
``modality_type`` rows are copied by modality name; anything else that differs is still refused."""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from pipeline.config_utils import ConfigError
from pipeline.plan import init_from_mismatches
from pipeline.recipe import Recipe, dump_recipe, load_recipe
from pipeline.run.build import build_model, build_task, load_tokenizer
from pipeline.run.checkpoint import load_module_weights
from pipeline.run.checkpoint_merge import EXPERT_KEY
from pipeline.tasks import DistInfo, Task
from tests.conftest import TINY_MODEL_SETS
from tests.launcher import REPO

AUDIO_SETS = ["model.audio.num_mel_bins=32", "model.audio.max_frames=200", "model.audio.patch_freq=16",
              "model.audio.stride_freq=16", "model.audio.patch_time=16", "model.audio.stride_time=16"]


def tiny_recipe(name: str, synth_av, sets: list[str]) -> Recipe:
    """``launch/recipes/{name}.yaml`` on the synth_av captions with the tiny model (EP=1) and ``sets``."""
    return load_recipe(REPO / f"launch/recipes/{name}.yaml", [
        f"data.train=[{{path: {synth_av.captions}, split: train}}]", "data.eval=null",
        f"data.tokenizer={synth_av.tokenizer}", *TINY_MODEL_SETS, "model.moe.ep_size=1", *sets])


def build(recipe: Recipe, seed: int) -> Task:
    return build_task(recipe, load_tokenizer(recipe.data.tokenizer), DistInfo(0, 1), build_model(recipe, seed))


def save_run(state: dict[str, torch.Tensor], recipe_yaml: str, run: Path) -> Path:
    """A run folder as pipeline.train leaves it (resolved recipe, DeepSpeed's dense file + one file per
    expert named with its global id, COMPLETE) holding ``state`` (an EP=1 Task's). Returns the checkpoint."""
    folder = run / "checkpoints" / "step_000001"
    folder.mkdir(parents=True)
    (run / "resolved_recipe.yaml").write_text(recipe_yaml)
    torch.save({"module": {k: v for k, v in state.items() if not EXPERT_KEY.match(k)}},
               folder / "mp_rank_00_model_states.pt")
    experts = defaultdict(dict)  # (MoE module, expert id) -> its tensors
    for key, value in state.items():
        if match := EXPERT_KEY.match(key):
            experts[match.group(1), int(match.group(2))][key] = value
    layers = {module: layer for layer, module in enumerate(sorted({module for module, _ in experts}))}
    for (module, expert), tensors in experts.items():
        torch.save(tensors, folder / f"layer_{layers[module]}_expert_{expert}_mp_rank_00_model_states.pt")
    (folder / "COMPLETE").write_text("1\n")
    return folder


@pytest.fixture(scope="module")
def vl_run(tmp_path_factory, synth_av):
    """A saved tiny vl_pretrain run (modalities image, text) and its weights."""
    recipe = tiny_recipe("vl_pretrain", synth_av, ["init_from=null"])
    state = build(recipe, seed=1).state_dict()
    run = tmp_path_factory.mktemp("vl") / "run"
    save_run(state, dump_recipe(recipe), run)
    return run, state


def vla_task(vl_run, synth_av, modalities: str = "[image, text, audio]") -> Task:
    run, _ = vl_run
    return build(tiny_recipe("vla_pretrain", synth_av, [f"init_from={run}", f"model.modalities={modalities}",
                                                        *AUDIO_SETS]), seed=2)


@pytest.mark.parametrize("modalities", ["[image, text, audio]", "[audio, text, image]"])
def test_init_from_adds_a_modality_loads_every_saved_tensor(vl_run, synth_av, modalities, caplog):
    run, saved = vl_run
    task = vla_task(vl_run, synth_av, modalities)
    fresh = {k: v.clone() for k, v in task.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="pipeline.run.checkpoint"):
        load_module_weights(task, run)
    loaded = task.state_dict()
    order = task.model.cfg.modalities
    for key, value in saved.items():
        if key == "model.modality_type.weight":
            continue
        assert torch.equal(loaded[key], value), key  # every saved tensor, vl_pretrain heads included
    rows = loaded["model.modality_type.weight"]
    assert rows.shape[0] == 3
    for name in ("image", "text"):  # by NAME: [audio, text, image] moves both rows
        assert torch.equal(rows[order.index(name)], saved["model.modality_type.weight"][["image", "text"].index(name)])
    assert torch.equal(rows[order.index("audio")], fresh["model.modality_type.weight"][order.index("audio")])
    new = sorted(set(loaded) - set(saved) - {"model.modality_type.weight"})
    assert new and all(".audio." in k or k.startswith(("heads.atc.", "heads.atm.")) for k in new), new
    assert any(".ffn.audio.deepspeed_moe.experts." in k for k in new) and "model.embeddings.audio.position" in new
    for key in new:
        assert torch.equal(loaded[key], fresh[key]), key  # the new modality and heads keep their fresh init
    assert "modalities ['audio'] are new" in caplog.text and "model.embeddings.audio" in caplog.text


def test_init_from_refuses_everything_else_that_differs(vl_run, synth_av, tmp_path):
    run, saved = vl_run
    task, recipe_yaml = vla_task(vl_run, synth_av), (run / "resolved_recipe.yaml").read_text()
    for drop in ("model.norm.weight", "model.blocks.0.ffn.image.fc1.weight"):  # shared / an EXISTING modality's
        broken = tmp_path / drop / "run"
        save_run({k: v for k, v in saved.items() if k != drop}, recipe_yaml, broken)
        with pytest.raises(ConfigError, match=rf"1 model tensors missing from it \({drop}\)"):
            load_module_weights(task, broken)
    wider = {**saved, "model.modality_type.weight": torch.zeros(2, 32)}  # another hidden size: not a modality
    save_run(wider, recipe_yaml, tmp_path / "wider" / "run")
    with pytest.raises(ConfigError, match=r"modality_type\.weight: checkpoint \[2, 32\] vs model \[3, 64\]"):
        load_module_weights(task, tmp_path / "wider" / "run")


def test_plan_lets_an_added_modality_through_but_not_another_size(vl_run, synth_av):
    run, _ = vl_run
    recipe = tiny_recipe("vla_pretrain", synth_av, [f"init_from={run}", *AUDIO_SETS])
    assert init_from_mismatches(recipe.model, str(run)) == []
    wider = tiny_recipe("vla_pretrain", synth_av, [f"init_from={run}", *AUDIO_SETS, "model.hidden_size=96"])
    assert any(m.startswith("modality_type.weight: init_from [2, 64] vs this recipe [3, 96]")
               for m in init_from_mismatches(wider.model, str(run)))


def test_init_from_adds_summary_tokens(vl_run, synth_av, caplog):
    """A run without summary tokens seeds a model with model.summary_tokens: every saved tensor loads, the
    summary tokens keep their fresh init and the log says so; a different count is refused before launch."""
    run, saved = vl_run
    task = build(tiny_recipe("vl_pretrain", synth_av, [f"init_from={run}", "model.summary_tokens=2"]), seed=2)
    fresh = task.state_dict()["model.summary.image"].clone()
    with caplog.at_level(logging.INFO, logger="pipeline.run.checkpoint"):
        load_module_weights(task, run)
    loaded = task.state_dict()
    assert set(loaded) - set(saved) == {"model.summary.image"}
    assert all(torch.equal(loaded[key], value) for key, value in saved.items())
    assert torch.equal(loaded["model.summary.image"], fresh)
    assert "no summary tokens (model.summary_tokens); fresh init for model.summary.image" in caplog.text
    with_two = run.parent / "with_summary" / "run"
    save_run(loaded, dump_recipe(tiny_recipe("vl_pretrain", synth_av, ["init_from=null", "model.summary_tokens=2"])),
             with_two)
    other = tiny_recipe("vl_pretrain", synth_av, [f"init_from={with_two}", "model.summary_tokens=3"]).model
    assert [line.split(":")[0] for line in init_from_mismatches(other, str(with_two))] == ["summary.image"]
