"""Downstream tasks against the Task contract with a tiny real VLMoE and a real WordPiece tokenizer:
fixed shapes, padding samples, losses that backpropagate into heads and model, eval outputs -> metrics."""
import json

import pytest
import torch
from PIL import Image
from transformers import BertTokenizerFast

from pipeline.model import ModelConfig, MoEConfig, VLMoE
from pipeline.tasks import SkipSample, TaskContext, get_task_class

WORDS = ["what", "color", "is", "the", "circle", "square", "red", "blue", "a", "on", "left", "how", "many",
         "two", "there", "are", "shapes", "yes", "no", "big", "small", "green"]
L, SIZE = 8, 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=str(path), do_lower_case=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, image_size=SIZE, patch_size=8, vocab_size=32,
                      max_text_len=L, num_fusion_layers=1, moe=MoEConfig(num_experts=2, every=2, min_capacity=1, use_rts=False))
    return VLMoE(cfg)


def make_task(name, model, tokenizer, data_dir=None, options=None, objectives=None):
    ctx = TaskContext(model_cfg=model.cfg, tokenizer=tokenizer, text_len=L, image_size=SIZE, data_dir=data_dir,
                      objectives=objectives or {}, options=options or {})
    return get_task_class(name)(ctx)


def image(color):
    return Image.new("RGB", (24, 20), color)


def check_contract(task, samples, model):
    """prepare_sample/padding_sample agree on keys and shapes; loss backprops; eval outputs have leading B."""
    pad = task.padding_sample()
    for s in samples:
        assert set(s) == set(pad)
        for key, value in s.items():
            if isinstance(value, torch.Tensor):
                assert value.shape == pad[key].shape and value.dtype == pad[key].dtype, key
    heads = task.build_heads(model)
    batch = task.collate(samples + [pad])
    model.zero_grad()
    out = task.training_loss(model, heads, batch) if "label" in batch or "targets" in batch else None
    return heads, batch, out


def test_vqa(tmp_path, model, tokenizer):
    (tmp_path / "answers.json").write_text(json.dumps({"answers": ["yes", "no", "2", "red"], "counts": [9, 9, 9, 9]}))
    task = make_task("vqa", model, tokenizer, tmp_path)
    raw = {"jpg": image("red"), "txt": "what color is the circle?", "json": {
        "question": "what color is the circle?", "question_id": 7, "image_id": 1, "question_type": "what color",
        "answer_type": "other", "answers": ["red"] * 8 + ["Red."] * 2, "targets": {"red": 1.0, "blue": 0.3}}}
    s = task.prepare_sample(raw, train=True)
    assert s["pixel_values"].shape == (3, SIZE, SIZE) and s["input_ids"].shape == (L,)
    assert s["targets"].tolist() == [0, 0, 0, 1.0]  # "blue" is outside the vocabulary
    heads, batch, out = check_contract(task, [s, s], model)
    out.loss.backward()
    assert heads["vqa"][0].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # BCE is scaled by A: equals the sum over answers, mean over questions (eval mode: no routing noise)
    model.eval()
    logits = heads["vqa"](model.fuse(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).cls)
    manual = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["targets"], reduction="sum") / 3
    assert task.training_loss(model, heads, batch).loss.item() == pytest.approx(manual.item(), rel=1e-4)
    model.train()
    assert out.aux_loss.ndim == 0 and out.expert_counts
    ev = task.eval_outputs(model, heads, batch)
    ev = {k: v[:2] for k, v in ev.items()}  # the loop drops the padding row
    ev["pred"] = torch.tensor([3, 0])  # "red", "yes"
    m = task.metrics(ev)
    assert m["acc"] == pytest.approx(0.5) and m["acc/other"] == pytest.approx(0.5)
    assert task.predictions(ev) == [{"question_id": 7, "answer": "red"}, {"question_id": 7, "answer": "yes"}]


def test_retrieval(model, tokenizer):
    task = make_task("retrieval", model, tokenizer, objectives={"itc": 1.0, "itm": 1.0},
                     options={"keep_inputs": True})
    raws = [{"jpg": image(c), "txt": f"a {c} circle", "json": {"image_id": i, "captions": [
        f"a {c} circle", f"the {c} circle", f"{c}", f"a big {c} circle", f"a small {c} circle", "extra"]}}
        for i, c in enumerate(["red", "blue", "green"])]
    train = [task.prepare_sample(r, train=True) for r in raws]
    assert train[0]["input_ids"].shape == (L,)
    heads = task.build_heads(model)
    out = task.training_loss(model, heads, task.collate(train))
    out.loss.backward()
    assert {"itc", "itm"} <= set(out.terms) and heads["itc"].image_proj.weight.grad is not None
    evs = [task.prepare_sample(r, train=False) for r in raws]
    short = task.prepare_sample({"jpg": image("red"), "json": {"captions": ["red", "a red"]}}, train=False)
    assert evs[0]["input_ids"].shape == (5, L) and evs[0]["caption_valid"].all()
    assert short["caption_valid"].tolist() == [True, True, False, False, False]
    pad = task.padding_sample()
    assert set(pad) == set(evs[0]) and pad["input_ids"].shape == (5, L) and not pad["caption_valid"].any()
    with pytest.raises(SkipSample):
        task.prepare_sample({"jpg": image("red"), "json": {"captions": []}}, train=False)
    ev = task.eval_outputs(model, heads, task.collate(evs + [short]))
    assert ev["image_emb"].shape[0] == 4 and ev["text_emb"].shape[:2] == (4, 5)
    m = task.metrics(ev)
    assert m["num_images"] == 4 and m["num_captions"] == 17 and 0 <= m["r_mean"] <= 1
    rr = task.itm_rerank(model, heads, ev, top_k=3, batch_size=4)
    assert set(rr) == {f"itm_{k}" for k in m if k.startswith(("i2t", "t2i", "r_mean"))}


def test_nlvr2(model, tokenizer):
    task = make_task("nlvr2", model, tokenizer)
    raws = [{"img0.jpg": image("red"), "img1.jpg": image("blue"), "txt": "there are two shapes",
             "json": {"identifier": f"dev-1-{i}-0", "sentence": "there are two shapes", "label": lab}}
            for i, lab in enumerate([True, "False"])]
    samples = [task.prepare_sample(r, train=True) for r in raws]
    assert [int(s["label"]) for s in samples] == [1, 0]
    heads, batch, out = check_contract(task, samples, model)
    out.loss.backward()
    assert heads["nlvr2"][0].weight.shape == (64, 64) and heads["nlvr2"][0].weight.grad is not None
    # two fuse passes: the expert counts cover twice the tokens of one pass
    one = model.fuse(batch["pixel_values0"], batch["input_ids"], batch["attention_mask"]).expert_counts
    assert sum(v.sum() for v in out.expert_counts.values()) == 2 * sum(v.sum() for v in one.values())
    ev = task.eval_outputs(model, heads, batch)
    ev = {"pred": torch.tensor([1, 1]), "label": ev["label"][:2], "identifier": ev["identifier"][:2]}
    assert task.metrics(ev) == {"acc": 0.5, "consistency": 0.0}


def test_classification(tmp_path, model, tokenizer):
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(6)]}))
    task = make_task("classification", model, tokenizer, tmp_path)
    samples = [task.prepare_sample({"jpg": image("red"), "cls": 3, "json": {"label": 3}}, train=True),
               task.prepare_sample({"jpg": image("blue"), "cls": "5"}, train=True)]
    with pytest.raises(SkipSample):
        task.prepare_sample({"jpg": image("blue"), "cls": 6}, train=True)
    heads, batch, out = check_contract(task, samples, model)
    out.loss.backward()
    ev = task.eval_outputs(model, heads, batch)
    assert ev["logits"].shape == (3, 6)
    m = task.metrics({"logits": ev["logits"][:2], "label": ev["label"][:2]})
    assert set(m) == {"top1", "top5"} and m["top1"] <= m["top5"]


def test_missing_answers_file_is_a_clear_error(tmp_path, model, tokenizer):
    with pytest.raises(ValueError, match="answers.json"):
        make_task("vqa", model, tokenizer, tmp_path)
