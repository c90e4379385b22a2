"""NLVR2 and classification fine-tune on the data_prep converters' output from a vl_pretrain checkpoint
through the real launcher (2 CPU ranks, EP=2), then ``pipeline.evaluate``."""
import json
from pathlib import Path

import pytest

from tests.finetune_helpers import (evaluate, expert_files, finetune_recipe, make_classification_data,
                                    make_nlvr2_data, shared_setup, train)

pytestmark = pytest.mark.slow


def test_nlvr2_finetune_then_evaluate(tmp_path, tmp_path_factory):
    shared = shared_setup(tmp_path_factory)
    data = make_nlvr2_data(tmp_path / "nlvr2")
    source = {"path": str(data), "split": "train"}
    run = tmp_path / "nlvr2_run"
    train(tmp_path / "nlvr2.yaml", finetune_recipe("nlvr2", shared, source, source, micro_batch=4), run)
    assert len(expert_files(run)) == 6
    out = tmp_path / "nlvr2.json"
    proc = evaluate(["--checkpoint", str(run), "--task", "nlvr2", "--data", str(data), "--split", "train",
                     "--output", str(out), "--batch-size", "8"])
    result = json.loads(out.read_text())
    assert result["metrics"]["num_samples"] == 24
    assert set(result["metrics"]) >= {"acc", "consistency"}
    assert result["baseline"]["metrics"]["acc"] == pytest.approx(0.5)  # 12 true, 12 false
    assert "majority" in proc.stdout
    # the leaderboard's submission format: identifier,True|False per line, one per sample
    rows = [line.split(",") for line in Path(result["predictions"]).read_text().splitlines()]
    assert result["predictions"].endswith(".csv") and len(rows) == 24
    assert all(len(row) == 2 and row[1] in ("True", "False") for row in rows)


def test_classification_linear_probe_then_evaluate(tmp_path, tmp_path_factory):
    shared = shared_setup(tmp_path_factory)
    data = make_classification_data(tmp_path / "cls")
    recipe = finetune_recipe("classification", shared, {"path": str(data), "split": "train"},
                             {"path": str(data), "split": "val"})
    assert recipe["freeze"] == ["^model\\."]  # the shipped recipe is a linear probe
    run = tmp_path / "cls_run"
    # ZeRO-1/2 refuse a model whose MoE parameters are all frozen; the probe runs on ZeRO-0
    proc = train(tmp_path / "cls.yaml", recipe, run, ds_config="ds_configs/zero0_fp32.json")
    assert "frozen" in proc.stdout + proc.stderr
    out = tmp_path / "cls.json"
    evaluate(["--checkpoint", str(run), "--task", "classification", "--data", str(data), "--split", "val",
              "--output", str(out), "--batch-size", "8"])
    result = json.loads(out.read_text())
    assert result["metrics"]["num_samples"] == 18 and result["metrics"]["top1"] <= result["metrics"]["top5"]
    assert result["baseline"]["metrics"] == {"top1": pytest.approx(1 / 6), "top5": pytest.approx(5 / 6)}
