"""vla_pretrain: image-text and audio-text pretraining in one run. Single process: samples of both kinds,
the losses and eval metrics of each media, the pass count, the pre-launch check of an audio source on a model
without audio. Through the real launcher: 2 CPU ranks, EP=2, ZeRO-2, both synth sources mixed 1:1 from an
image-text checkpoint (init_from adds audio): it finishes, with finite losses, and both kinds of steps ran."""
from __future__ import annotations

import json
import dataclasses
import math

import pytest
import torch
import webdataset as wds

from pipeline.data.loader import decode_sample, shard_urls
from pipeline.recipe import dump_recipe
from pipeline.run.eval_loop import pad_and_collate
from pipeline.run.preflight import check_run_inputs
from pipeline.tasks import Task
from tests.conftest import TINY_MODEL_SETS
from tests.test_init_modality import AUDIO_SETS, build, save_run, tiny_recipe
from tests.train_helpers import log_lines, run, train_cmd

B = 4
TEXT_LEN = 32


@pytest.fixture(scope="module")
def vla(synth_av):
    recipe = tiny_recipe("vla_pretrain", synth_av, ["init_from=null", *AUDIO_SETS])
    torch.manual_seed(0)
    return build(recipe, seed=0)


def prepared(task: Task, folder, split: str, train: bool, n: int = B) -> list[dict]:
    samples = []
    for sample in wds.WebDataset(shard_urls(str(folder), split), shardshuffle=False):
        samples.append(task.prepare_sample(decode_sample(sample, task.fields, task.optional_fields), train))
        if len(samples) == n:
            return samples
    raise AssertionError(f"{folder} {split}: fewer than {n} samples")


def test_prepare_sample_gives_each_kind_its_fixed_shapes(vla, synth_av):
    audio = vla.model.cfg.audio
    (clip,) = prepared(vla, synth_av.sounds, "train", True, 1)
    (image,) = prepared(vla, synth_av.captions, "train", True, 1)
    assert {k: tuple(v.shape) for k, v in clip.items()} == {
        "audio_values": (audio.max_frames, audio.num_mel_bins), "audio_lengths": (),
        "input_ids": (TEXT_LEN,), "attention_mask": (TEXT_LEN,)}
    assert 0 < int(clip["audio_lengths"]) <= audio.max_frames
    assert {k: tuple(v.shape) for k, v in image.items()} == {"pixel_values": (3, 64, 64), "input_ids": (TEXT_LEN,),
                                                             "attention_mask": (TEXT_LEN,)}
    # eval: a clip's first caption (its txt); training draws among its 5 captions
    raw = next(iter(wds.WebDataset(shard_urls(str(synth_av.sounds), "test"), shardshuffle=False)))
    sample = decode_sample(raw, vla.fields, vla.optional_fields)
    first = vla.tokenize(sample["json"]["captions"][0])["input_ids"]
    assert torch.equal(vla.prepare_sample(sample, train=False)["input_ids"], first)
    drawn = {tuple(vla.prepare_sample(sample, train=True)["input_ids"].tolist()) for _ in range(30)}
    assert len(drawn) > 1


@pytest.mark.parametrize("media", ["audio", "image"])
def test_forward_and_eval_of_each_media(vla, synth_av, media, monkeypatch):
    folder, split = (synth_av.sounds, "test") if media == "audio" else (synth_av.captions, "val")
    batch = vla.collate(prepared(vla, folder, split, True))
    out = vla(batch)
    names = ("atc", "atm", "audio_mlm") if media == "audio" else ("itc", "itm", "mlm")
    assert set(out.terms) == {n for name in names for n in (name, f"{name}_acc")}
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {name.split(".")[1] for name, p in vla.heads.named_parameters(prefix="heads") if p.grad is not None}
    assert grads == ({"atc", "atm", "mlm"} if media == "audio" else {"itc", "itm", "mlm"})
    other = "image" if media == "audio" else "audio"
    assert all(p.grad is None for p in vla.model.embeddings[other].parameters())  # unused this step
    vla.zero_grad(set_to_none=True)
    # eval: a batch padded with padding samples (both media's inputs) keeps the real samples' media
    eval_batch = pad_and_collate(vla, prepared(vla, folder, split, False, 3), B)
    metrics = vla.metrics(vla.eval_outputs(eval_batch))
    expected = ({"atc_loss", "a2t_r1", "t2a_r1", "atm_acc", "audio_mlm_acc", "audio_mlm_loss"} if media == "audio"
                else {"itc_loss", "i2t_r1", "t2i_r1", "itm_acc", "mlm_acc", "mlm_loss"})
    assert set(metrics) == expected and all(math.isfinite(v) for v in metrics.values())
    # matching off (the demo's pretraining): its untrained head is not evaluated, the rest is unchanged
    matching = "atm" if media == "audio" else "itm"
    monkeypatch.setattr(vla, "ctx", dataclasses.replace(vla.ctx, objectives={**vla.weights, matching: 0.0}))
    without = vla.metrics(vla.eval_outputs(eval_batch))
    assert set(without) == expected - {f"{matching}_acc"}
    short = media[0]  # the contrastive figures do not depend on the (random) MLM masks of each call
    assert all(without[key] == metrics[key] for key in (f"{short}2t_r1", f"t2{short}_r1"))


def test_passes_count_one_sample_of_each_media(vla):
    cls = type(vla)
    assert cls.passes(cls.resolve_objectives({}), None) == {
        "image": 1, "text": 2, "image+text": 4, "audio": 1, "audio+text": 4}
    assert cls.passes(cls.resolve_objectives({"atc": 1.0, "mlm": 1.0}), None) == {
        "audio": 1, "text": 1, "image+text": 1}


def test_an_audio_source_needs_audio_in_the_model(synth_av):
    sources = f"data.train=[{{path: {synth_av.captions}, split: train}}, {{path: {synth_av.sounds}, split: train}}]"
    with_audio = tiny_recipe("vla_pretrain", synth_av, ["init_from=null", sources, *AUDIO_SETS])
    assert check_run_inputs(with_audio) == []
    without = tiny_recipe("vla_pretrain", synth_av, ["init_from=null", sources, "model.modalities=[image, text]"])
    (problem,) = check_run_inputs(without)
    assert problem.startswith(f"data.train[1].path={synth_av.sounds}: holds 'audio_retrieval' data") and \
        "add 'audio'" in problem


STEPS = 20


def test_mixed_image_and_audio_sources_ep2_zero2_train_without_hanging(tmp_path, synth_av):
    """Every micro-batch is one source, the same on every rank: image steps and audio steps make different
    MoE calls; parameters a step leaves unused (the other media's embedding and FFNs/experts, its heads)
    have no gradient, which ZeRO-2 reduces as zeros (the same set on every rank)."""
    vl = tiny_recipe("vl_pretrain", synth_av, ["init_from=null"])
    save_run(build(vl, seed=1).state_dict(), dump_recipe(vl), tmp_path / "vl")
    sets = [f"init_from={tmp_path / 'vl'}",
            f"data.train=[{{path: {synth_av.captions}, split: train, weight: 1.0}}, "
            f"{{path: {synth_av.sounds}, split: train, weight: 1.0}}]",
            f"data.eval={{path: {synth_av.sounds}, split: test}}", f"data.tokenizer={synth_av.tokenizer}",
            "data.shuffle_buffer=16", "data.num_workers=1", *TINY_MODEL_SETS, *AUDIO_SETS,
            "batch.micro_batch_size=4", f"train.steps={STEPS}", "train.log_every=1", f"train.eval_every={STEPS}",
            "train.save_every=0", "train.peak_tflops=1.0", "schedule.warmup_steps=2"]
    out = tmp_path / "run"
    cmd = train_cmd(out, [a for s in sets for a in ("--set", s)], [], recipe="launch/recipes/vla_pretrain.yaml",
                    ds_config="ds_configs/zero2_fp32.json")
    log = tmp_path / "log.txt"
    assert run(cmd, log, timeout=240) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "modalities ['audio'] are new" in text  # init_from on the real engine (EP=2: local expert ids)
    lines = [line for line in log_lines(out) if "train/loss" in line]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert all(math.isfinite(line["train/loss"]) and math.isfinite(line["train/grad_norm"]) for line in lines)
    kinds = [("train/itc" in line, "train/atc" in line) for line in lines]  # one micro-batch per step
    assert all(image != audio for image, audio in kinds), kinds
    assert sum(image for image, _ in kinds) >= 3 and sum(audio for _, audio in kinds) >= 3, kinds
    assert any(key.startswith("moe/layer1/audio/") for line in lines for key in line)
    metrics = json.loads((out / "eval" / f"step_{STEPS:06d}.json").read_text())
    assert metrics["num_samples"] == 40 and math.isfinite(metrics["atc_loss"]) and "a2t_r1" in metrics
