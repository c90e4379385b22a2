"""Routing pictures in TensorBoard during training (``train.routing_images``, ``pipeline.routing_pictures``).

The trainer's path (one batch of fixed eval samples through the model, pictures drawn by the shared code) gives
the same picture as ``pipeline.explain`` for the same weights and image. ``assert_routing_images`` checks a
training run's TensorBoard images; tests/test_train_launcher.py's EP=2 ZeRO-2 run calls it (no launch of its
own: the run it already makes evaluates at its last step).
"""
import io

import numpy as np
import torch
import yaml
from PIL import Image

from pipeline import explain
from pipeline import routing_pictures as rp
from tests.test_explain import GRID, QUESTION, save_model, scene_image


def test_trainer_picture_equals_explain_picture(tmp_path):
    """Two samples in one batch (nothing dropped: eval capacity factor = experts) give, below the title, the
    pictures explain draws for each image alone; the patch dots are the recorded routes' colours."""
    explainer = explain.Explainer.load(save_model(tmp_path / "model"))
    samples, expected = [], []
    for seed in (5, 6):
        image, _ = scene_image(seed)
        image.save(tmp_path / f"scene{seed}.png")
        (written,) = explain.explain_images(explainer, [tmp_path / f"scene{seed}.png"], QUESTION, tmp_path / "out")
        with Image.open(written) as picture:
            expected.append(np.asarray(picture.convert("RGB")))
        ids, mask, _ = explainer.tokenize(QUESTION)
        samples.append({"pixel_values": explainer.pixels(image), "input_ids": ids[0], "attention_mask": mask[0]})
    pictures = rp.sample_pictures(explainer.model.model, samples, explainer.tokenizer, torch.device("cpu"),
                                  "step 7, eval sample {i}")
    assert len(pictures) == 2
    for picture, want in zip(pictures, expected):
        got = np.asarray(picture)
        assert got.shape == want.shape
        assert np.array_equal(got[rp.TITLE_H:], want[rp.TITLE_H:])
    assert not np.array_equal(expected[0][rp.TITLE_H:], expected[1][rp.TITLE_H:])  # the sample index matters
    calls, spans = rp.RoutingRecorder(explainer.model.model).run(
        {"image": (torch.stack([s["pixel_values"] for s in samples]),),
         "text": (torch.stack([s["input_ids"] for s in samples]), torch.stack([s["attention_mask"] for s in samples]))})
    first_layer = min(c.layer for c in calls)
    image_call = next(c for c in calls if c.layer == first_layer and rp.split_call(c, spans, "image") is not None)
    cell, _ = rp.panel_geometry(GRID)
    x0, y0 = rp.MARGIN, rp.TITLE_H + 36
    for i, picture in enumerate(pictures):
        routes = rp.split_call(image_call, spans, "image", sample=i)[1:]
        dots = [picture.getpixel((x0 + c * cell + cell // 2, y0 + r * cell + cell // 2))
                for r in range(GRID) for c in range(GRID)]
        assert dots == [rp.expert_rgb(e) for e in routes]


def routing_images(run_dir) -> dict[str, list]:
    """TensorBoard image tag -> [(step, PIL image)] of a run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    out = {tag: [(e.step, Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"), (e.width, e.height))
                 for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
    out["__moe_layers__"] = sorted({int(t.split("/")[1][len("layer"):]) for t in acc.Tags()["scalars"]
                                    if t.startswith("moe_load/")})
    return out


def assert_routing_images(run_dir, count: int, steps: list[int]) -> None:
    """``count`` pictures ``routing/sample_<i>`` at each eval step, one column per MoE layer of the patch grid
    (from the run's resolved recipe), each patch dot an expert's palette colour or dropped black."""
    recipe = yaml.safe_load((run_dir / "resolved_recipe.yaml").read_text())
    grid = recipe["data"]["image_size"] // recipe["model"]["patch_size"]
    experts = recipe["model"]["moe"]["num_experts"]
    images = routing_images(run_dir)
    layers = images.pop("__moe_layers__")
    assert sorted(images) == sorted(rp.TAG.format(i) for i in range(count)), sorted(images)
    cell, col_w = rp.panel_geometry(grid)
    allowed = {rp.expert_rgb(e) for e in range(experts)} | {rp.DROPPED_RGB}
    for tag, events in images.items():
        assert [step for step, _, _ in events] == steps, (tag, events)
        for _, picture, size in events:
            assert size == picture.size and picture.width >= rp.MARGIN + len(layers) * (col_w + rp.MARGIN)
            assert picture.height > rp.TITLE_H + 36 + grid * cell
            for column in range(len(layers)):
                x0, y0 = rp.MARGIN + column * (col_w + rp.MARGIN), rp.TITLE_H + 36
                dots = {picture.getpixel((x0 + c * cell + cell // 2, y0 + r * cell + cell // 2))
                        for r in range(grid) for c in range(grid)}
                assert dots <= allowed, (tag, column, dots - allowed)
