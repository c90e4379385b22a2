"""``python -m pipeline.export`` round trip: a VQA run fine-tuned through the real launcher with EP=2 and
ZeRO-2 is exported; the exported model (transformers classes, local experts) gives the same embeddings,
head logits and answers as the DeepSpeed MoE model ``pipeline.evaluate`` loads, also in a process where
``deepspeed`` cannot be imported; the folder holds what a user needs (tokenizer, label maps, preprocessor,
model card); ``--help`` is fast and bad paths get clear errors."""
import json
import subprocess
import sys
import time

import pytest
import torch

from tests.finetune_helpers import finetune_recipe, shared_setup, train
from tests.launcher import REPO, launcher_env, run_deepspeed

pytestmark = pytest.mark.slow

BATCH = 16


def export_cli(*args: object, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.export", *map(str, args)], cwd=REPO, env=launcher_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(shared paths, VQA run dir, export dir): 3 steps of VQA on the shared vl_pretrain run, EP=2, ZeRO-2."""
    shared = shared_setup(tmp_path_factory)
    base = tmp_path_factory.mktemp("export")
    vqa = shared["data"] / "vqa"
    recipe = finetune_recipe("vqa", shared, {"path": str(vqa), "split": "train"}, {"path": str(vqa), "split": "val"})
    recipe["model"] = {"moe": {"ep_size": 2, "eval_capacity_factor": 2.0}}  # 2 experts: no dropping at eval
    run = base / "vqa"
    train(base / "vqa.yaml", recipe, run)
    out = base / "exported"
    proc = export_cli("--checkpoint", run, "--output", out, "--max-shard-size", "200KB")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return shared, run, out


@pytest.fixture(scope="module")
def reference(exported):
    """The DeepSpeed MoE model (EP=1 after the merge, as pipeline.evaluate loads it) on a fixed val batch:
    (batch for VLMoEModel.forward, outputs, kept routes per MoE FFN)."""
    from pipeline.data.loader import build_eval_loader
    from pipeline.model.dispatch import DeepSpeedSparseFFN
    from pipeline.recipe import SourceConfig
    from pipeline.run.eval_loop import load_for_eval, pad_and_collate

    shared, run_dir, _ = exported
    run = load_for_eval(run_dir)
    assert all(isinstance(m, DeepSpeedSparseFFN) for m in run.task.model.sparse_ffns().values())
    loader = build_eval_loader(SourceConfig(path=str(shared["data"] / "vqa"), split="val"), run.recipe.data,
                               run.task, BATCH, 0, 1)
    samples = next(item for item in loader if isinstance(item, list))
    batch = pad_and_collate(run.task, samples, BATCH)
    model = run.task.model
    model.moe_stats.reset()
    with torch.no_grad():
        out = model.fuse(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        logits = run.task.heads["vqa"](out.pooled).float()
        kept = {k: v.tolist() for k, v in model.moe_stats.kept.items()}
        pred = run.task.eval_outputs(batch)["pred"]
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    return inputs, {"pooled": out.pooled, "cls": out.cls, "hidden": out.hidden, "logits": logits, "pred": pred,
                    "answers": run.task.answers}, kept


def test_export_folder_holds_weights_tokenizer_labels_preprocessor_and_card(exported):
    shared, run, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "vlmoe" and config["task"] == "vqa"
    assert config["vlmoe"]["moe"]["ep_size"] == 1 and config["vlmoe"]["moe"]["num_experts"] == 2
    answers = json.loads((shared["data"] / "vqa" / "answers.json").read_text())["answers"]
    assert config["label_maps"] == {"vqa": answers}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / name).is_file() for name in shards)  # sharded above 200KB
    experts = [k for k in index["weight_map"] if ".deepspeed_experts." in k]
    assert {k.split(".deepspeed_experts.")[1].split(".")[0] for k in experts} == {"0", "1"}  # both EP ranks' experts
    assert (out / "tokenizer_config.json").is_file()
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(shared["tokenizer"]))
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_size"] == 32 and pre["image_mean"] == [0.5] * 3 and pre["text_len"] == 16
    card = (out / "README.md").read_text()
    assert str(run) in card and str(shared["pretrain"]) in card and "(task vl_pretrain)" in card
    assert "| acc |" in card  # the run's final evaluation


def test_exported_model_equals_deepspeed_eval_outputs(exported, reference):
    from pipeline.hf import VLMoEModel
    from pipeline.model.moe import LocalSparseFFN

    _, _, out = exported
    inputs, want, kept_want = reference
    model = VLMoEModel.from_pretrained(out).eval()
    assert all(isinstance(m, LocalSparseFFN) for m in model.model.sparse_ffns().values())
    model.model.moe_stats.reset()
    with torch.no_grad():
        got = model(**inputs)
    for key, value in (("pooled", got.pooled), ("cls", got.cls), ("hidden", got.last_hidden_state),
                       ("logits", got.logits["vqa"])):
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-5, msg=key)
    assert got.logits["vqa"].argmax(1).tolist() == want["pred"].tolist()
    assert model.config.label_maps["vqa"] == want["answers"]
    kept = {k: v.tolist() for k, v in model.model.moe_stats.kept.items()}
    assert kept == kept_want  # the same routes, expert by expert
    assert all(sum(1 for n in counts if n > 0) == 2 for counts in kept.values()), kept  # both experts used


def test_exported_model_equals_ep2_zero2_engine_eval_outputs(exported, reference, tmp_path):
    """Every rank of the engine (EP=2: each holds one expert, tokens cross ranks by all-to-all; ZeRO-2) on
    the same batch gives what the exported model gives in one process."""
    from pipeline.hf import VLMoEModel

    _, run, out = exported
    inputs, _, _ = reference
    torch.save(inputs, tmp_path / "batch.pt")
    run_deepspeed("tests.dist.export_engine_outputs", [str(run), str(tmp_path / "batch.pt"), str(tmp_path)],
                  timeout=180)
    model = VLMoEModel.from_pretrained(out).eval()
    with torch.no_grad():
        got = model(**inputs)
    for rank in (0, 1):
        engine = torch.load(tmp_path / f"rank{rank}.pt")
        assert engine["ep_size"] == [2] and engine["zero_stage"] == 2
        for key, value in (("pooled", got.pooled), ("cls", got.cls), ("hidden", got.last_hidden_state),
                           ("logits", got.logits["vqa"])):
            torch.testing.assert_close(value, engine[key], rtol=1e-4, atol=1e-5, msg=f"rank {rank} {key}")
        assert got.logits["vqa"].argmax(1).tolist() == engine["pred"].tolist()


def test_export_loads_and_agrees_where_deepspeed_cannot_be_imported(exported, reference, tmp_path):
    _, _, out = exported
    inputs, want, _ = reference
    torch.save(inputs, tmp_path / "batch.pt")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "dist" / "export_load_blocked.py"), str(out),
                           str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")], cwd=REPO, env=launcher_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["model_class"] == "VLMoEModel" and got["ffn_classes"] == ["LocalSparseFFN"]
    torch.testing.assert_close(got["logits"]["vqa"], want["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["pooled"], want["pooled"], rtol=1e-4, atol=1e-5)


def test_help_is_fast_and_bad_checkpoints_get_clear_errors(exported, tmp_path):
    _, run, _ = exported
    seconds = []
    for _ in range(2):  # the faster of two: a busy host should not fail it
        started = time.perf_counter()
        proc = export_cli("--help")
        seconds.append(time.perf_counter() - started)
        assert proc.returncode == 0 and "--max-shard-size" in proc.stdout
    assert min(seconds) < 1.0, seconds
    missing = tmp_path / "no_such_run"
    proc = export_cli("--checkpoint", missing, "--output", tmp_path / "out")
    assert proc.returncode == 2 and str(missing) in proc.stderr and "Traceback" not in proc.stderr
    proc = export_cli("--checkpoint", run, "--step", 99, "--output", tmp_path / "out")
    assert proc.returncode == 2 and "step_000099" in proc.stderr and "complete steps: 3" in proc.stderr
    assert not (tmp_path / "out").exists()
