"""Audio tasks (``audio_retrieval``, ``audio_classification``) against the Task contract with a tiny real
text+audio VLMoE: sample shapes and padding, bad clips skipped, ATC/ATM losses, Clotho metrics and predictions,
the eval loop over a shard with broken clips; then the user path: 2 CPU ranks fine-tune ``audio_retrieval`` on
the synth sound world through the real launcher and ``pipeline.evaluate`` scores the test split."""
import io
import json
import tarfile
import types

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from pipeline.config_utils import ConfigError
from pipeline.data.loader import build_eval_loader
from pipeline.model import ModelConfig, MoEConfig, VLMoE
from pipeline.model.config import AudioConfig
from pipeline.recipe import SourceConfig
from pipeline.run.distributed import single_process
from pipeline.run.eval_loop import run_eval
from pipeline.tasks import SkipSample, TaskContext, get_task_class
from tests.finetune_helpers import FAST_TRAIN, evaluate, train, word_tokenizer
from tests.launcher import REPO

WORDS = ["a", "low", "high", "beep", "buzz", "noise", "then", "short", "long", "tone", "dog", "bark", "rain"]
L, RATE, FRAMES, BANDS = 8, 16000, 64, 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"), WORDS)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, vocab_size=32, max_text_len=L, num_fusion_layers=1,
                      modalities=["text", "audio"], audio=AudioConfig(num_mel_bins=BANDS, max_frames=FRAMES),
                      moe=MoEConfig(num_experts=2, every=2, min_capacity=1, use_rts=False))
    return VLMoE(cfg)


def make_task(name, model, tokenizer, data_dir=None, options=None):
    cls = get_task_class(name)
    ctx = TaskContext(model_cfg=model.cfg, tokenizer=tokenizer, text_len=L, image_size=16, data_dir=data_dir,
                      objectives=cls.resolve_objectives({}), options=cls.parse_options(options or {}))
    return cls(ctx, model)


def clip(seconds, hz=440.0, rate=RATE):
    """A decoded clip as the loader gives it: (float32 waveform, rate)."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate


def test_retrieval_samples_padding_and_bad_clips(model, tokenizer):
    task = make_task("audio_retrieval", model, tokenizer)
    raw = {"flac": clip(0.3), "txt": "a low beep", "json": {"audio_id": "rain.wav", "captions": [
        "a low beep", "a high beep", "a buzz", "a short tone", "a long tone", "a dog bark"]}}
    s = task.prepare_sample(raw, train=True)
    assert set(s) == {"audio_values", "audio_lengths", "input_ids", "attention_mask"}
    assert s["audio_values"].shape == (FRAMES, BANDS) and s["input_ids"].shape == (L,)
    assert 0 < int(s["audio_lengths"]) < FRAMES  # 0.3 s is under 64 frames of 10 ms: padded, lengths says so
    ev = task.prepare_sample(raw, train=False)
    assert ev["input_ids"].shape == (5, L) and ev["caption_valid"].all()  # the 6th caption is dropped
    assert tokenizer.convert_ids_to_tokens(ev["input_ids"][4, :5].tolist()) == [  # words, not [UNK]
        "[CLS]", "a", "long", "tone", "[SEP]"]
    assert ev["audio_id"] == "rain.wav" and ev["caption_ids"] == [f"rain.wav#{k}" for k in range(5)]
    pad = task.padding_sample()
    assert set(pad) == set(ev) and not pad["caption_valid"].any() and int(pad["audio_lengths"]) >= 1
    for key, value in ev.items():
        if isinstance(value, torch.Tensor):
            assert value.shape == pad[key].shape and value.dtype == pad[key].dtype, key
    audiocaps = {"flac": clip(1.5), "json": {"audio_id": "Yabc.flac", "captions": ["a buzz", "a tone"],
                                             "audiocap_ids": ["91", "92"]}}
    ev2 = task.prepare_sample(audiocaps, train=False)
    assert ev2["caption_ids"] == ["91", "92", "", "", ""] and int(ev2["audio_lengths"]) == FRAMES
    assert ev2["caption_valid"].tolist() == [True, True, False, False, False]
    for bad, reason in ((clip(0.0), "audio_shorter_than_one_frame"), (clip(1.0, rate=8000), "audio_rate_8000"),
                        (None, "audio_not_decoded")):
        with pytest.raises(SkipSample, match=reason):
            task.prepare_sample({**raw, "flac": bad}, train=False)


def test_retrieval_losses_metrics_predictions_and_rerank(model, tokenizer):
    task = make_task("audio_retrieval", model, tokenizer, options={"atm_rerank": 2})
    assert type(task).passes(task.weights, task.options) == {"audio": 1, "text": 1, "audio+text": 3}
    raws = [{"flac": clip(0.5, hz), "txt": f"a {w} tone", "json": {"audio_id": f"c{i}", "captions": [
        f"a {w} tone", f"{w} tone", f"a {w} beep"]}} for i, (hz, w) in enumerate([(200, "low"), (900, "high")])]
    out = task(task.collate([task.prepare_sample(r, train=True) for r in raws]))
    out.loss.backward()
    assert {"atc", "atc_acc", "atm", "atm_acc"} <= set(out.terms)
    assert task.heads["atc"].image_proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "audio" in n)
    evs = [task.prepare_sample(r, train=False) for r in raws]
    ev = task.eval_outputs(task.collate(evs + [task.padding_sample()]))
    ev = {k: v[:2] for k, v in ev.items()}  # the loop drops the padding row
    m = task.metrics(ev)
    ranking = {f"{d}_r{k}" for d in ("a2t", "t2a") for k in (1, 5, 10)} | {"r_mean", "t2a_map10"}
    assert set(m) == ranking | {"num_clips", "num_captions"}
    assert m["num_clips"] == 2 and m["num_captions"] == 6 and 0.5 <= m["t2a_map10"] <= 1  # 2 clips: rank <= 2
    name, chance = task.baseline(ev, REPO)
    assert name == "chance" and set(chance) == ranking and chance["t2a_map10"] == pytest.approx(0.75)
    pred = task.predictions(ev)
    assert set(pred) == {"audio_to_text", "text_to_audio"} and len(pred["text_to_audio"]) == 6
    assert pred["text_to_audio"][0]["caption_id"] == "c0#0" and sorted(pred["text_to_audio"][0]["audio_ids"]) == [
        "c0", "c1"]
    assert sorted(pred["audio_to_text"][1]["caption_ids"]) == sorted(f"c{i}#{k}" for i in range(2) for k in range(3))
    rerank = task.extra_metrics(ev, batch_size=4)
    assert set(rerank) == {f"atm_{k}" for k in ranking}


def test_classification_on_the_audio_pooled_output(tmp_path, model, tokenizer):
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["dog", "rain", "sea", "wind", "car", "bird"]}))
    task = make_task("audio_classification", model, tokenizer, tmp_path)
    assert type(task).passes(task.weights, task.options) == {"audio": 1}
    raws = [{"flac": clip(0.4, 300), "cls": 0, "json": {"label": 0, "label_name": "rain", "filename": "1-7-A-1.wav"},
             "__key__": "1-a"},
            {"flac": clip(1.2, 700), "cls": 3, "json": {"label": 3, "label_name": "bird"}, "__key__": "2-b"}]
    samples = [task.prepare_sample(r, train=True) for r in raws]
    assert [int(s["label"]) for s in samples] == [1, 5]  # by label_name in the training classes
    assert [s["key"] for s in samples] == ["1-7-A-1.wav", "2-b"]  # predictions name ESC-50's file, else the key
    pad = task.padding_sample()
    assert set(pad) == set(samples[0]) and pad["audio_values"].shape == samples[0]["audio_values"].shape
    batch = task.collate(samples + [pad])
    out = task(batch)
    out.loss.backward()
    assert task.heads["classifier"][1].weight.shape == (6, 32) and task.heads["classifier"][1].weight.grad is not None
    ev = task.eval_outputs(batch)
    assert ev["logits"].shape == (3, 6)
    assert set(task.metrics({k: v[:2] for k, v in ev.items()})) == {"top1", "top5"}
    with pytest.raises(SkipSample, match="audio_rate"):
        task.prepare_sample({**raws[0], "flac": clip(1.0, rate=22050)}, train=False)


def test_audio_tasks_need_audio_in_the_model(tokenizer, tmp_path):
    image_text = VLMoE(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, vocab_size=32, max_text_len=L,
                                   num_fusion_layers=0, image_size=16, moe=MoEConfig(every=0)))
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a", "b"]}))
    for name in ("audio_retrieval", "audio_classification"):
        with pytest.raises(ConfigError, match=r"model.modalities=\['image', 'text'\] lacks \['audio'\]"):
            make_task(name, image_text, tokenizer, tmp_path)


def flac_bytes(waveform, rate):
    buf = io.BytesIO()
    sf.write(buf, waveform, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def write_sound_folder(folder, clips):
    """A data_prep-like audio_retrieval folder (manifest + one shard) holding ``clips``: [(key, flac bytes)]."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / "test-000000.tar", "w") as tar:
        for key, data in clips:
            meta = json.dumps({"audio_id": key, "captions": ["a low tone", "a high beep"]}).encode()
            for ext, payload in (("flac", data), ("txt", b"a low tone"), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    manifest = {"format_version": 1, "task": "audio_retrieval", "fields": ["flac", "txt", "json"],
                "splits": {"test": {"shards": ["test-000000.tar"], "num_samples": len(clips)}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_eval_loop_counts_and_skips_broken_clips(tmp_path, model, tokenizer):
    good = [(f"clip{i}", flac_bytes(*clip(0.5, 200 + 150 * i))) for i in range(5)]
    broken = [("empty", b""), ("tiny", flac_bytes(np.zeros(10, np.float32), RATE)),
              ("slow", flac_bytes(*clip(1.0, rate=8000)))]
    write_sound_folder(tmp_path / "sounds", good[:2] + broken + good[2:])
    task = make_task("audio_retrieval", model, tokenizer)
    source = SourceConfig(path=str(tmp_path / "sounds"), split="test")
    data_cfg = types.SimpleNamespace(allow_pipe_urls=False, verify_checksums=False, num_workers=0)
    loader = build_eval_loader(source, data_cfg, task, 4, 0, 1)
    metrics, outputs = run_eval(task, task, loader, single_process(), 4)
    assert metrics["num_clips"] == 5 and metrics["num_captions"] == 10 and 0 <= metrics["t2a_map10"] <= 1
    assert outputs["audio_id"] == [f"clip{i}" for i in range(5)]
    skipped = metrics.incomplete["skipped_samples"]
    assert metrics["num_missing_samples"] == 3 and sum(s["count"] for s in skipped.values()) == 3
    assert skipped["audio_shorter_than_one_frame"]["count"] == 1 and skipped["audio_rate_8000_not_16000"]["count"] == 1


@pytest.mark.slow
def test_finetune_audio_retrieval_then_evaluate(tmp_path, synth_av):
    """From scratch (text + audio model, EP=2) on the synth sound world, 3 steps; then the Clotho metrics."""
    recipe = yaml.safe_load((REPO / "launch" / "recipes" / "audio_retrieval.yaml").read_text())
    recipe.update(init_from=None, model={
        "hidden_size": 64, "num_heads": 2, "num_layers": 2, "num_fusion_layers": 1, "vocab_size": 320,
        "max_text_len": 16, "modalities": ["text", "audio"], "audio": {"num_mel_bins": BANDS, "max_frames": 128},
        "moe": {"num_experts": 2, "ep_size": 2, "min_capacity": 1, "eval_capacity_factor": 2.0}})
    sounds = str(synth_av.sounds)
    recipe["data"].update(train=[{"path": sounds, "split": "train"}], eval=None, tokenizer=str(synth_av.tokenizer),
                          text_len=16, num_workers=0, shuffle_buffer=50)
    recipe.update(batch={"micro_batch_size": 8}, train={**FAST_TRAIN, "steps": 3})
    run = tmp_path / "run"
    train(tmp_path / "audio_retrieval.yaml", recipe, run)
    out = tmp_path / "sounds_test.json"
    proc = evaluate(["--checkpoint", str(run), "--task", "audio_retrieval", "--data", sounds, "--split", "test",
                     "--output", str(out), "--batch-size", "8", "--no-progress"])
    assert "chance" in proc.stdout and "t2a_map10" in proc.stdout
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert m["num_clips"] == 40 and m["num_captions"] == 200 and m["num_samples"] == 40
    for key in ("a2t_r1", "a2t_r5", "a2t_r10", "t2a_r1", "t2a_r5", "t2a_r10", "r_mean", "t2a_map10"):
        assert 0 <= m[key] <= 1 and key in result["baseline"]["metrics"], key
    assert result["baseline"]["metrics"]["t2a_r5"] == pytest.approx(5 / 40)
    pred = json.loads(out.with_name("sounds_test_predictions.json").read_text())
    assert sorted(p["audio_id"] for p in pred["audio_to_text"]) == sorted(str(i) for i in range(40))
    assert len(pred["text_to_audio"]) == 200 and all(len(p["audio_ids"]) == 10 for p in pred["text_to_audio"])


def test_evaluate_itm_rerank_shorthand_names_each_task_s_own_option():
    from pipeline.evaluate import build_parser, task_overrides

    def sets(task):
        return task_overrides(build_parser().parse_args(["--checkpoint", "r", "--task", task, "--data", "d",
                                                         "--itm-rerank", "8", "--set", "task_options.x=1"]))
    assert sets("audio_retrieval") == ["task_options.x=1", "task_options.atm_rerank=8"]
    assert sets("retrieval") == ["task_options.x=1", "task_options.itm_rerank=8"]
