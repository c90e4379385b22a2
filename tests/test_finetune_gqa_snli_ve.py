"""GQA and SNLI-VE fine-tune on the data_prep converters' output from a vl_pretrain checkpoint through the
real launcher (2 CPU ranks, EP=2), then ``pipeline.evaluate`` (one process); GQA on another folder whose
vocabulary differs from the training one."""
import json

import pytest

from tests.finetune_helpers import (evaluate, finetune_recipe, make_gqa_data, make_snli_ve_data, shared_setup,
                                    train)

pytestmark = pytest.mark.slow


def test_gqa_finetune_then_evaluate_on_a_folder_with_another_vocabulary(tmp_path, tmp_path_factory):
    shared = shared_setup(tmp_path_factory)
    data = make_gqa_data(tmp_path / "gqa", {"train": 24})
    other = make_gqa_data(tmp_path / "gqa_other", {"train": 12, "val": 10},
                          colours=("purple", "red", "blue", "green", "white"))
    assert json.loads((data / "answers.json").read_text())["answers"] != \
        json.loads((other / "answers.json").read_text())["answers"]
    run = tmp_path / "gqa_run"
    recipe = finetune_recipe("gqa", shared, {"path": str(data), "split": "train"},
                             {"path": str(other), "split": "val"}, micro_batch=4)
    train(tmp_path / "gqa.yaml", recipe, run)
    out = tmp_path / "gqa.json"
    proc = evaluate(["--checkpoint", str(run), "--task", "gqa", "--data", str(other), "--split", "val",
                     "--output", str(out), "--batch-size", "8"])
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert metrics["num_samples"] == 10 and metrics["num_scored"] == 10
    assert {"acc", "acc/query", "acc/verify"} <= set(metrics)
    # 2 of the 5 "what color" questions ask for purple or white, which the training data never answered
    assert metrics["acc/query"] <= 3 / 5
    assert result["baseline"]["name"] == "q-type prior" and "q-type prior" in proc.stdout
    predictions = json.loads(open(result["predictions"]).read())
    assert sorted(p["questionId"] for p in predictions) == sorted(f"val-{i}" for i in range(10))
    vocabulary = json.loads((data / "answers.json").read_text())["answers"]
    assert all(p["prediction"] in vocabulary for p in predictions)


def test_snli_ve_finetune_then_evaluate(tmp_path, tmp_path_factory):
    shared = shared_setup(tmp_path_factory)
    data = make_snli_ve_data(tmp_path / "snli_ve", {"train": 24, "dev": 12})
    run = tmp_path / "snli_ve_run"
    recipe = finetune_recipe("snli_ve", shared, {"path": str(data), "split": "train"},
                             {"path": str(data), "split": "dev"}, micro_batch=4)
    train(tmp_path / "snli_ve.yaml", recipe, run)
    out = tmp_path / "snli_ve.json"
    evaluate(["--checkpoint", str(run), "--task", "snli_ve", "--data", str(data), "--split", "dev",
              "--output", str(out), "--batch-size", "8"])
    result = json.loads(out.read_text())
    assert result["metrics"]["num_samples"] == 12
    assert {"acc", "acc/entailment", "acc/neutral", "acc/contradiction"} <= set(result["metrics"])
    # train labels: 10 contradiction, 8 entailment, 6 neutral -> majority "contradiction"; dev has 5 of 12
    assert result["baseline"]["name"] == "majority"
    assert result["baseline"]["metrics"]["acc"] == pytest.approx(5 / 12)
    predictions = json.loads(open(result["predictions"]).read())
    assert sorted(p["pair_id"] for p in predictions) == sorted(f"dev-{i}" for i in range(12))
    assert {p["prediction"] for p in predictions} <= {"entailment", "neutral", "contradiction"}
