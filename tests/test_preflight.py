"""pipeline.run.preflight: every unusable input of a run (data folder, split, shards, kind of data, vocabulary,
tokenizer, init_from) is found in seconds, before a launch, each problem naming the recipe field, the path
and what would be valid; the launch scripts, pipeline.train and pipeline.evaluate refuse such inputs with
exit 2 and that message."""
import json
import re
import shutil
import time

import pytest
import yaml

from pipeline.config_utils import ConfigError
from pipeline.run.preflight import check_run_inputs, eval_input_problems, require_no_problems
from pipeline.evaluate import main as evaluate_main
from pipeline.recipe import load_recipe, recipe_from_dict
from tests.conftest import TINY_MODEL_SETS
from tests.finetune_helpers import make_nlvr2_data
from tests.launcher import REPO, run_deepspeed
from tests.test_launch import TINY, script, sets
from tests.train_helpers import save_run_folder

TINY_MODEL = {"hidden_size": 64, "num_heads": 2, "num_layers": 2, "num_fusion_layers": 1, "vocab_size": 320,
              "moe": {"num_experts": 4, "ep_size": 2}}


def recipe(task, train, tokenizer, eval_source=None, **extra):
    """The shipped ``launch/recipes/<task>.yaml`` pointed at ``train`` (path or (path, split)), tiny model."""
    data = yaml.safe_load((REPO / "launch" / "recipes" / f"{task}.yaml").read_text())
    path, split = train if isinstance(train, tuple) else (train, "train")
    data["data"].update(extra.pop("data_extra", {}))
    data.update({"init_from": None, "model": TINY_MODEL, **extra})
    data["data"].update(train=[{"path": str(path), "split": split}], tokenizer=str(tokenizer),
                        eval=None if eval_source is None else {"path": str(eval_source[0]), "split": eval_source[1]})
    return recipe_from_dict(data)


def problems(task, train, tokenizer, eval_source=None, **extra):
    return check_run_inputs(recipe(task, train, tokenizer, eval_source, **extra))


def copy_folder(src, tmp_path, name="copy"):
    return shutil.copytree(src, tmp_path / name)


def edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_usable_inputs_have_no_problems(synth_data):
    assert problems("vqa", synth_data.vqa, synth_data.tokenizer, (synth_data.vqa, "val")) == []
    assert problems("vl_pretrain", synth_data.captions, synth_data.tokenizer, (synth_data.captions, "val")) == []
    assert problems("retrieval", synth_data.retrieval, synth_data.tokenizer, (synth_data.retrieval, "test")) == []


def test_missing_eval_split_names_the_splits_there_are(synth_data):
    found = problems("vqa", synth_data.vqa, synth_data.tokenizer, (synth_data.vqa, "test"))
    assert len(found) == 1
    assert "data.eval.split='test'" in found[0] and str(synth_data.vqa / "manifest.json") in found[0]
    assert "['train', 'val']" in found[0]


def test_empty_split_and_missing_shards(synth_data, tmp_path):
    folder = copy_folder(synth_data.vqa, tmp_path)
    edit_manifest(folder, lambda m: m["splits"]["val"].update(num_samples=0))
    (folder / "train-000000.tar").unlink()
    found = problems("vqa", folder, synth_data.tokenizer, (folder, "val"))
    assert len(found) == 2
    assert re.search(r"data\.train\[0\]\.split='train': 1 of 1 shard files missing .*train-000000\.tar", found[0])
    assert "data.eval.split='val'" in found[1] and "0 samples" in found[1] and "['train']" in found[1]


def test_folder_without_manifest_is_not_a_data_folder(synth_data, tmp_path):
    folder = copy_folder(synth_data.captions, tmp_path)
    (folder / "manifest.json").unlink()
    found = problems("vl_pretrain", folder, synth_data.tokenizer)
    assert found == [f"data.train[0].path={folder}: no manifest.json, so not a data_prep output folder (one "
                     "written by `python -m data_prep COMMAND --output DIR`)"]
    # the data_prep synth root: point at one of its sub-folders
    found = problems("vl_pretrain", synth_data.root, synth_data.tokenizer)
    assert "its sub-folders ['captions', 'retrieval', 'vqa'] are: use one of them" in found[0]


def test_wrong_kind_of_folder_names_the_task_and_fields(synth_data, tmp_path):
    nlvr2 = make_nlvr2_data(tmp_path / "nlvr2")
    found = problems("nlvr2", synth_data.vqa, synth_data.tokenizer)  # an NLVR2 recipe on a VQA folder
    assert any("holds 'vqa' data" in p and "task 'nlvr2' cannot read" in p and "['nlvr2']" in p for p in found)
    assert any("lack field(s) ['img0.jpg', 'img1.jpg']" in p for p in found), found
    found = problems("vqa", synth_data.retrieval, synth_data.tokenizer)  # same fields, other content
    assert any("holds 'retrieval' data" in p and "task 'vqa' cannot read" in p for p in found), found
    found = problems("vqa", synth_data.vqa, synth_data.tokenizer, (nlvr2, "train"))
    assert len(found) == 2 and all(p.startswith(f"data.eval.path={nlvr2}") for p in found)
    assert "lack field(s) ['jpg']" in found[1]


def test_vocabulary_comes_from_the_first_training_folder_and_must_be_non_empty(synth_data, tmp_path):
    folder = copy_folder(synth_data.vqa, tmp_path)
    (folder / "answers.json").write_text(json.dumps({"answers": [], "counts": []}))
    found = problems("vqa", folder, synth_data.tokenizer, (synth_data.vqa, "val"))
    assert found == [f"{folder / 'answers.json'}: 'answers' must be a non-empty list, got []; rerun data_prep "
                     "(e.g. a lower --min-answer-count) or point data.train[0] at another folder"]
    (folder / "answers.json").unlink()
    found = problems("vqa", folder, synth_data.tokenizer, (synth_data.vqa, "val"))
    assert len(found) == 1 and f"data.train[0].path={folder}: no answers.json" in found[0]


def test_tokenizer_must_exist_load_and_fit_the_vocabulary(synth_data, tmp_path):
    assert "not a folder" in problems("vqa", synth_data.vqa, tmp_path / "none")[0]
    (tmp_path / "empty").mkdir()
    assert "cannot be loaded by AutoTokenizer" in problems("vqa", synth_data.vqa, tmp_path / "empty")[0]
    small = {**TINY_MODEL, "vocab_size": 100}
    found = problems("vqa", synth_data.vqa, synth_data.tokenizer, model=small)
    assert len(found) == 1 and re.match(r"model.vocab_size=100 is smaller than the \d+ tokens", found[0])


def test_init_from_needs_a_complete_checkpoint(synth_data, tmp_path):
    run = tmp_path / "pretrained"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)  # interrupted: no COMPLETE marker
    (run / "resolved_recipe.yaml").write_text(yaml.safe_dump({"model": TINY_MODEL}))
    found = problems("vqa", synth_data.vqa, synth_data.tokenizer, init_from=str(run))
    assert len(found) == 1 and found[0].startswith(f"init_from={run}: ") and "no complete checkpoint" in found[0]


def test_url_specs_need_their_files(synth_data, tmp_path):
    good = f"{synth_data.captions}/train-{{000000..000000}}.tar"
    assert problems("vl_pretrain", (good, "train"), synth_data.tokenizer) == []
    found = problems("vl_pretrain", (f"{synth_data.captions}/train-{{000000..000002}}.tar", "train"),
                     synth_data.tokenizer)
    assert len(found) == 1 and "2 of 3 shard files do not exist" in found[0]
    found = problems("vl_pretrain", (tmp_path / "nowhere", "train"), synth_data.tokenizer)
    assert len(found) == 1 and "does not exist; give a data_prep output folder" in found[0]
    found = problems("vl_pretrain", ("pipe:cat a.tar", "train"), synth_data.tokenizer)
    assert len(found) == 1 and "scheme 'pipe'" in found[0] and "data.allow_pipe_urls=true" in found[0]
    remote = ("https://example.com/train-{0..1}.tar", "train")  # not checkable here: allowed, left to the run
    assert problems("vl_pretrain", remote, synth_data.tokenizer, data_extra={"allow_pipe_urls": True}) == []


def test_every_problem_in_one_error(synth_data, tmp_path):
    found = problems("vqa", tmp_path / "nowhere", tmp_path / "none", (synth_data.vqa, "test"))
    assert len(found) == 4  # train path, eval split, answers.json of the training folder, tokenizer
    with pytest.raises(ConfigError, match=r"recipe.yaml: 4 problem\(s\)") as info:
        require_no_problems(found, "recipe.yaml")
    assert all(p in str(info.value) for p in found)
    require_no_problems([], "recipe.yaml")


def test_evaluate_inputs_task_data_and_vocabulary(synth_data, tmp_path):
    run_recipe = recipe("vqa", synth_data.vqa, synth_data.tokenizer, (synth_data.vqa, "val"))
    assert eval_input_problems(run_recipe, "vqa", str(synth_data.vqa), "val") == []
    assert "trained for task 'vqa'; use --task vqa" in \
        eval_input_problems(run_recipe, "retrieval", str(synth_data.retrieval), "test")[0]
    found = eval_input_problems(run_recipe, "vqa", str(synth_data.retrieval), "test")
    assert len(found) == 1 and found[0].startswith(f"--data/--split.path={synth_data.retrieval}: holds 'retrieval'")


# ------------------------------------------------------------------------------ through the commands
@pytest.mark.parametrize("env,message", [
    ({"EVAL_SPLIT": "test"}, r"data\.eval\.split='test': not in .*its splits are \['train', 'val'\]"),
    ({"DATA_PART": "vqa"}, r"holds 'vqa' data \(manifest.json task\), which recipe task 'vl_pretrain' cannot"),
], ids=["missing_eval_split", "wrong_folder_kind"])
def test_launch_script_refuses_unusable_inputs_before_the_launcher(synth_data, tmp_path, env, message):
    data = synth_data.root / env.pop("DATA_PART", "captions")
    proc = script("pretrain.sh", ["launch/recipes/vl_pretrain.yaml", tmp_path / "run", *sets(TINY)],
                  {"DATA": str(data), "TOKENIZER": str(synth_data.tokenizer), **env}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(message, proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and " -> " not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_direct_launch_bad_inputs_one_message_exit_2(synth_data, tmp_path):
    """``deepspeed --module pipeline.train`` without the launch scripts: rank 0 checks the inputs at
    start-up, every rank exits 2, one message and no traceback (it used to train, then fail at eval)."""
    args = ["--recipe", "launch/recipes/vl_pretrain.yaml", "--ds-config", "ds_configs/zero2_fp32.json",
            "--output-dir", str(tmp_path / "run"),
            *sets([*TINY_MODEL_SETS, f"data.train=[{{path: {synth_data.captions}, split: train}}]",
                   f"data.eval={{path: {synth_data.captions}, split: test}}", f"data.tokenizer={synth_data.tokenizer}",
                   "train.steps=1", "train.peak_tflops=1.0", "batch.micro_batch_size=8", "data.num_workers=0"])]
    proc = run_deepspeed("pipeline.train", args, check=False, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-4000:]
    assert output.count("pipeline.train: configuration error") == 1 and "data.eval.split='test'" in output
    assert "Traceback" not in output and not (tmp_path / "run" / "checkpoints").exists()


def test_evaluate_vqa_checkpoint_on_nlvr2_folder_exits_2_in_seconds(synth_data, tmp_path, capsys):
    """A VQA run folder as pipeline.train leaves it, evaluated on an NLVR2 folder: a clear error before any
    model is built (it used to skip every sample, then die with KeyError: 'question_id'). The refusal reads
    only the run's resolved recipe, so the folder is saved in this process (``save_run_folder``) and
    ``pipeline.evaluate``'s ``main`` runs here: a traceback would fail the test as an exception."""
    sets = ["init_from=null", f"data.train=[{{path: {synth_data.vqa}, split: train}}]", "data.eval=null",
            f"data.tokenizer={synth_data.tokenizer}", *TINY_MODEL_SETS, "model.moe.ep_size=1"]
    save_run_folder(load_recipe(REPO / "launch/recipes/vqa.yaml", sets), tmp_path / "run")
    nlvr2 = make_nlvr2_data(tmp_path / "nlvr2")
    for task, data_dir, message in [("vqa", nlvr2, r"lack field\(s\) \['jpg'\] that task 'vqa' reads"),
                                    ("retrieval", synth_data.retrieval, "trained for task 'vqa'; use --task vqa")]:
        started = time.perf_counter()
        rc = evaluate_main(["--checkpoint", str(tmp_path / "run"), "--task", task, "--data", str(data_dir),
                            "--split", "train"])
        err = capsys.readouterr().err
        assert rc == 2 and re.search(message, err), err[-3000:]
        assert "Traceback" not in err and not (tmp_path / "run" / "eval").exists()
        print(f"evaluate --task {task}: refused in {time.perf_counter() - started:.1f} s")


# ------------------------------------------------------------------------------ audio clips
TINY_AUDIO_MODEL = {**TINY_MODEL, "modalities": ["text", "audio"]}


def audio_recipe(sounds, tokenizer, task="audio_retrieval", audio=None, **extra):
    model = {**TINY_AUDIO_MODEL, "audio": audio or {}}
    return recipe(task, sounds, tokenizer, (sounds, "test"), model=model, **extra)


def resampled_copy(sounds, tmp_path, rate):
    """A copy of the sound world whose manifest says its clips were written with --sample-rate ``rate``."""
    folder = copy_folder(sounds, tmp_path, f"sounds_{rate}")
    edit_manifest(folder, lambda m: m["options"].update(sample_rate=rate))
    return folder


def test_clips_at_another_rate_than_the_model_are_a_problem_before_launch(synth_av, tmp_path):
    assert check_run_inputs(audio_recipe(synth_av.sounds, synth_av.tokenizer)) == []
    folder = resampled_copy(synth_av.sounds, tmp_path, 22050)
    found = check_run_inputs(audio_recipe(folder, synth_av.tokenizer))
    assert len(found) == 2 and found[0].startswith(f"data.train[0].path={folder}: its clips are 22050 Hz")
    assert found[1].startswith(f"data.eval.path={folder}: its clips are 22050 Hz")
    assert "model.audio.sample_rate is 16000" in found[0] and "audio_rate_22050_not_16000" in found[0]
    assert "--sample-rate 16000" in found[0] and "model.audio.sample_rate=22050" in found[0]
    # the other way round: 16 kHz shards, a model at 22.05 kHz
    found = check_run_inputs(audio_recipe(synth_av.sounds, synth_av.tokenizer, audio={"sample_rate": 22050}))
    assert len(found) == 2 and "its clips are 16000 Hz" in found[0] and "--sample-rate 22050" in found[0]
    # evaluate --data on a run's recipe
    run_recipe = audio_recipe(synth_av.sounds, synth_av.tokenizer)
    (problem,) = eval_input_problems(run_recipe, "audio_retrieval", str(folder), "test")
    assert problem.startswith(f"--data.path={folder}: its clips are 22050 Hz") and "model.audio.sample_rate=" not in \
        problem and problem.endswith("--sample-rate 16000 into another --output folder (the rate the run's model was "
                                     "trained at)")


def test_clips_longer_than_max_frames_are_a_warning_not_a_problem(synth_av, tmp_path, caplog):
    from pipeline.run.preflight import input_warnings

    assert input_warnings(audio_recipe(synth_av.sounds, synth_av.tokenizer)) == []  # 2-4 s clips, 400 frames
    short = audio_recipe(synth_av.sounds, synth_av.tokenizer, audio={"max_frames": 150})  # 1.5 s
    with caplog.at_level("WARNING", logger="pipeline.run.preflight"):
        assert check_run_inputs(short) == []
    warnings = input_warnings(short)
    assert [w.split(":")[0] for w in warnings] == [f"data.train[0].path={synth_av.sounds}",
                                                    f"data.eval.path={synth_av.sounds}"]
    assert [r.getMessage() for r in caplog.records] == warnings
    match = re.search(r"(\d+) of the first (\d+) clips of split 'train' \(train-000000\.tar\) are longer than the "
                      r"1\.51 s that model\.audio\.max_frames=150 covers \(longest (\S+) s\): the model sees only "
                      r"their start, (\d+)% of the audio is never used; model\.audio\.max_frames=(\d+) covers them "
                      r"all: set it", warnings[0])
    assert match, warnings[0]
    longer, sampled, longest, _, needed = match.groups()
    assert int(longer) == int(sampled) and 2.0 <= float(longest) <= 4.0  # every synth clip is >= 2 s
    assert abs(0.025 + (int(needed) - 1) * 0.010 - float(longest)) < 0.011  # 25 ms windows, 10 ms hop
    with_init = audio_recipe(synth_av.sounds, synth_av.tokenizer, audio={"max_frames": 150})
    with_init.init_from = "runs/x"  # the advice only (no check of init_from here)
    assert "it must stay the init_from run's" in input_warnings(with_init)[0]
    # data_prep already cut every clip to what the model covers: nothing read, nothing said
    folder = copy_folder(synth_av.sounds, tmp_path, "capped")
    edit_manifest(folder, lambda m: m["options"].update(max_seconds=1.5))
    assert input_warnings(audio_recipe(folder, synth_av.tokenizer, audio={"max_frames": 150})) == []


def test_plan_refuses_an_audio_task_on_a_model_without_audio(capsys):
    """It used to die in the parameter count with a ValueError traceback ('unknown pass kind(s)')."""
    from pipeline.plan import main

    argv = ["--recipe", "launch/recipes/audio_retrieval.yaml", "--ds-config", "ds_configs/zero2_fp32.json",
            "--world-size", "2", "--skip-input-checks", "--set", "init_from=null"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "task 'audio_retrieval' runs ['audio', 'audio+text', 'text'] passes, which need modalities ['audio'] " \
           "missing from model.modalities ['image', 'text']" in err and "Traceback" not in err
    assert main([*argv, "--set", "model.modalities=[text, audio]"]) == 0


def test_launch_script_refuses_clips_at_another_rate_before_the_launcher(synth_av, tmp_path):
    folder = resampled_copy(synth_av.sounds, tmp_path, 22050)
    args = ["launch/recipes/audio_retrieval.yaml", tmp_path / "run", *sets(TINY),
            *sets(["init_from=null", "model.modalities=[text, audio]"])]
    proc = script("pretrain.sh", args, {"DATA": str(folder), "EVAL_SPLIT": "test",
                                        "TOKENIZER": str(synth_av.tokenizer)}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "its clips are 22050 Hz" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
