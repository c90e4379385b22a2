"""VQA and retrieval fine-tune from a vl_pretrain checkpoint through the real launcher (2 CPU ranks, EP=2)
and are evaluated by ``pipeline.evaluate`` (one process, and 2 ranks under the launcher)."""
import json

import pytest

from tests.finetune_helpers import evaluate, expert_files, finetune_recipe, shared_setup, train

pytestmark = pytest.mark.slow


def test_vqa_finetune_then_evaluate(tmp_path, tmp_path_factory):
    shared = shared_setup(tmp_path_factory)
    vqa = shared["data"] / "vqa"
    recipe = finetune_recipe("vqa", shared, {"path": str(vqa), "split": "train"}, {"path": str(vqa), "split": "val"})
    run = tmp_path / "vqa"
    proc = train(tmp_path / "vqa.yaml", recipe, run)
    assert "initialised weights from" in proc.stdout + proc.stderr
    # block 1 is MoE and a fusion block: image, text and vl FFNs x 2 experts, one expert per EP rank each
    assert len(expert_files(run)) == 6
    out = tmp_path / "vqa_val.json"
    proc = evaluate(["--checkpoint", str(run), "--task", "vqa", "--data", str(vqa), "--split", "val",
                     "--output", str(out), "--batch-size", "12"])
    result = json.loads(out.read_text())
    assert result["metrics"]["num_samples"] == 32 and 0 <= result["metrics"]["acc"] <= 1
    assert {"acc/yes/no", "acc/number", "acc/other"} <= set(result["metrics"])
    assert result["baseline"]["name"] == "q-type prior" and 0 < result["baseline"]["metrics"]["acc"] < 1
    assert "q-type prior" in proc.stdout and "acc/yes/no" in proc.stdout
    predictions = json.loads(out.with_name("vqa_val_predictions.json").read_text())
    answers = json.loads((vqa / "answers.json").read_text())["answers"]
    assert sorted(p["question_id"] for p in predictions) == sorted({p["question_id"] for p in predictions})
    assert len(predictions) == 32 and all(p["answer"] in answers for p in predictions)


def test_retrieval_finetune_then_evaluate_any_world_size(tmp_path, tmp_path_factory):
    shared = shared_setup(tmp_path_factory)
    data = shared["data"] / "retrieval"
    recipe = finetune_recipe("retrieval", shared, {"path": str(data), "split": "train"},
                             {"path": str(data), "split": "test"})
    run = tmp_path / "retrieval"
    train(tmp_path / "retrieval.yaml", recipe, run)
    common = ["--checkpoint", str(run), "--task", "retrieval", "--data", str(data), "--split", "test",
              "--batch-size", "4", "--itm-rerank", "3", "--eval-capacity-factor", "2"]
    single = evaluate([*common, "--output", str(tmp_path / "one.json")])
    assert "chance" in single.stdout and "t2i_r5" in single.stdout
    evaluate([*common, "--output", str(tmp_path / "two.json")], launcher=True)
    one = json.loads((tmp_path / "one.json").read_text())["metrics"]
    two = json.loads((tmp_path / "two.json").read_text())["metrics"]
    assert one["num_images"] == 16 and one["num_captions"] == 80
    assert {"itm_t2i_r1", "itm_r_mean"} <= set(one)
    # no token dropping at eval and EP=1 weights: 1 process and 2 ranks see the same model
    for key in ("i2t_r1", "t2i_r1", "t2i_r5", "r_mean", "itm_r_mean"):
        assert one[key] == pytest.approx(two[key], abs=1e-6), key
