"""Downstream tasks against the Task contract with a tiny real VLMoE and a real WordPiece tokenizer:
fixed shapes, padding samples, losses that backpropagate into heads and model, eval outputs -> metrics."""
import json

import pytest
import torch
from PIL import Image

from pipeline.model import ModelConfig, MoEConfig, VLMoE
from pipeline.tasks import SkipSample, TaskContext, get_task_class
from tests.finetune_helpers import word_tokenizer

WORDS = ["what", "color", "is", "the", "circle", "square", "red", "blue", "a", "on", "left", "how", "many",
         "two", "there", "are", "shapes", "yes", "no", "big", "small", "green"]
L, SIZE = 8, 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"), WORDS)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, image_size=SIZE, patch_size=8, vocab_size=32,
                      max_text_len=L, num_fusion_layers=1,
                      moe=MoEConfig(num_experts=2, every=2, min_capacity=1, use_rts=False))
    return VLMoE(cfg)


def make_task(name, model, tokenizer, data_dir=None, options=None, objectives=None):
    """The task holding ``model`` and fresh heads, its objectives and options read as a recipe's are."""
    cls = get_task_class(name)
    ctx = TaskContext(model_cfg=model.cfg, tokenizer=tokenizer, text_len=L, image_size=SIZE, data_dir=data_dir,
                      objectives=cls.resolve_objectives(objectives or {}), options=cls.parse_options(options or {}))
    return cls(ctx, model)


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
    batch = task.collate(samples + [pad])
    task.zero_grad()
    out = task(batch) if "label" in batch or "targets" in batch else None
    return task.heads, batch, out


def test_vqa(tmp_path, model, tokenizer):
    (tmp_path / "answers.json").write_text(json.dumps({"answers": ["yes", "no", "2", "red"], "counts": [9, 9, 9, 9]}))
    task = make_task("vqa", model, tokenizer, tmp_path)
    raw = {"jpg": image("red"), "txt": "what color is the circle?", "json": {
        "question": "what color is the circle?", "question_id": 7, "image_id": 1, "question_type": "what color",
        "answer_type": "other", "answers": ["red"] * 8 + ["Red."] * 2, "targets": {"red": 1.0, "blue": 0.3}}}
    s = task.prepare_sample(raw, train=True)
    assert s["pixel_values"].shape == (3, SIZE, SIZE) and s["input_ids"].shape == (L,)
    assert tokenizer.convert_ids_to_tokens(s["input_ids"].tolist()) == [  # words, not [UNK] ("?" is unknown)
        "[CLS]", "what", "color", "is", "the", "circle", "[UNK]", "[SEP]"]
    assert s["targets"].tolist() == [0, 0, 0, 1.0]  # "blue" is outside the vocabulary
    heads, batch, out = check_contract(task, [s, s], model)
    out.loss.backward()
    assert heads["vqa"][0].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # BCE is scaled by A: equals the sum over answers, mean over questions (eval mode: no routing noise)
    model.eval()
    logits = heads["vqa"](model.fuse(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).cls)
    manual = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["targets"], reduction="sum") / 3
    assert task(batch).loss.item() == pytest.approx(manual.item(), rel=1e-4)
    # the recipe's objective weight scales the loss
    half = make_task("vqa", model, tokenizer, tmp_path, objectives={"vqa": 0.5})
    half.heads.load_state_dict(heads.state_dict())
    assert half(batch).loss.item() == pytest.approx(manual.item() / 2, rel=1e-4)
    model.train()
    ev = task.eval_outputs(batch)
    ev = {k: v[:2] for k, v in ev.items()}  # the loop drops the padding row
    ev["pred"] = torch.tensor([3, 0])  # "red", "yes"
    m = task.metrics(ev)
    assert m["acc"] == pytest.approx(0.5) and m["acc/other"] == pytest.approx(0.5)
    assert task.predictions(ev) == [{"question_id": 7, "answer": "red"}, {"question_id": 7, "answer": "yes"}]


def test_retrieval(model, tokenizer):
    task = make_task("retrieval", model, tokenizer, objectives={"itc": 1.0, "itm": 1.0},
                     options={"itm_rerank": 3})
    raws = [{"jpg": image(c), "txt": f"a {c} circle", "json": {"image_id": i, "captions": [
        f"a {c} circle", f"the {c} circle", f"{c}", f"a big {c} circle", f"a small {c} circle", "extra"]}}
        for i, c in enumerate(["red", "blue", "green"])]
    train = [task.prepare_sample(r, train=True) for r in raws]
    assert train[0]["input_ids"].shape == (L,)
    heads = task.heads
    out = task(task.collate(train))
    out.loss.backward()
    assert {"itc", "itm"} <= set(out.terms) and heads["itc"].image_proj.weight.grad is not None
    itc_only = make_task("retrieval", model, tokenizer, objectives={"itc": 1.0})  # itm weighs 0: not run
    assert set(itc_only(task.collate(train)).terms) == {"itc", "itc_acc"}
    evs = [task.prepare_sample(r, train=False) for r in raws]
    short = task.prepare_sample({"jpg": image("red"), "json": {"captions": ["red", "a red"]}}, train=False)
    assert evs[0]["input_ids"].shape == (5, L) and evs[0]["caption_valid"].all()
    assert short["caption_valid"].tolist() == [True, True, False, False, False]
    pad = task.padding_sample()
    assert set(pad) == set(evs[0]) and pad["input_ids"].shape == (5, L) and not pad["caption_valid"].any()
    with pytest.raises(SkipSample):
        task.prepare_sample({"jpg": image("red"), "json": {"captions": []}}, train=False)
    ev = task.eval_outputs(task.collate(evs + [short]))
    assert ev["image_emb"].shape[0] == 4 and ev["text_emb"].shape[:2] == (4, 5)
    m = task.metrics(ev)
    assert m["num_images"] == 4 and m["num_captions"] == 17 and 0 <= m["r_mean"] <= 1
    rr = task.extra_metrics(ev, batch_size=4)  # itm_rerank=3: the top-3 of each query re-ranked by ITM
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
    ev = task.eval_outputs(batch)
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
    ev = task.eval_outputs(batch)
    assert ev["logits"].shape == (3, 6)
    m = task.metrics({"logits": ev["logits"][:2], "label": ev["label"][:2]})
    assert set(m) == {"top1", "top5"} and m["top1"] <= m["top5"]


def test_missing_answers_file_is_a_clear_error(tmp_path, model, tokenizer):
    with pytest.raises(ValueError, match="answers.json"):
        make_task("vqa", model, tokenizer, tmp_path)


def test_every_task_declares_what_it_reads():
    from data_prep.cli import COMMAND_MODULES
    from pipeline.tasks import TASKS

    declared = {name: (get_task_class(name).manifest_tasks, get_task_class(name).vocab_files) for name in TASKS}
    assert declared == {
        "text_mlm": (("pairs", "retrieval"), ()), "vl_pretrain": (("pairs", "retrieval"), ()),
        "vqa": (("vqa",), ("answers.json",)), "gqa": (("gqa",), ("answers.json",)),
        "retrieval": (("retrieval",), ()), "nlvr2": (("nlvr2",), ()),
        "classification": (("classification",), ("classes.json",)), "snli_ve": (("snli_ve",), ("classes.json",)),
        "audio_retrieval": (("audio_retrieval", "audio_pairs"), ()),
        "vla_pretrain": (("pairs", "retrieval", "audio_retrieval", "audio_pairs"), ()),
        "audio_classification": (("audio_classification",), ("classes.json",)),
        "captioning": (("retrieval", "pairs"), ()), "audio_captioning": (("audio_retrieval", "audio_pairs"), ())}
    assert {"vqa", "gqa", "nlvr2", "snli_ve", "retrieval"} <= set(COMMAND_MODULES)


def test_vqa_writes_json_predictions_and_skips_empty_answer_types(tmp_path, model, tokenizer):
    (tmp_path / "answers.json").write_text(json.dumps({"answers": ["yes", "no"], "counts": [9, 9]}))
    task = make_task("vqa", model, tokenizer, tmp_path)
    raw = {"jpg": image("red"), "txt": "is it red?", "json": {"question_id": 3, "answer_type": "",
                                                             "answers": ["yes"] * 10}}
    s = task.prepare_sample(raw, train=False)
    outputs = {"pred": torch.tensor([0]), "question_id": [s["question_id"]], "answers": [s["answers"]],
               "answer_type": [s["answer_type"]], "question_type": [s["question_type"]]}
    assert task.metrics(outputs) == {"acc": 1.0, "num_scored": 1.0}
    path = task.write_predictions(outputs, tmp_path / "step_1_predictions")
    assert path.name == "step_1_predictions.json"
    assert json.loads(path.read_text()) == [{"question_id": 3, "answer": "yes"}]


def test_gqa(tmp_path, model, tokenizer):
    (tmp_path / "answers.json").write_text(json.dumps({"answers": ["yes", "no", "red"], "counts": [3, 2, 1]}))
    task = make_task("gqa", model, tokenizer, tmp_path)

    def raw(qid, answer, qtype="query"):
        meta = {"question": "what color is it?", "question_id": qid, "image_id": "1", "question_type": qtype}
        with_answer = {"answer": answer} if answer else {}
        return {"jpg": image("red"), "txt": meta["question"], "json": {**meta, **with_answer}}

    samples = [task.prepare_sample(raw("q1", "red"), train=True), task.prepare_sample(raw("q2", "no", "verify"), True)]
    assert [int(s["label"]) for s in samples] == [2, 1]
    for bad, reason in ((raw("q3", "blue"), "answer_not_in_vocabulary"), (raw("q4", None), "missing_answer")):
        with pytest.raises(SkipSample, match=reason):
            task.prepare_sample(bad, train=True)
    heads, batch, out = check_contract(task, samples, model)
    out.loss.backward()
    assert heads["vqa"][-1].weight.shape[0] == 3 and heads["vqa"][-1].weight.grad is not None
    assert {"gqa_ce", "gqa_acc"} == set(out.terms)
    unknown = task.prepare_sample(raw("q3", "blue"), train=False)  # scored wrong, never an index
    test = task.prepare_sample(raw("q5", None), train=False)
    outputs = {"pred": torch.tensor([2, 0, 2, 0]), "question_id": ["q1", "q2", "q3", "q5"],
               "answer": ["red", "no", unknown["answer"], test["answer"]],
               "question_type": ["query", "verify", "query", "query"]}
    assert task.metrics(outputs) == {"acc": pytest.approx(1 / 3), "num_scored": 3.0, "acc/query": 0.5,
                                     "acc/verify": 0.0}
    assert task.predictions(outputs)[:2] == [{"questionId": "q1", "prediction": "red"},
                                             {"questionId": "q2", "prediction": "yes"}]


def test_snli_ve(tmp_path, model, tokenizer):
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["entailment", "neutral", "contradiction"]}))
    task = make_task("snli_ve", model, tokenizer, tmp_path)
    raws = [{"jpg": image("red"), "txt": "a red circle", "json": {
        "pair_id": f"p{i}", "image_id": "1", "hypothesis": "a red circle", "premise": "", "label": i,
        "label_name": name}} for i, name in enumerate(["entailment", "neutral", "contradiction"])]
    samples = [task.prepare_sample(r, train=True) for r in raws]
    assert [int(s["label"]) for s in samples] == [0, 1, 2]
    heads, batch, out = check_contract(task, samples, model)
    out.loss.backward()
    assert heads["snli_ve"][-1].weight.grad is not None
    ev = task.eval_outputs(batch)
    ev = {"pred": torch.tensor([0, 0, 2]), "label": ev["label"][:3], "pair_id": ev["pair_id"][:3]}
    assert task.metrics(ev) == {"acc": pytest.approx(2 / 3), "num_scored": 3.0, "acc/contradiction": 1.0,
                                "acc/entailment": 1.0, "acc/neutral": 0.0}
    assert task.predictions(ev) == [{"pair_id": "p0", "prediction": "entailment"},
                                    {"pair_id": "p1", "prediction": "entailment"},
                                    {"pair_id": "p2", "prediction": "contradiction"}]


def test_nlvr2_writes_the_leaderboard_csv(tmp_path, model, tokenizer):
    task = make_task("nlvr2", model, tokenizer)
    outputs = {"pred": torch.tensor([1.0, 0.0]), "label": torch.tensor([1, 1]),
               "identifier": ["test1-0-1-0", "test1-0-2-0"]}
    path = task.write_predictions(outputs, tmp_path / "nlvr2_test1")
    assert path.name == "nlvr2_test1.csv"
    assert path.read_text() == "test1-0-1-0,True\ntest1-0-2-0,False\n"


def test_retrieval_predictions_rank_the_shard_ids(model, tokenizer):
    task = make_task("retrieval", model, tokenizer)
    s = task.prepare_sample({"jpg": image("red"), "json": {"image_id": 42, "captions": ["a", "b"],
                                                           "sentids": [7, 8]}}, train=False)
    assert s["caption_ids"] == ["7", "8", "", "", ""]
    assert task.prepare_sample({"jpg": image("red"), "json": {"image_id": 5, "captions": ["a"]}},
                               train=False)["caption_ids"][:2] == ["5#0", ""]
    # 12 images with one caption each: caption t is most similar to image t, then t+1, ...
    n = 12
    image_emb = torch.nn.functional.one_hot(torch.arange(n), n).float()
    text_emb = torch.zeros(n, 5, n)
    for t in range(n):
        text_emb[t, 0] = torch.tensor([max(0.0, 1.0 - 0.05 * ((i - t) % n)) for i in range(n)])
    valid = torch.zeros(n, 5, dtype=torch.bool)
    valid[:, 0] = True
    outputs = {"image_emb": image_emb, "text_emb": text_emb, "caption_valid": valid,
               "image_id": [f"img{i}" for i in range(n)],
               "caption_ids": [[f"cap{i}", "", "", "", ""] for i in range(n)]}
    pred = task.predictions(outputs)
    assert pred["text_to_image"][0] == {"caption_id": "cap0", "image_ids": [f"img{i}" for i in range(10)]}
    assert len(pred["image_to_text"]) == n and len(pred["image_to_text"][3]["caption_ids"]) == 10
    assert pred["image_to_text"][3]["caption_ids"][0] == "cap3"


def test_classification_maps_label_names_and_writes_top5(tmp_path, model, tokenizer):
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(6)]}))
    task = make_task("classification", model, tokenizer, tmp_path)
    named = {"jpg": image("red"), "cls": 0, "json": {"label": 0, "label_name": "c4"}, "__key__": "k1"}
    assert int(task.prepare_sample(named, train=True)["label"]) == 4  # the name, not the folder's index
    unknown = {"jpg": image("red"), "cls": 0, "json": {"label": 0, "label_name": "zebra"}}
    with pytest.raises(SkipSample, match="label_not_in_training_classes"):
        task.prepare_sample(unknown, train=True)
    assert int(task.prepare_sample(unknown, train=False)["label"]) == -1
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    outputs = {"logits": logits, "label": torch.tensor([4, -1]), "key": ["k1", "k2"]}
    assert task.metrics(outputs) == {"top1": 0.0, "top5": 0.5}
    pred = task.predictions(outputs)
    assert [p["class"] for p in pred[0]["top5"]] == ["c5", "c4", "c3", "c2", "c1"] and pred[0]["key"] == "k1"
    assert pred[1]["top5"][0]["class"] == "c0" and pred[1]["top5"][0]["score"] > 0.9
