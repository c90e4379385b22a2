"""``python -m pipeline.explain`` on a tiny exported model: every patch and token of the routing picture has
the colour of the expert the router chose for it (recomputed here from the gate weights on the FFN inputs),
tokens over capacity are drawn as dropped and only as many as capacity forces, the picture has one panel per
MoE layer of the patch grid, the data statistics add up to the token counts, and ``--help`` is fast."""
import dataclasses
import io
import json
import math
import random
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from data_prep.synth_world import Obj, make_scene
from pipeline import explain
from pipeline import routing_pictures as rp
from pipeline.model.config import ModelConfig, MoEConfig
from tests.launcher import REPO

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "color", "is", "the", "red", "circle", "?", "in",
         "top", "left", "how", "many", "##s", "are", "there"]
IMAGE, PATCH, TEXT_LEN, EXPERTS = 32, 8, 16, 4
GRID = IMAGE // PATCH
QUESTION = "what color is the circle in the top left?"


def save_model(folder, top_k: int = 1):
    """A saved VLMoEModel (4 blocks: block 1 MoE with image / text FFNs, block 3 MoE with the VL-FFN) and a
    word-piece tokenizer; routers scaled up so the experts differ from token to token."""
    from transformers import BertTokenizer

    from pipeline.hf.configuration import VLMoEConfig
    from pipeline.hf.modeling import VLMoEModel

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_heads=2, num_layers=4, num_fusion_layers=2, vocab_size=len(WORDS),
                      image_size=IMAGE, patch_size=PATCH, max_text_len=16,
                      moe=MoEConfig(num_experts=EXPERTS, min_capacity=1, eval_capacity_factor=4.0, top_k=top_k))
    model = VLMoEModel(VLMoEConfig(vlmoe=dataclasses.asdict(cfg), task="vqa", heads={}, label_maps={},
                                   text_len=TEXT_LEN, image_size=IMAGE))
    with torch.no_grad():
        for ffn in model.model.sparse_ffns().values():
            ffn.router.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_size": IMAGE, "text_len": TEXT_LEN}))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("explain") / "model")


def scene_image(seed: int) -> tuple[Image.Image, list[dict]]:
    """A shapes-world scene: a large red circle top left and a small square bottom right, with its json."""
    rng = random.Random(seed)
    scene = make_scene(rng, [Obj("circle", "red", "large", "top left"), Obj("square", "blue", "small", "bottom right")],
                       IMAGE)
    return scene.render(), scene.describe()


def expected_routes(explainer: explain.Explainer, image: Image.Image, text: str) -> dict[str, list[int]]:
    """Per MoE call "layer{i}/{key}": the argmax of the router's logits on the FFN's input for every real
    token (a pre-hook on the FFN, not the gate), in call order; padding left out."""
    inputs: dict[str, torch.Tensor] = {}
    ffns, handles = {}, []
    for name, ffn in explainer.model.model.sparse_ffns().items():
        _, layer, _, key = name.split(".")  # blocks.<i>.ffn.<key>
        ffns[f"layer{layer}/{key}"] = ffn
        handles.append(ffn.register_forward_pre_hook(
            lambda module, args, name=f"layer{layer}/{key}": inputs.__setitem__(name, args[0])))
    try:
        calls, _, info = explainer.route(image, text)
    finally:
        for handle in handles:
            handle.remove()
    real_text = len(info["tokens"])
    routes = {}
    for name, x_sd in inputs.items():
        ffn_key = name.split("/")[1]
        chosen = F.linear(x_sd.float(), ffns[name].router.weight.float()).argmax(1).tolist()
        if ffn_key == "image":
            routes[name] = chosen
        elif ffn_key == "text":
            routes[name] = chosen[:real_text]
        else:  # vl: image tokens, then the text (padded)
            routes[name] = chosen[:1 + GRID * GRID + real_text]
    return routes


def picture_colours(picture: Image.Image, layout: dict, column: int) -> list[tuple[int, int, int]]:
    """Colours of one column's tokens as drawn: image CLS box, patch centres (row-major), text boxes."""
    x, y, cell = layout["columns"][column]["panel"]
    boxes = layout["columns"][column]["boxes"]
    patches = [picture.getpixel((x + c * cell + cell // 2, y + r * cell + cell // 2))
               for r in range(GRID) for c in range(GRID)]
    return [picture.getpixel((boxes[0][0] + 2, boxes[0][1] + 2))] + patches + \
        [picture.getpixel((bx + 2, by + 2)) for bx, by, _, _ in boxes[1:]]


def drawn_routes(picture: Image.Image, layout: dict) -> dict[str, list]:
    """Per MoE call, what the picture shows for each of its tokens: an expert id (by palette colour) or
    "dropped"; block 1 splits into its image FFN (CLS + patches) and text FFN."""
    lookup = {rp.PALETTE[e]: e for e in range(EXPERTS)} | {rp.DROPPED_RGB: "dropped"}
    shown = {}
    for column, (layer, keys) in enumerate([(1, ("image", "text")), (3, ("vl",))]):
        colours = picture_colours(picture, layout, column)
        unknown = [c for c in colours if c not in lookup]
        assert not unknown, f"layer {layer}: colours outside the palette {unknown[:3]}"
        experts = [lookup[c] for c in colours]
        if keys == ("vl",):
            shown["layer3/vl"] = experts
        else:
            shown["layer1/image"], shown["layer1/text"] = experts[:1 + GRID * GRID], experts[1 + GRID * GRID:]
    return shown


@pytest.mark.parametrize("top_k", [1, 2])
def test_patch_and_token_colours_are_the_chosen_experts(model_dir, tmp_path, top_k):
    """Top-2: the first choice is drawn (padding is routed too, and must not show)."""
    explainer = explain.Explainer.load(model_dir if top_k == 1 else save_model(tmp_path / "top2", top_k=2))
    assert explainer.model.model.cfg.moe.top_k == top_k
    image, _ = scene_image(1)
    expected = expected_routes(explainer, image, QUESTION)
    image.save(tmp_path / "scene.png")
    (written,) = explain.explain_images(explainer, [tmp_path / "scene.png"], QUESTION, tmp_path / "out")
    assert written.name == "routing_scene.png"
    meta = json.loads((tmp_path / "out" / "routing_scene.json").read_text())
    with Image.open(written) as picture:
        picture = picture.convert("RGB")
        col_w = max(GRID * rp.CELL, 240)
        assert picture.width == rp.MARGIN + 2 * (col_w + rp.MARGIN)  # one column per MoE layer
        assert [c["layer"] for c in meta["layout"]["columns"]] == [1, 3] and meta["layout"]["cell"] == rp.CELL
        for x, y, cell in (c["panel"] for c in meta["layout"]["columns"]):
            assert y + GRID * cell <= picture.height
        shown = drawn_routes(picture, meta["layout"])
    assert len(meta["tokens"]) == 12 and len(shown["layer1/text"]) == 12  # [CLS] 10 words [SEP], 4 padding
    assert shown == expected  # capacity factor 4 = experts: nothing dropped
    assert len({e for routes in expected.values() for e in routes}) > 1  # a picture of one colour proves little
    assert meta["routes"]["layer1/image"]["image_patches"] == [
        expected["layer1/image"][1 + r * GRID:1 + (r + 1) * GRID] for r in range(GRID)]


def test_tokens_over_capacity_are_drawn_as_dropped(model_dir, tmp_path):
    factor = 0.5
    explainer = explain.Explainer.load(model_dir, eval_capacity_factor=factor)
    image, _ = scene_image(2)
    expected = expected_routes(explainer, image, QUESTION)
    image.save(tmp_path / "scene.png")
    (written,) = explain.explain_images(explainer, [tmp_path / "scene.png"], QUESTION, tmp_path)
    meta = json.loads((tmp_path / "routing_scene.json").read_text())
    with Image.open(written) as picture:
        shown = drawn_routes(picture.convert("RGB"), meta["layout"])
    tokens_in_call = {"layer1/image": 1 + GRID * GRID, "layer1/text": TEXT_LEN, "layer3/vl": 1 + GRID * GRID + TEXT_LEN}
    total_dropped = 0
    for name, wanted in expected.items():
        capacity = max(math.ceil(tokens_in_call[name] / EXPERTS * factor), 1)
        for expert in range(EXPERTS):
            mine = [drawn for drawn, want in zip(shown[name], wanted) if want == expert]
            assert set(mine) <= {expert, "dropped"}, (name, expert, mine)  # never another expert's colour
            assert mine.count("dropped") == max(0, len(mine) - capacity), (name, expert, mine)
            total_dropped += mine.count("dropped")
    assert total_dropped > 0


def write_shard(folder, count: int) -> None:
    """A data_prep-like folder: manifest.json and one val shard of synth scenes with a question and scene."""
    folder.mkdir()
    with wds.TarWriter(str(folder / "val-000000.tar")) as sink:
        for i in range(count):
            image, scene = scene_image(10 + i)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=95)
            sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": "how many red circles are there?",
                        "json": json.dumps({"question": "how many red circles are there?", "scene": scene}).encode()})
    (folder / "manifest.json").write_text(json.dumps({"splits": {"val": {"shards": ["val-000000.tar"],
                                                                          "num_samples": count}}}))


def test_data_statistics_add_up(model_dir, tmp_path):
    write_shard(tmp_path / "data", 4)
    assert explain.main(["--model", str(model_dir), "--data", str(tmp_path / "data"), "--split", "val",
                         "--limit", "3", "--output", str(tmp_path / "out")]) == 0
    stats = json.loads((tmp_path / "out" / "routing_stats.json").read_text())
    assert stats["samples"] == 3 and stats["num_experts"] == EXPERTS
    text_tokens = 10  # [CLS] how many red circle ##s are there ? [SEP]
    per_call = {"layer1/image": 1 + GRID * GRID, "layer1/text": text_tokens, "layer3/vl": 1 + GRID * GRID + text_tokens}
    assert {name: entry["tokens"] for name, entry in stats["calls"].items()} == {
        name: 3 * n for name, n in per_call.items()}
    for entry in stats["calls"].values():
        assert sum(entry["load"]) + entry["dropped"] == entry["tokens"]
        cells = [cell for kinds in entry["kinds"].values() for cell in kinds.values()]
        assert sum(c["tokens"] for c in cells) == entry["tokens"]
        assert all(sum(c["experts"]) + c["dropped"] == c["tokens"] for c in cells)
    vl = stats["calls"]["layer3/vl"]["kinds"]
    # the circle fills the top-left quadrant (4 patches), the small square touches the 4 of the bottom right
    assert vl["image"]["object patches"]["tokens"] == 3 * 8 and vl["image"]["background patches"]["tokens"] == 3 * 8
    assert vl["text"]["colour words"]["tokens"] == 3 and vl["text"]["shape words"]["tokens"] == 3 * 2  # circle ##s
    assert vl["text"]["special tokens"]["tokens"] == 3 * 2
    with Image.open(tmp_path / "out" / "routing_stats.png") as picture:
        assert picture.width > 300 and picture.height > 300


def test_folder_of_images_with_one_text(model_dir, tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(3):
        scene_image(20 + i)[0].save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    assert explain.main(["--model", str(model_dir), "--data", str(tmp_path / "images"), "--text", "red circles",
                         "--limit", "2", "--output", str(tmp_path / "out")]) == 0
    stats = json.loads((tmp_path / "out" / "routing_stats.json").read_text())
    kinds = stats["calls"]["layer3/vl"]["kinds"]
    assert stats["samples"] == 2 and kinds["image"]["patches"]["tokens"] == 2 * GRID * GRID  # no scene: one row
    assert {k: v["tokens"] for k, v in kinds["text"].items()} == {"special tokens": 4, "colour words": 2,
                                                                    "shape words": 4}


def test_object_patches_follow_the_scene():
    scene = [{"shape": "circle", "color": "red", "size": "large", "quadrant": "top left"}]
    patches = explain.object_patches(scene, canvas=128, image_size=64, patch=16)
    assert [i for i, on in enumerate(patches) if on] == [0, 1, 4, 5]


def test_help_is_fast_and_imports_no_torch():
    code = ("import runpy, sys\nsys.argv = ['pipeline.explain', '--help']\ntry:\n"
            "    runpy.run_module('pipeline.explain', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "--data" in proc.stdout and "python -m pipeline.explain --model" in proc.stdout
    assert proc.stdout.strip().endswith("[]")
    assert elapsed < 3.0  # < 1 s on an idle machine; the margin is for a loaded CI box


def test_clear_errors(model_dir, tmp_path, capsys):
    assert explain.main(["--model", str(tmp_path), "--image", str(tmp_path / "no.jpg"), "--output", "x"]) == 2
    assert "no such file" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert explain.main(["--model", str(tmp_path), "--image", str(tmp_path / "a.png"), "--output", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert explain.main(["--model", str(model_dir), "--data", str(tmp_path / "empty"), "--output",
                         str(tmp_path / "out")]) == 2
    assert "no manifest.json and no images" in capsys.readouterr().err


@pytest.mark.parametrize("text", [QUESTION, "what color " * 20])
def test_explain_tokenizes_and_decodes_as_training(model_dir, tmp_path, text):
    """Ids and mask equal the training tasks' ``downstream_common.tokenize`` (padded, or truncated to text_len
    with [SEP] last); the image tensor equals the data loader's decode + ``image_tensor`` of the same bytes."""
    from pipeline.data.loader import decode_sample
    from pipeline.tasks.downstream_common import image_tensor, tokenize

    explainer = explain.Explainer.load(model_dir)
    ids, mask, info = explainer.tokenize(text)
    want_ids, want_mask = tokenize(explainer.tokenizer, [text], TEXT_LEN)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask) and ids.shape == (1, TEXT_LEN)
    assert len(info["tokens"]) == len(info["offsets"]) == int(mask.sum())
    image, _ = scene_image(3)
    image.resize((50, 40)).save(tmp_path / "odd.jpg", quality=90)
    decoded = decode_sample({"jpg": (tmp_path / "odd.jpg").read_bytes()}, ["jpg"])["jpg"]
    assert torch.equal(explainer.pixels(explain.open_image(tmp_path / "odd.jpg")), image_tensor(decoded, IMAGE))


def test_preprocessing_comes_from_preprocessor_config_only(model_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    (copy / "preprocessor_config.json").unlink()
    scene_image(4)[0].save(tmp_path / "a.png")
    assert explain.main(["--model", str(copy), "--image", str(tmp_path / "a.png"), "--output", str(tmp_path)]) == 2
    assert "no preprocessor_config.json" in capsys.readouterr().err
    (copy / "preprocessor_config.json").write_text(json.dumps({"image_size": IMAGE}))
    assert explain.main(["--model", str(copy), "--image", str(tmp_path / "a.png"), "--output", str(tmp_path)]) == 2
    assert "needs integer image_size and text_len" in capsys.readouterr().err
