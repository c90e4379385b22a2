"""``python -m pipeline.predict`` on a tiny exported VLMoEModel (VQA classifier + ITC + LM heads): JSONL in and
out with ids kept and a corrupt image reported on its line, VQA answers equal to the argmax of the model's own
logits on the same inputs, top-k sorted, unit-norm embeddings, retrieval of an exact duplicate, clear errors
(exit 2) for bad lines and modes the heads cannot do, a fast ``--help`` and a run where deepspeed cannot be
imported."""
import dataclasses
import json
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.hf.configuration import VLMoEConfig
from pipeline.hf.export_files import preprocessor_config, write_json
from pipeline.hf.heads import head_spec
from pipeline.hf.modeling import VLMoEModel
from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.predict import main
from pipeline.tasks.downstream_common import image_tensor, tokenize
from pipeline.tasks.vqa import vqa_head
from tests.finetune_helpers import word_tokenizer
from tests.launcher import REPO, launcher_env

WORDS = ["what", "color", "is", "the", "circle", "red", "blue", "green", "a", "square"]
ANSWERS = ["red", "blue", "green", "yes", "no"]
SIZE, L, D = 16, 12, 32
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (200, 200, 30), (90, 10, 90)]


def export_tiny(folder, heads, label_maps, tokenizer_dir):
    """A random tiny model saved as pipeline.export would (weights, config, tokenizer, preprocessor)."""
    cfg = ModelConfig(hidden_size=D, num_layers=2, num_heads=2, image_size=SIZE, patch_size=8, vocab_size=32,
                      max_text_len=L, num_fusion_layers=1,
                      moe=MoEConfig(num_experts=2, every=2, min_capacity=1, use_rts=False, eval_capacity_factor=2.0))
    torch.manual_seed(0)
    config = VLMoEConfig(vlmoe=dataclasses.asdict(cfg), task="vqa", heads=heads, label_maps=label_maps, text_len=L,
                         image_size=SIZE)
    model = VLMoEModel(config)
    if "vqa" in model.heads:
        for layer in (model.heads["vqa"][0], model.heads["vqa"][-1]):  # distinct answers for distinct inputs
            torch.nn.init.normal_(layer.weight, std=3.0)
    model.save_pretrained(folder)
    word_tokenizer(tokenizer_dir, WORDS).save_pretrained(folder)
    recipe = types.SimpleNamespace(data=types.SimpleNamespace(image_size=SIZE, text_len=L), model=cfg)
    write_json(folder / "preprocessor_config.json", preprocessor_config(recipe))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    (root / "tok").mkdir()
    heads = {"vqa": head_spec("vqa", vqa_head(D, len(ANSWERS))), "itc": {"type": "itc", "proj_dim": 16,
             "max_logit_scale": 100.0}, "mlm": {"type": "mlm", "layer_norm_eps": 1e-6}}
    full = export_tiny(root / "full", heads, {"vqa": ANSWERS}, root / "tok")
    bare = export_tiny(root / "bare", {"itc": heads["itc"]}, {}, root / "tok")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, colour in enumerate(COLOURS):
        pixels = np.clip(np.array(colour)[None, None] + rng.integers(-40, 40, (24, 20, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(images / f"img{i}.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    return {"root": root, "full": full, "bare": bare, "images": images}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_vqa_answers_equal_the_models_argmax_and_a_corrupt_image_is_reported(setup, capsys):
    root, images = setup["root"], setup["images"]
    questions = ["what color is the circle", "what is the square", "red or blue", "the circle", "a color"]
    lines = [{"id": f"q{i}", "image": f"images/img{i}.png", "question": q} for i, q in enumerate(questions)]
    lines.insert(3, {"id": "broken", "image": "corrupt.jpg", "question": "what color"})
    (root / "vqa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = root / "vqa_out.jsonl"
    assert main(["--model", str(setup["full"]), "--input", str(root / "vqa.jsonl"), "--output", str(out),
                 "--batch-size", "4", "--top-k", "3", "--no-progress"]) == 0
    assert "1 of 6 inputs failed" in capsys.readouterr().err
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [x["id"] for x in lines]
    assert "corrupt.jpg" in rows[3]["error"] and "answer" not in rows[3]
    good = [r for r in rows if "error" not in r]

    model = VLMoEModel.from_pretrained(setup["full"]).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup["full"])
    pixels = torch.stack([image_tensor(Image.open(images / f"img{i}.png").convert("RGB"), SIZE) for i in range(5)])
    ids, mask = tokenize(tok, questions, L)
    with torch.no_grad():
        logits = model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits["vqa"]
    assert [r["answer"] for r in good] == [ANSWERS[i] for i in logits.argmax(1).tolist()]
    assert len({r["answer"] for r in good}) > 1  # the check can tell answers apart
    for row, row_logits in zip(good, logits):
        scores = [a["score"] for a in row["answers"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        want = row_logits.sigmoid().topk(3)
        assert [a["answer"] for a in row["answers"]] == [ANSWERS[i] for i in want.indices.tolist()]
        np.testing.assert_allclose(scores, want.values.numpy(), atol=1e-5)


def test_embeddings_are_unit_norm_and_retrieval_finds_the_duplicate_first(setup, capsys):
    root, images = setup["root"], setup["images"]
    (root / "embed.jsonl").write_text(json.dumps({"id": 7, "image": "images/img1.png", "text": "a red circle"}) + "\n")
    assert main(["--model", str(setup["full"]), "--mode", "embed", "--input", str(root / "embed.jsonl"),
                 "--output", str(root / "embed_out.jsonl"), "--no-progress"]) == 0
    (row,) = read_jsonl(root / "embed_out.jsonl")
    assert row["id"] == 7
    for key in ("image_embedding", "text_embedding"):
        assert len(row[key]) == 16 and np.linalg.norm(row[key]) == pytest.approx(1.0, abs=1e-5)
    query = root / "query.png"
    shutil.copy(images / "img2.png", query)
    capsys.readouterr()
    assert main(["--model", str(setup["bare"]), "--image", str(query), "--gallery", str(images), "--top-k", "3"]) == 0
    (result,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert result["matches"][0]["id"] == "img2.png" and result["matches"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(result["matches"]) == 3 and result["matches"][1]["score"] < 1 - 1e-4
    assert main(["--model", str(setup["bare"]), "--text", "a red circle", "--gallery", str(images)]) == 0
    assert len(json.loads(capsys.readouterr().out)["matches"]) == 5  # text -> images through the ITC head


def test_captions_and_generated_answers_with_the_lm_head(setup, capsys):
    image = setup["images"] / "img0.png"
    assert main(["--model", str(setup["full"]), "--mode", "caption", "--image", str(image), "--max-new-tokens", "3"]) \
        == 0
    assert isinstance(json.loads(capsys.readouterr().out)["caption"], str)
    assert main(["--model", str(setup["full"]), "--image", str(image), "--text", "what color", "--generate"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["answer"] in ANSWERS and isinstance(row["generated"], str)


def test_bad_input_exits_2_naming_the_file_and_line(setup, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "red"}\n\n{"id": 2, "text": \n')
    assert main(["--model", str(setup["full"]), "--mode", "embed", "--input", str(bad)]) == 2
    assert f"{bad}:3: not valid JSON" in capsys.readouterr().err
    bad.write_text('{"id": 1, "image": "nowhere.png", "text": "red"}\n')
    assert main(["--model", str(setup["full"]), "--input", str(bad)]) == 2
    assert f"{bad}:1: image file {tmp_path / 'nowhere.png'} not found" in capsys.readouterr().err
    assert main(["--model", str(setup["full"]), "--mode", "vqa", "--text", "what color"]) == 2
    assert "--mode vqa needs image and text, missing ['image']" in capsys.readouterr().err
    for mode, message in (("vqa", "no labelled 'vqa' head"), ("caption", "no LM head 'mlm'")):
        assert main(["--model", str(setup["bare"]), "--mode", mode, "--image", str(setup["images"] / "img0.png"),
                     "--text", "red"]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(setup["full"])])  # no input at all
    assert exc.value.code == 2
    no_pre = tmp_path / "no_pre"  # preprocessing has one source: no fallback on config.json's copy
    no_pre.mkdir()
    (no_pre / "config.json").write_text((setup["full"] / "config.json").read_text())
    assert main(["--model", str(no_pre), "--mode", "embed", "--text", "red"]) == 2
    assert "no preprocessor_config.json" in capsys.readouterr().err


def test_help_is_fast_and_predict_runs_where_deepspeed_cannot_be_imported(setup, tmp_path):
    seconds = []
    for _ in range(2):  # the faster of two: a busy host should not fail it
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline.predict", "--help"], cwd=REPO, env=launcher_env(),
                              capture_output=True, text=True, timeout=60)
        seconds.append(time.perf_counter() - started)
        assert proc.returncode == 0 and "--gallery" in proc.stdout and "questions.jsonl" in proc.stdout
    assert min(seconds) < 1.0, seconds
    code = ("import sys; sys.modules['deepspeed'] = None\n"
            "from pipeline.predict import main\n"
            f"rc = main(['--model', {str(setup['full'])!r}, '--image', {str(setup['images'] / 'img0.png')!r}, "
            f"'--text', 'what color', '--output', {str(tmp_path / 'out.jsonl')!r}])\n"
            "assert sys.modules.get('deepspeed') is None, 'deepspeed was imported'\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=launcher_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out.jsonl").read_text())["answer"] in ANSWERS
