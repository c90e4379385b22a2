"""Open-ended VQA: the answer LM next to the VQA classifier (objective ``answer_lm``), with a tiny real VLMoE
and a real WordPiece tokenizer: the LM text and its loss mask, the extra head and pass only when asked for,
a tiny overfit whose generated answers (one outside the answer vocabulary) score 1.0, the metric keys and
the generated answers' predictions file."""
import json

import pytest
import torch
from PIL import Image

from pipeline.config_utils import ConfigError
from pipeline.model import ModelConfig, MoEConfig, VLMoE
from pipeline.tasks import TaskContext, get_task_class
from pipeline.tasks.vqa import answer_lm_text, top_answer
from tests.finetune_helpers import SPECIAL_TOKENS

WORDS = ["what", "color", "is", "the", "circle", "how", "many", "shapes", "are", "there", "red", "blue", "green",
         "dark", "two", "yes", "no"]
L, SIZE = 12, 16
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "dark blue": (10, 10, 90)}


@pytest.fixture(scope="module")
def tokenizer():
    """WordPiece over the specials + WORDS (a vocab dict: transformers 5 ignores ``vocab_file``)."""
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate([*SPECIAL_TOKENS, *WORDS])}, do_lower_case=True)
    assert tok.convert_ids_to_tokens(tok("dark blue", add_special_tokens=False)["input_ids"]) == ["dark", "blue"]
    return tok


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """answers.json without "green" and "dark blue": the classifier cannot give them, generation can."""
    folder = tmp_path_factory.mktemp("vqa")
    (folder / "answers.json").write_text(json.dumps({"answers": ["red", "blue", "2"], "counts": [5, 5, 5]}))
    return folder


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, image_size=SIZE, patch_size=8, vocab_size=32,
                      max_text_len=L, num_fusion_layers=1,
                      moe=MoEConfig(num_experts=2, every=2, min_capacity=1, use_rts=False))
    return VLMoE(cfg)


def make_task(name, model, tokenizer, data_dir, objectives=None, options=None):
    cls = get_task_class(name)
    ctx = TaskContext(model_cfg=model.cfg, tokenizer=tokenizer, text_len=L, image_size=SIZE, data_dir=data_dir,
                      objectives=cls.resolve_objectives(objectives or {}), options=cls.parse_options(options or {}))
    return cls(ctx, model)


def raw(qid, answer, question="what color is the circle?", answer_type="other"):
    targets = {answer: 1.0, "blue" if answer != "blue" else "red": 0.3}
    return {"jpg": Image.new("RGB", (20, 20), COLORS.get(answer, (128, 128, 128))), "txt": question,
            "json": {"question": question, "question_id": qid, "question_type": "what color",
                     "answer_type": answer_type, "answers": [answer] * 9 + ["blue"], "targets": targets}}


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_answer_lm_text_loss_mask_covers_exactly_the_answer(tokenizer):
    cls_, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    q, a = ids_of(tokenizer, "what color is the circle"), ids_of(tokenizer, "dark blue")
    t = answer_lm_text(tokenizer, "what color is the circle", "dark blue", L, max_new_tokens=4)
    full = [cls_, *q, sep, *a, sep]
    assert t["lm_input_ids"].tolist() == full + [pad] * (L - len(full))
    assert t["lm_attention_mask"].tolist() == [1] * len(full) + [0] * (L - len(full))
    # the loss is on the answer's two tokens and the closing [SEP], nothing of the question or padding
    assert t["lm_loss_mask"].tolist() == [0] * (len(q) + 2) + [1, 1, 1] + [0] * (L - len(full))
    prompt = [cls_, *q, sep]
    assert t["prompt_ids"].tolist() == prompt + [pad] * (L - len(prompt))
    assert t["prompt_mask"].tolist() == [1] * len(prompt) + [0] * (L - len(prompt))
    # a long question keeps L - 2 - max_new_tokens tokens, a long answer max_new_tokens - 1: fits L
    long = answer_lm_text(tokenizer, "what color is the circle " * 4, "dark blue red green", L, max_new_tokens=4)
    assert long["prompt_mask"].sum() == L - 4 and long["lm_attention_mask"].sum() == L
    assert long["lm_loss_mask"].tolist() == [0] * (L - 4) + [1, 1, 1, 1]
    assert long["lm_input_ids"][-4:].tolist() == [*ids_of(tokenizer, "dark blue red"), sep]
    # no answer (a test question): nothing to predict
    none = answer_lm_text(tokenizer, "what color is the circle", "", L, max_new_tokens=4)
    assert none["lm_loss_mask"].sum() == 0 and torch.equal(none["lm_input_ids"], none["prompt_ids"])


def test_top_answer_is_the_best_soft_target_in_or_out_of_the_vocabulary():
    assert top_answer({"blue": 0.3, "dark blue": 1.0}, []) == "dark blue"
    assert top_answer({"red": 0.6, "blue": 0.6}, ["red"]) == "blue"  # ties: alphabetical first
    assert top_answer({}, ["Two", "2", "two", "red"]) == "2"  # no targets: the normalised consensus
    assert top_answer({}, []) == ""


def test_prepare_sample_builds_classifier_and_lm_inputs(tokenizer, data_dir):
    model = tiny_model()
    plain = make_task("vqa", model, tokenizer, data_dir)
    lm = make_task("vqa", model, tokenizer, data_dir, objectives={"vqa": 1.0, "answer_lm": 1.0})
    s_plain, s_lm = plain.prepare_sample(raw(1, "dark blue"), True), lm.prepare_sample(raw(1, "dark blue"), True)
    # the classifier's inputs are today's (question only); the LM's text ends with the top target
    for key in ("input_ids", "attention_mask", "pixel_values", "targets"):
        assert torch.equal(s_plain[key], s_lm[key]), key
    assert set(s_lm) - set(s_plain) == {"prompt_ids", "prompt_mask", "lm_input_ids", "lm_attention_mask",
                                        "lm_loss_mask"}
    answer = s_lm["lm_input_ids"][s_lm["lm_loss_mask"].bool()].tolist()
    assert answer == [*ids_of(tokenizer, "dark blue"), tokenizer.sep_token_id]
    pad = lm.padding_sample()
    assert set(pad) == set(s_lm) and pad["lm_loss_mask"].sum() == 0
    for key, value in s_lm.items():
        if isinstance(value, torch.Tensor):
            assert value.shape == pad[key].shape and value.dtype == pad[key].dtype, key


def test_answer_lm_weight_zero_adds_no_head_no_pass_no_inputs(tokenizer, data_dir):
    vqa = get_task_class("vqa")
    assert vqa.passes(vqa.resolve_objectives({}), vqa.parse_options({})) == {"fuse": 1}
    assert vqa.passes(vqa.resolve_objectives({"vqa": 1.0, "answer_lm": 0.5}), None) == {"fuse": 1}
    model = tiny_model()
    plain = make_task("vqa", model, tokenizer, data_dir)
    assert set(plain.heads) == {"vqa"} and not plain.generative
    # an existing VQA checkpoint's keys: the model's and heads.vqa.* only, and it loads strictly
    assert {k.split(".")[1] for k in plain.state_dict() if k.startswith("heads.")} == {"vqa"}
    make_task("vqa", tiny_model(1), tokenizer, data_dir).load_state_dict(plain.state_dict(), strict=True)
    assert "lm_input_ids" not in plain.prepare_sample(raw(1, "red"), False)
    batch = plain.collate([plain.prepare_sample(raw(1, "red"), False)])
    plain.eval()
    assert "generated" not in plain.eval_outputs(batch)
    assert not any(k.startswith("answer_lm") for k in plain(batch).terms)
    # with the LM the head is the pretraining MLM head (tied): heads.mlm.* as vl_pretrain names it
    lm = make_task("vqa", model, tokenizer, data_dir, objectives={"vqa": 1.0, "answer_lm": 1.0})
    assert set(lm.heads) == {"vqa", "mlm"} and lm.heads["mlm"].token_embedding is model.token_embedding
    # generate_answers alone: the head for evaluation, no training pass
    gen = make_task("vqa", model, tokenizer, data_dir, options={"generate_answers": True})
    assert set(gen.heads) == {"vqa", "mlm"} and gen.weights["answer_lm"] == 0
    # GQA (a VQATask subclass) is untouched: no LM option, one pass, no LM head
    gqa = get_task_class("gqa")
    with pytest.raises(ConfigError, match="takes no options"):
        gqa.parse_options({"generate_answers": True})
    assert gqa.passes(gqa.resolve_objectives({}), None) == {"fuse": 1}


def test_options_are_checked(tokenizer, data_dir):
    vqa = get_task_class("vqa")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        vqa.parse_options({"max_new_tokens": 1})
    with pytest.raises(ConfigError, match="num_beams"):
        vqa.parse_options({"num_beams": 0})
    with pytest.raises(ConfigError, match="text_len"):  # L = 12: at most 9 new tokens leave a question token
        make_task("vqa", tiny_model(), tokenizer, data_dir, objectives={"answer_lm": 1.0},
                  options={"max_new_tokens": 10})


def test_metrics_score_generated_answers_next_to_the_classifier(tokenizer, data_dir, tmp_path):
    task = make_task("vqa", tiny_model(), tokenizer, data_dir, options={"generate_answers": True})
    outputs = {"pred": torch.tensor([0, 1, 2]), "question_id": [1, 2, 3],
               "answers": [["red"] * 10, ["green"] * 10, ["two"] * 5 + ["2"] * 5],
               "answer_type": ["other", "other", "number"], "question_type": ["what color"] * 3,
               "generated": ["red", "green", "2"]}  # "green" is outside the answer vocabulary
    m = task.metrics(outputs)
    assert m == {"acc": pytest.approx(2 / 3), "acc/number": 1.0, "acc/other": 0.5, "num_scored": 3.0,
                 "gen_acc": 1.0, "gen_acc/number": 1.0, "gen_acc/other": 1.0}
    path = task.write_predictions(outputs, tmp_path / "step_1_predictions")
    assert json.loads(path.read_text())[1] == {"question_id": 2, "answer": "blue"}  # the classifier's file
    generated = json.loads((tmp_path / "step_1_predictions_generated.json").read_text())
    assert generated == [{"question_id": 1, "answer": "red"}, {"question_id": 2, "answer": "green"},
                         {"question_id": 3, "answer": "2"}]
    del outputs["generated"]  # a classifier-only run: today's keys and one file
    assert set(task.metrics(outputs)) == {"acc", "acc/number", "acc/other", "num_scored"}
    assert not (tmp_path / "x_generated.json").exists() and task.write_predictions(outputs, tmp_path / "x")
    assert not (tmp_path / "x_generated.json").exists()


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is ~10x faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_overfit_generates_the_right_answers(tokenizer, data_dir, one_thread):
    """Four images, one question: the answer LM learns each colour (two outside the classifier's answers,
    one of two tokens); greedy generation then answers every question right: gen_acc 1.0."""
    model = tiny_model()
    task = make_task("vqa", model, tokenizer, data_dir, objectives={"vqa": 1.0, "answer_lm": 1.0})
    answers = list(COLORS)
    batch = task.collate([task.prepare_sample(raw(i, a), train=True) for i, a in enumerate(answers)])
    opt = torch.optim.AdamW(task.parameters(), lr=5e-3, weight_decay=0.0)
    task.train()
    for _ in range(40):
        out = task(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert {"vqa_bce", "vqa_score", "answer_lm_loss", "answer_lm_acc"} == set(out.terms)
    assert out.terms["answer_lm_acc"] == 1.0
    task.eval()
    outputs = task.eval_outputs(batch)
    assert outputs["generated"] == answers
    m = task.metrics(outputs)
    # the classifier cannot say "green" or "dark blue": at most (1 + 1 + 0.3 + 0.3) / 4
    assert m["gen_acc"] == 1.0 and m["gen_acc/other"] == 1.0 and m["acc"] <= 0.65 + 1e-6


def test_answer_lm_trains_classifier_and_answer_in_one_pass_the_classifier_reads_as_at_eval(tokenizer, data_dir):
    """With answer_lm the training step makes one fused pass (the MoE calls of one pass), and the classifier's
    logits from it equal the question-only pass evaluation makes (the question is a prefix that never sees
    the answer)."""
    from pipeline.model.generation import dropless

    model = tiny_model()
    task = make_task("vqa", model, tokenizer, data_dir, objectives={"vqa": 1.0, "answer_lm": 1.0})
    batch = task.collate([task.prepare_sample(raw(i, a), train=True) for i, a in enumerate(COLORS)])
    task.eval()
    calls = []
    hooks = [f.register_forward_hook(lambda *a: calls.append(1)) for f in model.sparse_ffns().values()]
    with torch.no_grad(), dropless(model):
        out = task(batch)
        one_pass = len(calls)
        calls.clear()
        question_only = task.logits(batch)
    for hook in hooks:
        hook.remove()
    assert one_pass == len(calls) > 0
    assert "answer_lm_loss" in out.terms
    torch.testing.assert_close(task.heads["vqa"](task.answer_lm_pass(batch).pooled).float(), question_only,
                               rtol=1e-5, atol=1e-5)
