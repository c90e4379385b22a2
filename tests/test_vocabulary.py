"""The heads' vocabulary is always the training folder's (answers.json / classes.json): an eval folder
written with another vocabulary is read through the training one (answers by string, classes by name),
never sizes a head, and what the training data lacks is scored wrong, never indexed out of range."""
import json
import shutil

import pytest
import torch
from transformers import BertTokenizerFast

from pipeline.run.build import build_task
from pipeline.data.loader import build_eval_loader
from pipeline.metrics.vqa import consensus_answer
from pipeline.recipe import SourceConfig, recipe_from_dict
from pipeline.tasks import DistInfo
from tests.finetune_helpers import DATA, TINY_MODEL
from tests.fixtures_data_prep import PALETTE, run_cli, write_image


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "color"]) + "\n")
    return BertTokenizerFast(vocab_file=str(path), do_lower_case=True)


def task_for(name, train, eval_source, tokenizer):
    recipe = recipe_from_dict({
        "task": name, "model": {**TINY_MODEL, "moe": {**TINY_MODEL["moe"], "ep_size": 1}},
        "data": {**DATA, "train": [{"path": str(train), "split": "train"}], "eval": eval_source,
                 "tokenizer": "unused"}})
    return build_task(recipe, tokenizer, DistInfo()), recipe


def eval_samples(task, recipe, path, split):
    loader = build_eval_loader(SourceConfig(path=str(path), split=split), recipe.data, task, 64, 0, 1)
    return [s for batch in loader for s in batch]


def test_vqa_eval_folder_with_another_vocabulary(tmp_path, tokenizer):
    assert run_cli("synth", "--output", tmp_path / "synth", "--num-samples", 24, "--num-val", 24,
                   "--num-retrieval-test", 1, "--canvas", 16) == 0
    train, val = tmp_path / "synth" / "vqa", tmp_path / "vqa_val"
    shutil.copytree(train, val)
    full = json.loads((train / "answers.json").read_text())["answers"]
    dropped = full[0]  # the most frequent answer: the training vocabulary lacks it
    (train / "answers.json").write_text(json.dumps({"answers": full[1:], "counts": [1] * (len(full) - 1)}))
    other = ["zebra", *reversed(full)]
    (val / "answers.json").write_text(json.dumps({"answers": other, "counts": [1] * len(other)}))
    task, recipe = task_for("vqa", train, {"path": str(val), "split": "val"}, tokenizer)
    assert task.answers == full[1:]
    samples = eval_samples(task, recipe, val, "val")
    assert len(samples) == 24 and all(s["targets"].shape == (len(full) - 1,) for s in samples)
    # an oracle that answers the best training-vocabulary target scores 1 exactly where the human
    # answer is in the training vocabulary, 0 where it is not
    preds = torch.stack([s["targets"] for s in samples]).argmax(dim=1)
    answers = [s["answers"] for s in samples]
    in_vocab = [consensus_answer(a) != dropped for a in answers]
    assert 0 < sum(in_vocab) < len(in_vocab)
    metrics = task.metrics({"pred": preds, "answers": answers, "answer_type": [s["answer_type"] for s in samples]})
    assert metrics["acc"] == pytest.approx(sum(in_vocab) / len(in_vocab))


def class_tree(root, names, out):
    """A data_prep classify folder (train and val splits) whose classes.json is ``names``."""
    for split in ("train", "val"):
        for c, name in enumerate(names):
            for i in range(2):
                write_image(root / split / name / f"{i}.jpg", PALETTE[c], size=(20, 20))
    assert run_cli("classify", "--input", root, "--output", out) == 0
    return out


def test_classification_eval_folder_with_other_classes(tmp_path, tokenizer):
    train = class_tree(tmp_path / "t", ["cat", "dog", "owl"], tmp_path / "train")
    val = class_tree(tmp_path / "v", ["dog", "owl", "yak"], tmp_path / "val")
    assert json.loads((val / "classes.json").read_text())["classes"] == ["dog", "owl", "yak"]
    task, recipe = task_for("classification", train, {"path": str(val), "split": "val"}, tokenizer)
    assert task.classes == ["cat", "dog", "owl"]
    samples = eval_samples(task, recipe, val, "val")
    labels = sorted(int(s["label"]) for s in samples)
    assert labels == [-1, -1, 1, 1, 2, 2]  # dog, owl by name in the training classes; yak unknown
    logits = torch.nn.functional.one_hot(torch.tensor(labels).clamp(min=0), 3).float()
    assert task.metrics({"logits": logits, "label": torch.tensor(labels)})["top1"] == pytest.approx(4 / 6)


def test_a_task_builds_for_images_larger_than_the_model_was_sized_for(tmp_path, tokenizer):
    """Fine-tuning at a higher resolution: data.image_size 64 on a model whose positions were learned at 32 px
    (they interpolate). build_task used to refuse it after the ranks had started; the task's samples then come
    at 64 px and the model encodes them (8 x 8 patches)."""
    import torch

    from pipeline.model import VLMoE
    from pipeline.model.config import ModelConfig

    model = {**TINY_MODEL, "moe": {**TINY_MODEL["moe"], "ep_size": 1}}
    recipe = recipe_from_dict({"task": "vl_pretrain", "model": model,
                               "data": {**DATA, "image_size": 64, "train": [{"path": str(tmp_path), "split": "train"}],
                                        "tokenizer": "unused"}})
    task = build_task(recipe, tokenizer, DistInfo())
    assert task.ctx.image_size == 64
    out = VLMoE(ModelConfig(**{**model, "moe": {**model["moe"], "every": 0}})).encode_image(torch.zeros(1, 3, 64, 64))
    assert out.num_image_tokens == 1 + 64
