"""Captioning tasks (``captioning``, ``audio_captioning``) with a tiny real VLMoE and a real WordPiece tokenizer:
caption draws and skips, the prefix-LM loss learning a small set, generation -> metrics, the scene facts, the
most-frequent-caption baseline, the official predictions format, the ``cap`` objective of pretraining; then the
user path: 2 CPU ranks fine-tune ``captioning`` from a vl_pretrain run (EP=2) and ``pipeline.evaluate`` scores
the synth retrieval test split in one process and under the launcher, with the same captions."""
import collections
import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.model import ModelConfig, MoEConfig, VLMoE
from pipeline.model.config import AudioConfig
from pipeline.tasks import SkipSample, TaskContext, get_task_class
from pipeline.tasks.captioning import fact_metrics, most_frequent_caption
from tests.finetune_helpers import SPECIAL_TOKENS, evaluate, finetune_recipe, shared_setup, train

WORDS = ["a", "red", "blue", "green", "yellow", "circle", "square", "small", "large", "in", "the", "top", "left",
         "low", "high", "deep", "tone", "beep", "buzz", "noise", "burst", "of", "short", "long", "then"]
L, SIZE, RATE, FRAMES, BANDS = 8, 16, 16000, 32, 16
COLOURS = {"red": (220, 40, 40), "blue": (50, 90, 235), "green": (40, 180, 60), "yellow": (240, 220, 40)}


@pytest.fixture(scope="module")
def tokenizer():
    """The BERT specials + WORDS (built from the dict: transformers 5 ignores ``vocab_file=``)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate([*SPECIAL_TOKENS, *WORDS])}, do_lower_case=True)


def tiny_model(modalities=("image", "text")):
    torch.manual_seed(0)
    return VLMoE(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, image_size=SIZE, patch_size=8, vocab_size=32,
                             max_text_len=L, num_fusion_layers=1, modalities=list(modalities),
                             audio=AudioConfig(num_mel_bins=BANDS, max_frames=FRAMES),
                             moe=MoEConfig(num_experts=2, every=2, min_capacity=1, use_rts=False)))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def make_task(name, model, tokenizer, options=None, objectives=None):
    cls = get_task_class(name)
    ctx = TaskContext(model_cfg=model.cfg, tokenizer=tokenizer, text_len=L, image_size=SIZE, data_dir=None,
                      objectives=cls.resolve_objectives(objectives or {}), options=cls.parse_options(options or {}))
    return cls(ctx, model)


def shape_image(colour, shape):
    img = Image.new("RGB", (SIZE, SIZE), (10, 10, 10))
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)([3, 3, 12, 12], fill=COLOURS[colour])
    return img


def retrieval_sample(i, colour, shape, captions=None):
    scene = [{"shape": shape, "color": colour, "size": "large", "quadrant": "top left"}]
    return {"jpg": shape_image(colour, shape), "txt": f"a {colour} {shape}", "__key__": f"k{i}",
            "json": {"image_id": i, "captions": captions or [f"a {colour} {shape}"], "scene": scene}}


def test_samples_draw_every_caption_and_skip_captionless(model, tokenizer):
    task = make_task("captioning", model, tokenizer)
    captions = ["a red circle", "a large red circle", "red circle in the top left", "red circle", "the circle"]
    raw = retrieval_sample(7, "red", "circle", captions)
    random.seed(0)
    drawn = collections.Counter(tokenizer.decode(task.prepare_sample(raw, train=True)["input_ids"],
                                                 skip_special_tokens=True) for _ in range(200))
    assert set(drawn) == set(captions) and min(drawn.values()) > 15  # uniform draws: 40 expected each
    train_sample = task.prepare_sample(raw, train=True)
    assert set(train_sample) == {"pixel_values", "input_ids", "attention_mask"}
    ids = train_sample["input_ids"].tolist()
    assert ids[0] == tokenizer.cls_token_id and tokenizer.sep_token_id in ids  # "[CLS] caption [SEP]"
    ev = task.prepare_sample(raw, train=False)
    assert ev["references"] == captions and ev["image_id"] == 7 and ev["facts"] == raw["json"]["scene"]
    pad = task.padding_sample()
    assert set(pad) == set(ev) and pad["pixel_values"].shape == ev["pixel_values"].shape and pad["references"] == []
    # a pairs sample: its txt (or json caption) is the one reference, its shard key the id when the json has none
    pairs = task.prepare_sample({"jpg": shape_image("blue", "square"), "txt": "a blue square", "__key__": "p1"},
                                train=False)
    assert pairs["references"] == ["a blue square"] and pairs["image_id"] == "p1" and pairs["facts"] is None
    for bad in ({"json": {"captions": []}}, {"json": {"captions": ["  "]}, "txt": ""}, {}):
        with pytest.raises(SkipSample, match="no_caption"):
            task.prepare_sample({"jpg": shape_image("red", "circle"), **bad}, train=True)


def test_prefix_lm_loss_falls_on_eight_captions_and_generation_writes_them(tokenizer):
    model = tiny_model()
    task = make_task("captioning", model, tokenizer, options={"max_new_tokens": 5})
    assert set(task.heads) == {"mlm"} and task.heads["mlm"].token_embedding is model.token_embedding
    assert type(task).passes(task.weights, task.options) == {"fuse": 1}
    raws = [retrieval_sample(i, c, s) for i, (c, s) in enumerate(
        (c, s) for c in COLOURS for s in ("circle", "square"))]
    batch = task.collate([task.prepare_sample(r, train=True) for r in raws])
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        out = task(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.terms["cap"]))
    assert set(out.terms) == {"cap", "cap_acc"}
    assert losses[-1] < 0.35 * losses[0], losses[::5]  # 3.4 -> ~0.7: "a", colour, shape, [SEP] of 8 captions
    task.eval()
    ev = task.eval_outputs(task.collate([task.prepare_sample(r, train=False) for r in raws]))
    assert set(ev) == {"caption", "references", "image_id", "facts"}
    # decoding continues "[CLS]" the way training taught: every caption is one of the learned ones
    assert set(ev["caption"]) <= {r["txt"] for r in raws}, ev["caption"]
    metrics = task.metrics(ev)
    assert metrics["num_images"] == 8 and metrics["num_one_object_scenes"] == 8
    assert {"bleu1", "bleu4", "rouge_l", "cider_d", "facts_color_shape"} <= set(metrics)
    assert task.predictions(ev) == [{"image_id": i, "caption": c} for i, c in enumerate(ev["caption"])]


def test_scene_facts_need_the_right_colour_and_shape():
    red_circle = [{"shape": "circle", "color": "red", "size": "small", "quadrant": "top left"}]
    two = red_circle + [{"shape": "square", "color": "blue", "size": "large", "quadrant": "top right"}]
    captions = ["a small red circle in the top left", "a small blue circle", "red: a square", "circles", "a red circle"]
    facts = [red_circle, red_circle, red_circle, red_circle, two]  # the two-object scene is not scored
    assert fact_metrics(captions, facts, "image") == {"facts_color_shape": 0.25, "num_one_object_scenes": 4.0}
    assert fact_metrics(["a red circle"], [None], "image") == {}  # real data: no facts, no metric
    low_tone = [{"pitch": "low", "timbre": "tone", "length": "short"}]
    clips = ["a brief deep beep", "a short low buzz", "we hear a high-pitched tone", "one short low tone",
             "a low tone, then a high buzz"]
    assert fact_metrics(clips, [low_tone, low_tone, low_tone, low_tone, low_tone * 2], "audio") == {
        "facts_pitch_timbre": 0.5, "num_one_event_clips": 4.0}
    noise = [{"pitch": "high", "timbre": "noise", "length": "long"}]
    assert fact_metrics(["a sustained high-pitched burst of noise"], [noise], "audio")["facts_pitch_timbre"] == 1.0


def write_folder(folder, records, split="train"):
    """A data_prep-like folder (manifest + one shard of json records; the baseline reads nothing else)."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / f"{split}-000000.tar", "w") as tar:
        for i, record in enumerate(records):
            payload = json.dumps(record).encode()
            info = tarfile.TarInfo(f"s{i}.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    manifest = {"format_version": 1, "task": "retrieval", "fields": ["jpg", "txt", "json"],
                "splits": {split: {"shards": [f"{split}-000000.tar"], "num_samples": len(records)}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_baseline_gives_the_most_frequent_train_caption_to_every_item(tmp_path, model, tokenizer):
    records = [{"captions": ["a red circle", "a blue square"]}, {"captions": ["a blue square", "a green circle"]},
               {"caption": "a blue square"}, {"captions": ["a red circle"]}]
    assert most_frequent_caption(records) == "a blue square"
    write_folder(tmp_path / "data", records)
    task = make_task("captioning", model, tokenizer)
    scene = [{"shape": "square", "color": "blue", "size": "large", "quadrant": "top left"}]
    outputs = {"caption": ["a red circle", "a red circle"], "image_id": [1, 2], "facts": [scene, None],
               "references": [["a blue square", "blue square"], ["a red circle"]]}
    name, base = task.baseline(outputs, tmp_path / "data")
    assert name == "most frequent caption" and set(base) == set(task.metrics(outputs))
    assert base["facts_color_shape"] == 1.0 and task.metrics(outputs)["facts_color_shape"] == 0.0
    assert base["bleu4"] == task.score(["a blue square"] * 2, outputs)["bleu4"]
    write_folder(tmp_path / "test_only", records, split="test")
    assert task.baseline(outputs, tmp_path / "test_only") == ("most frequent caption", {})


def clip(seconds, hz=300.0):
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), RATE


def test_audio_captioning_samples_loss_and_predictions(tokenizer):
    model = tiny_model(("text", "audio"))
    task = make_task("audio_captioning", model, tokenizer)
    assert type(task).objectives == {"audio_cap": 1.0} and type(task).passes(task.weights, None) == {"audio+text": 1}
    events = [{"pitch": "low", "timbre": "tone", "length": "short"}]
    raws = [{"flac": clip(0.3, 200), "txt": "a low tone",
             "json": {"audio_id": "c0.wav", "file_name": "c0.wav", "captions": ["a low tone", "a deep beep"],
                      "events": events}},
            {"flac": clip(0.2, 1200), "json": {"audio_id": "Y1", "captions": ["a high buzz"]}}]
    batch = task.collate([task.prepare_sample(r, train=True) for r in raws])
    assert batch["audio_values"].shape == (2, FRAMES, BANDS)
    out = task(batch)
    out.loss.backward()
    assert set(out.terms) == {"audio_cap", "audio_cap_acc"} and model.token_embedding.weight.grad is not None
    evs = [task.prepare_sample(r, train=False) for r in raws]
    pad = task.padding_sample()
    assert set(pad) == set(evs[0]) == {"audio_values", "audio_lengths", "audio_id", "file_name", "facts", "references"}
    ev = task.eval_outputs(task.collate(evs + [pad]))
    ev = {k: v[:2] for k, v in ev.items()}  # the loop drops the padding row
    assert ev["facts"] == [events, None] and all(isinstance(c, str) for c in ev["caption"])
    assert {"num_clips", "cider_d"} <= set(task.metrics(ev))
    ev["caption"] = ["a short deep beep", "a high buzz"]
    metrics = task.metrics(ev)
    assert metrics["facts_pitch_timbre"] == 1.0 and metrics["num_clips"] == 2
    assert task.predictions(ev) == [{"audio_id": "c0.wav", "file_name": "c0.wav", "caption": "a short deep beep"},
                                    {"audio_id": "Y1", "caption": "a high buzz"}]
    with pytest.raises(SkipSample, match="audio_shorter_than_one_frame"):
        task.prepare_sample({**raws[0], "flac": clip(0.0)}, train=True)


def test_options_are_checked_against_the_text_length(model, tokenizer):
    cls = get_task_class("captioning")
    with pytest.raises(Exception, match="max_new_tokens=9 > data.text_len - 1 = 7"):
        make_task("captioning", model, tokenizer, options={"max_new_tokens": 9})
    with pytest.raises(Exception, match="num_beams"):
        cls.parse_options({"num_beams": 0})
    task = make_task("captioning", model, tokenizer, options={"num_beams": 3, "length_penalty": 0.5})
    decode = task.decode_options()
    assert (decode.num_beams, decode.max_new_tokens, decode.min_new_tokens, decode.length_penalty) == (3, 7, 1, 0.5)


def test_cap_objective_in_pretraining(tokenizer):
    model = tiny_model()
    cls = get_task_class("vl_pretrain")
    assert cls.resolve_objectives({})["cap"] == 0.0  # off unless a recipe sets it: today's runs unchanged
    assert cls.passes(cls.resolve_objectives({"itc": 1.0, "cap": 1.0}), None) == {"image": 1, "text": 1, "fuse": 1}
    task = make_task("vl_pretrain", model, tokenizer, options={"mlm_prob": 0.5}, objectives={"itc": 1.0, "cap": 0.5})
    raws = [{"jpg": shape_image(c, "circle"), "txt": f"a {c} circle"} for c in COLOURS]
    batch = task.collate([task.prepare_sample(r, train=True) for r in raws])
    out = task(batch)
    assert set(out.terms) == {"itc", "itc_acc", "cap", "cap_acc"}
    assert float(out.loss.detach()) == pytest.approx(float(out.terms["itc"] + 0.5 * out.terms["cap"]), rel=1e-5)
    out.loss.backward()
    assert task.heads["mlm"].transform.weight.grad.abs().sum() > 0  # the shared head learns captioning
    batch["valid"] = torch.tensor([True, True, True, False])
    metrics = task.metrics({k: v[:3] for k, v in task.eval_outputs(batch).items()})
    assert {"cap_loss", "cap_acc"} <= set(metrics) and 0 < metrics["cap_loss"] < 10
    vla = get_task_class("vla_pretrain")
    assert vla.resolve_objectives({})["cap"] == vla.resolve_objectives({})["audio_cap"] == 0.0
    assert vla.passes(vla.resolve_objectives({"audio_cap": 1.0}), None) == {"audio+text": 1}


@pytest.mark.slow
def test_finetune_captioning_then_evaluate_one_process_and_two_ranks(tmp_path, tmp_path_factory):
    """From the shared tiny vl_pretrain run (EP=2, its mlm head carried over), 3 steps on the synth retrieval
    folder; the test split scored by 1 process and by 2 ranks (EP=2: lockstep generation) with the same captions."""
    shared = shared_setup(tmp_path_factory)
    data = shared["data"] / "retrieval"
    recipe = finetune_recipe("captioning", shared, {"path": str(data), "split": "train"},
                             {"path": str(data), "split": "test"}, task_options={"max_new_tokens": 6})
    run = tmp_path / "captioning"
    proc = train(tmp_path / "captioning.yaml", recipe, run)
    assert "initialised weights from" in proc.stdout + proc.stderr
    common = ["--checkpoint", str(run), "--task", "captioning", "--data", str(data), "--split", "test",
              "--batch-size", "4"]
    single = evaluate([*common, "--output", str(tmp_path / "one.json")])
    assert "most frequent caption" in single.stdout and "cider_d" in single.stdout
    evaluate([*common, "--output", str(tmp_path / "two.json")], launcher=True)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    m = one["metrics"]
    assert m["num_images"] == 16 and m["num_samples"] == 16 and m["num_one_object_scenes"] > 0
    assert 0 <= m["facts_color_shape"] <= 1 and m["cider_d"] >= 0 and 0 <= m["bleu4"] <= 1
    assert set(one["baseline"]["metrics"]) == set(m) - {"num_samples"}
    preds = {n: json.loads((tmp_path / f"{n}_predictions.json").read_text()) for n in ("one", "two")}
    assert sorted(p["image_id"] for p in preds["one"]) == list(range(16))  # the shards' int ids, as COCO's
    assert all(set(p) == {"image_id", "caption"} and p["caption"] for p in preds["one"])
    by_id = {n: {p["image_id"]: p["caption"] for p in ps} for n, ps in preds.items()}
    assert by_id["one"] == by_id["two"]
