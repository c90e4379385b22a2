"""A task is one class: ``MeanPixelTask`` below (regress an image's mean pixel value from its image encoding)
lives only in this file, is named by a recipe as ``tests.test_task_plugin:MeanPixelTask``, trains through the
real launcher (2 CPU ranks, EP=2), evaluates with ``pipeline.evaluate`` and reports its baseline, with no
change to any other module. Its options and objectives are checked before launch like a registered task's."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from pipeline.config_utils import ConfigError
from pipeline.plan import main as plan_main
from pipeline.recipe import load_recipe
from pipeline.tasks import LossOutput, Task
from pipeline.tasks.downstream_common import blank_image, image_tensor
from tests.conftest import TINY_MODEL_SETS
from tests.finetune_helpers import DATA, evaluate, train
from tests.launcher import REPO

TASK = "tests.test_task_plugin:MeanPixelTask"


@dataclasses.dataclass
class MeanPixelOptions:
    target_scale: float = dataclasses.field(default=1.0, metadata={"help": "the target is mean pixel x this"})


class MeanPixelTask(Task):
    """Predict the mean of an image's normalised pixels: a linear head on the pooled image encoding, MSE."""

    name = "mean_pixel"
    fields = ("jpg",)
    manifest_tasks = ("pairs",)
    Options = MeanPixelOptions
    objectives = {"mse": 1.0}
    headline = "mae"

    @classmethod
    def passes(cls, objectives: dict[str, float], options: Any) -> dict[str, int]:
        return {"image": 1}

    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        return nn.ModuleDict({"regressor": nn.Linear(model.cfg.hidden_size, 1)})

    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        pixels = image_tensor(sample.get("jpg"), self.ctx.image_size)
        return {"pixel_values": pixels, "target": pixels.mean() * self.options.target_scale}

    def padding_sample(self) -> dict[str, Any]:
        return {"pixel_values": blank_image(self.ctx.image_size), "target": torch.tensor(0.0)}

    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.heads["regressor"](self.model.encode_image(batch["pixel_values"]).pooled).squeeze(-1).float()

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        mse = F.mse_loss(self.predict(batch), batch["target"].float())
        return LossOutput(self.weights["mse"] * mse, {"mse": mse.detach()})

    @torch.no_grad()
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"pred": self.predict(batch), "target": batch["target"].float()}

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        error = outputs["pred"] - outputs["target"]
        return {"mae": float(error.abs().mean()), "mse": float((error ** 2).mean())}

    def baseline(self, outputs: dict[str, Any], data_dir: Path) -> tuple[str, dict[str, float]]:
        """Predicting the mean target of the evaluated split for every image."""
        target = outputs["target"]
        error = target - target.mean()
        return "constant", {"mae": float(error.abs().mean()), "mse": float((error ** 2).mean())}


def recipe_dict(synth_data, **extra) -> dict:
    model = dict(item.removeprefix("model.").split("=") for item in TINY_MODEL_SETS)
    moe = {k.removeprefix("moe."): int(v) for k, v in model.items() if k.startswith("moe.")}
    model = {k: int(v) for k, v in model.items() if not k.startswith("moe.")}
    return {"task": TASK, "model": {**model, "image_size": 32, "patch_size": 8, "max_text_len": 16,
                                    "moe": {**moe, "min_capacity": 1}},
            "data": {**DATA, "train": [{"path": str(synth_data.captions), "split": "train"}],
                     "eval": {"path": str(synth_data.captions), "split": "val"},
                     "tokenizer": str(synth_data.tokenizer)},
            "task_options": {"target_scale": 2.0}, "optim": {"lr": 1.0e-3}, "batch": {"micro_batch_size": 8},
            "train": {"steps": 6, "eval_every": 0, "save_every": 0, "keep_last": 1, "log_every": 2, "seed": 1,
                      "peak_tflops": 1.0}, **extra}


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_misspelled_option_or_foreign_objective_fails_before_launch(tmp_path, synth_data, capsys):
    recipe = load_recipe(write(tmp_path / "ok.yaml", recipe_dict(synth_data)))
    assert recipe.objectives == {"mse": 1.0} and recipe.task_options == {"target_scale": 2.0}
    with pytest.raises(ConfigError, match=r"task_options: unknown key\(s\) \['target_scael'\]; valid keys are "
                                          r"\['target_scale'\]"):
        load_recipe(write(tmp_path / "typo.yaml", recipe_dict(synth_data, task_options={"target_scael": 2})))
    with pytest.raises(ConfigError, match=r"objectives: unknown objective\(s\) \['itc'\] for task mean_pixel; "
                                          r"valid objectives are \['mse'\]"):
        load_recipe(write(tmp_path / "obj.yaml", recipe_dict(synth_data, objectives={"itc": 1.0})))
    # a registered task the same way, through pipeline.plan (what the launch scripts run first)
    shipped = ["--recipe", str(REPO / "launch/recipes/vl_pretrain.yaml"), "--ds-config",
               str(REPO / "ds_configs/zero2_fp32.json"), "--world-size", "2", "--skip-input-checks"]
    capsys.readouterr()
    assert plan_main([*shipped, "--set", "task_options={mlm_porb: 0.3}"]) == 2
    assert "unknown key(s) ['mlm_porb']; valid keys are ['mlm_prob']" in capsys.readouterr().err
    assert plan_main([*shipped, "--set", "objectives={itc: 1.0, vqa: 1.0}"]) == 2
    assert "unknown objective(s) ['vqa'] for task vl_pretrain; valid objectives are ['cap', 'itc', 'itm', 'mlm']" \
        in capsys.readouterr().err


@pytest.mark.slow
def test_a_task_defined_in_a_test_trains_evaluates_and_reports_its_baseline(tmp_path, synth_data):
    run = tmp_path / "run"
    train(tmp_path / "mean_pixel.yaml", recipe_dict(synth_data), run, timeout=240)
    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged if "train/mse" in line] == [2, 4, 6]
    training_eval = json.loads(next((run / "eval").glob("step_*.json")).read_text())
    assert {"mae", "mse"} <= set(training_eval) and training_eval["num_samples"] == 64
    out = tmp_path / "eval.json"
    proc = evaluate(["--checkpoint", str(run), "--task", TASK, "--data", str(synth_data.captions),
                     "--split", "val", "--output", str(out), "--batch-size", "16"])
    result = json.loads(out.read_text())
    assert result["task"] == TASK and result["metrics"]["num_samples"] == 64
    assert 0 < result["metrics"]["mae"] < 10 and set(result["baseline"]["metrics"]) == {"mae", "mse"}
    assert result["baseline"]["name"] == "constant" and result["baseline"]["metrics"]["mae"] > 0
    assert "constant" in proc.stdout and "mae" in proc.stdout


def test_evaluate_accepts_tasks_with_a_headline_only(capsys):
    from pipeline.evaluate import parse_args

    base = ["--checkpoint", "run", "--data", "data"]
    assert parse_args([*base, "--task", TASK]).task == TASK
    with pytest.raises(SystemExit):
        parse_args([*base, "--task", "vl_pretrain"])
    err = capsys.readouterr().err
    listed = err[err.index("choose a task that evaluates: "):]
    assert "'vqa'" in listed and "'retrieval'" in listed and "pretrain" not in listed and "text_mlm" not in listed
    with pytest.raises(SystemExit):
        parse_args([*base, "--task", TASK, "--set", "model.hidden_size=8"])
    assert "expected task_options.KEY=VALUE" in capsys.readouterr().err
