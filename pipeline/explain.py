"""Routing pictures of an exported model: which expert took each image patch and each text token.

    python -m pipeline.explain --model exports/vqa --image a.jpg --text "what color is the circle?" --output out
    python -m pipeline.explain --model exports/vqa --data data/vqa --split val --limit 200 --output out
    python -m pipeline.explain --model exports/vqa --data photos/ --text "a photo" --limit 50 --output out

``--image``: ``routing_<stem>.png``, one column per MoE layer: the image with each patch tinted by the colour
of its expert (a solid dot of that colour at the patch centre, black = dropped over capacity), the image CLS
and text tokens as boxes of the same colours, and a legend of token counts per expert for each MoE FFN
(image and text FFNs have their own experts: the same colour is a different expert in each);
``routing_<stem>.json`` holds the same routes. ``--data`` (a data_prep folder of shards, or a folder of
images): ``routing_stats.png``, per MoE FFN a heat map per modality (rows: kinds of tokens, as image
object vs background patches from the synth ``scene``, colour / shape / other words; columns: experts and
dropped; cell: share of that kind's tokens) and the load per expert, and ``routing_stats.json``.
Every input runs alone (batch 1, text padded to the model's length, as one prediction); with top-2 the
first choice is shown.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from PIL import Image, ImageDraw, ImageFont

from pipeline.config_utils import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pipeline.explain")

DROPPED = -1  # expert of a token dropped over capacity
PAD = -2  # padding (never routed with top-1)
DROPPED_RGB = (0, 0, 0)
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195)]  # Sasha Trubetskoy's 16 distinct colours
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
CELL = 48  # pixels per patch side in a routing panel (at most; big grids get smaller cells)
PANEL = 224  # routing panel side at most
MARGIN = 12
TINT = 0.45  # weight of the expert colour over the image


def expert_rgb(expert: int) -> tuple[int, int, int]:
    """Palette colour of ``expert`` (cycles above 16 experts); black for a dropped token."""
    return DROPPED_RGB if expert == DROPPED else PALETTE[expert % len(PALETTE)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.explain", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an export folder (python -m pipeline.export)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", help="image file(s): one routing picture each")
    src.add_argument("--data", help="data_prep folder of shards or a folder of images: routing statistics")
    p.add_argument("--text", default=None, help="text fed with every image (default: none; with --data each "
                                                "sample's txt, json question or caption)")
    p.add_argument("--split", default="val", help="split of a data_prep folder (default val)")
    p.add_argument("--limit", type=int, default=200, help="samples read from --data (default 200)")
    p.add_argument("--eval-capacity-factor", type=float, default=None,
                   help="override the model's moe.eval_capacity_factor (e.g. num_experts: nothing dropped)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: one input at a time is too small work to share)")
    p.add_argument("--output", required=True, help="folder for the pictures and JSON (created)")
    return p


# ------------------------------------------------------------------------------------------- routing
@dataclasses.dataclass
class MoECall:
    """One MoE FFN call of a forward pass: the joint-sequence span [start, end) it saw and, per token of it,
    the expert of its first route (``DROPPED``, ``PAD``) and the router's first choice."""

    layer: int
    key: str  # FFN key: a modality, "vl" or "shared"
    start: int
    end: int
    expert_bn: torch.Tensor  # [B, n] long
    wanted_bn: torch.Tensor  # [B, n] long

    @property
    def name(self) -> str:
        return f"layer{self.layer}/{self.key}"


class RoutingRecorder:
    """Forward hooks on every MoE gate of a ``VLMoE``: ``run`` returns the ``MoECall`` of each gate call."""

    def __init__(self, vlmoe: torch.nn.Module):
        self.vlmoe = vlmoe
        self.raw: list[tuple[int, str, torch.Tensor, torch.Tensor]] = []
        self.gates = {}
        for name, ffn in vlmoe.sparse_ffns().items():
            match = re.fullmatch(r"blocks\.(\d+)\.ffn\.(\w+)", name)
            if match is None:
                raise ValueError(f"unexpected MoE FFN name {name!r} (expected blocks.<i>.ffn.<key>)")
            layer, key = int(match.group(1)), match.group(2)
            ffn.deepspeed_moe.gate.register_forward_hook(self._hook(layer, key))
            self.gates[(layer, key)] = ffn.deepspeed_moe.gate

    def _hook(self, layer: int, key: str) -> Any:
        def hook(gate: torch.nn.Module, args: tuple, output: tuple) -> None:
            import torch.nn.functional as F

            logits_se = F.linear(args[0].float(), gate.wg.weight.float())
            self.raw.append((layer, key, output[0][0].detach(), logits_se.argmax(1)))
        return hook

    def run(self, inputs: dict[str, tuple[Any, ...]]) -> tuple[list[MoECall], dict[str, tuple[int, int]]]:
        """(MoE calls in call order, modality -> span) of one eval pass over ``inputs`` (``VLMoE.encode``)."""
        import torch

        self.raw = []
        with torch.no_grad():
            out = self.vlmoe.encode(inputs)
        valid_bn = out.token_mask
        calls = []
        for layer, key, expert_s, wanted_s in self.raw:
            start, end = out.spans[key] if key in out.spans else (0, valid_bn.shape[1])
            shape = (valid_bn.shape[0], end - start)
            valid = valid_bn[:, start:end]
            expert_bn = torch.where(valid, expert_s.view(shape), torch.full(shape, PAD)).long()
            calls.append(MoECall(layer, key, start, end, expert_bn, wanted_s.view(shape).long()))
        return calls, dict(out.spans)


# ------------------------------------------------------------------------------------------ inputs
@dataclasses.dataclass
class Explainer:
    """An exported model with its tokenizer and a recorder on its gates."""

    model: Any  # pipeline.hf.VLMoEModel
    tokenizer: Any
    recorder: RoutingRecorder

    @classmethod
    def load(cls, folder: Path, eval_capacity_factor: float | None = None) -> Explainer:
        if not (folder / "config.json").is_file():
            raise ConfigError(f"--model {folder}: no config.json (is it a python -m pipeline.export folder?)")
        from pipeline.hf.modeling import load_export

        model, tokenizer = load_export(folder, eval_capacity_factor)
        if "image" not in model.model.cfg.modalities:
            raise ConfigError(f"--model {folder}: modalities {model.model.cfg.modalities} have no image")
        if not model.model.sparse_ffns():
            raise ConfigError(f"--model {folder}: no MoE layer, nothing to explain")
        return cls(model, tokenizer, RoutingRecorder(model.model))

    @property
    def grid(self) -> int:
        return self.model.config.image_size // self.model.model.cfg.patch_size

    def route(self, image: Image.Image, text: str | None) -> tuple[list[MoECall], dict[str, tuple[int, int]], dict]:
        """(calls, spans, text info) of one image (+ text): text info has ``tokens`` (word pieces of the
        real tokens) and ``offsets`` (character spans, (0, 0) for special tokens)."""
        from pipeline.tasks.downstream_common import image_tensor

        inputs: dict[str, tuple[Any, ...]] = {"image": (image_tensor(image, self.model.config.image_size)[None],)}
        info: dict[str, Any] = {"tokens": [], "offsets": []}
        if text is not None and self.tokenizer is None:
            raise ConfigError(f"--text: the model reads no text (modalities {self.model.model.cfg.modalities})")
        if text is not None:
            enc = self.tokenizer([text], padding="max_length", truncation=True, max_length=self.model.config.text_len,
                                 return_tensors="pt", return_offsets_mapping=True)
            real = int(enc["attention_mask"][0].sum())
            info = {"tokens": self.tokenizer.convert_ids_to_tokens(enc["input_ids"][0][:real].tolist()),
                    "offsets": [tuple(o) for o in enc["offset_mapping"][0][:real].tolist()]}
            inputs["text"] = (enc["input_ids"].long(), enc["attention_mask"].long())
        calls, spans = self.recorder.run(inputs)
        return calls, spans, info


def split_call(call: MoECall, spans: dict[str, tuple[int, int]], modality: str) -> list[int] | None:
    """Experts of sample 0's tokens of ``modality`` in ``call`` (None if the call did not see them)."""
    if modality not in spans:
        return None
    start, end = spans[modality]
    if start < call.start or end > call.end:
        return None
    return call.expert_bn[0, start - call.start:end - call.start].tolist()


# ------------------------------------------------------------------------------------------ drawing
def font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def text_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def draw_patches(canvas: Image.Image, image: Image.Image, experts_p: list[int], grid: int, x: int, y: int,
                 cell: int) -> None:
    """The image at (x, y), grid*cell square, each patch tinted by its expert, a solid dot at its centre."""
    side = grid * cell
    base = image.convert("RGB").resize((side, side), Image.BICUBIC)
    tint = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(tint)
    for p, expert in enumerate(experts_p):
        row, col = divmod(p, grid)
        draw.rectangle([col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1],
                       fill=(128, 128, 128) if expert == DROPPED else expert_rgb(expert))
    panel = Image.blend(base, tint, TINT)
    draw = ImageDraw.Draw(panel)
    dot = max(2, cell // 6)
    for p, expert in enumerate(experts_p):
        row, col = divmod(p, grid)
        cx, cy = col * cell + cell // 2, row * cell + cell // 2
        draw.rectangle([cx - dot, cy - dot, cx + dot, cy + dot], fill=expert_rgb(expert), outline=(255, 255, 255))
        if grid <= 16:
            draw.line([col * cell, row * cell, (col + 1) * cell - 1, row * cell], fill=(255, 255, 255))
            draw.line([col * cell, row * cell, col * cell, (row + 1) * cell - 1], fill=(255, 255, 255))
    canvas.paste(panel, (x, y))


def flow_boxes(labels: list[str], width: int, fnt: ImageFont.ImageFont, height: int) -> list[tuple[int, int, int]]:
    """(x, y, w) of each label's box, left to right, wrapped at ``width``."""
    out, x, y = [], 0, 0
    for label in labels:
        w = int(fnt.getlength(label)) + 10
        if x and x + w > width:
            x, y = 0, y + height + 4
        out.append((x, y, w))
        x += w + 4
    return out


def draw_routing(image: Image.Image, calls: list[MoECall], spans: dict[str, tuple[int, int]], info: dict,
                 grid: int, title: str) -> tuple[Image.Image, dict]:
    """The routing picture (module docstring) and its layout: per column its panel (x, y, cell) and the box
    (x, y, w, h) of every token (image CLS first, then the text tokens)."""
    fnt, small = font(12), font(11)
    cell = max(2, min(CELL, PANEL // grid))
    side = grid * cell
    col_w = max(side, 240)
    layers = sorted({c.layer for c in calls})
    box_h = 18
    columns = []
    for layer in layers:
        layer_calls = [c for c in calls if c.layer == layer]
        image_call = next(c for c in layer_calls if split_call(c, spans, "image") is not None)
        image_experts = split_call(image_call, spans, "image")
        text_call = next((c for c in layer_calls if split_call(c, spans, "text") is not None), None)
        text_experts = split_call(text_call, spans, "text")[:len(info["tokens"])] if text_call else []
        labels = ["image CLS"] + [t if e != DROPPED else f"{t} (dropped)" for t, e in zip(info["tokens"], text_experts)]
        columns.append({"layer": layer, "calls": layer_calls, "image": image_experts, "text": text_experts,
                        "text_call": text_call, "labels": labels,
                        "boxes": flow_boxes(labels, col_w, small, box_h)})
    title_h = 40
    head_h = 36
    legend_rows = max(len(c["calls"]) for c in columns) * 3 + 1  # title + entries (wrapped once)
    boxes_h = max(c["boxes"][-1][1] for c in columns) + box_h
    height = title_h + head_h + side + 10 + boxes_h + 10 + legend_rows * 18 + MARGIN
    width = MARGIN + len(columns) * (col_w + MARGIN)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, 6), title, fill=(0, 0, 0), font=fnt)
    draw.text((MARGIN, 22), "tint and centre dot: expert of the token; black: dropped over capacity", fill=(90, 90, 90),
              font=small)
    layout: dict[str, Any] = {"grid": grid, "cell": cell, "columns": []}
    for i, col in enumerate(columns):
        x0, y = MARGIN + i * (col_w + MARGIN), title_h
        keys = " / ".join(f"{c.key} FFN" for c in col["calls"])
        draw.text((x0, y), f"MoE layer {col['layer']}", fill=(0, 0, 0), font=fnt)
        draw.text((x0, y + 16), keys, fill=(90, 90, 90), font=small)
        y += head_h
        draw_patches(canvas, image, col["image"][1:], grid, x0, y, cell)
        entry = {"layer": col["layer"], "keys": [c.key for c in col["calls"]], "panel": [x0, y, cell], "boxes": []}
        y += side + 10
        experts = col["image"][:1] + col["text"]
        for label, (bx, by, bw), expert in zip(col["labels"], col["boxes"], experts):
            rgb = expert_rgb(expert)
            draw.rectangle([x0 + bx, y + by, x0 + bx + bw - 1, y + by + box_h - 1], fill=rgb, outline=(200, 200, 200))
            draw.text((x0 + bx + 5, y + by + 3), label, fill=text_colour(rgb), font=small)
            entry["boxes"].append([x0 + bx, y + by, bw, box_h])
        y += boxes_h + 10
        for call in col["calls"]:
            y = draw_legend(draw, call, x0, y, col_w, small)
        layout["columns"].append(entry)
    return canvas, layout


def draw_legend(draw: ImageDraw.ImageDraw, call: MoECall, x0: int, y: int, width: int,
                fnt: ImageFont.ImageFont) -> int:
    """Under a column: the FFN, then a swatch and token count per expert (and dropped), wrapped at ``width``;
    returns the y below."""
    experts = [e for e in call.expert_bn[0].tolist() if e != PAD]
    draw.text((x0, y), f"{call.key} FFN experts (tokens):", fill=(0, 0, 0), font=fnt)
    y += 18
    x = x0
    used = sorted({e for e in experts if e >= 0}) + ([DROPPED] if DROPPED in experts else [])
    for expert in used:
        label = f"{'dropped' if expert == DROPPED else f'e{expert}'}: {experts.count(expert)}"
        w = 16 + int(fnt.getlength(label)) + 10
        if x > x0 and x + w > x0 + width:
            x, y = x0, y + 18
        draw.rectangle([x, y + 2, x + 11, y + 13], fill=expert_rgb(expert), outline=(120, 120, 120))
        draw.text((x + 15, y + 1), label, fill=(0, 0, 0), font=fnt)
        x += w
    return y + 18


def explain_images(explainer: Explainer, paths: list[Path], text: str | None, output: Path) -> list[Path]:
    """``routing_<stem>.png`` and ``.json`` per image in ``output`` (created); returns the pictures."""
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        image = open_image(path)
        calls, spans, info = explainer.route(image, text)
        title = f"{path.name}" + (f": {text!r}" if text else "")
        picture, layout = draw_routing(image, calls, spans, info, explainer.grid, title)
        out = output / f"routing_{path.stem}.png"
        picture.save(out)
        routes = {c.name: {"image_cls": split_call(c, spans, "image")[0] if split_call(c, spans, "image") else None,
                           "image_patches": _rows(split_call(c, spans, "image"), explainer.grid),
                           "text": (split_call(c, spans, "text") or [])[:len(info["tokens"])] or None}
                  for c in calls}
        meta = {"image": str(path), "text": text, "tokens": info["tokens"], "dropped": DROPPED,
                "num_experts": explainer.model.model.cfg.moe.num_experts, "routes": routes, "layout": layout}
        (output / f"routing_{path.stem}.json").write_text(json.dumps(meta, indent=1))
        written.append(out)
    return written


def _rows(experts: list[int] | None, grid: int) -> list[list[int]] | None:
    return None if experts is None else [experts[1 + r * grid:1 + (r + 1) * grid] for r in range(grid)]


def open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--image {path}: cannot read it as an image ({exc})") from exc


# ------------------------------------------------------------------------------------ data statistics
def word_kinds() -> dict[str, str]:
    """word -> "colour words" / "shape words" (shapes-world vocabulary, plurals included)."""
    from data_prep.synth_world import COLORS, SHAPES

    kinds = {c: "colour words" for c in COLORS}
    kinds.update({s: "shape words" for s in SHAPES})
    kinds.update({s + ("es" if s.endswith("s") else "s"): "shape words" for s in SHAPES})
    return kinds


def text_kinds(text: str, offsets: list[tuple[int, int]]) -> list[str]:
    """Kind of each real token: "special" ([CLS], [SEP]: empty span), else the kind of the word it is in."""
    words = word_kinds()
    spans = [(m.start(), m.end(), m.group().lower()) for m in re.finditer(r"\w+", text)]
    out = []
    for start, end in offsets:
        if start == end:
            out.append("special tokens")
            continue
        word = next((w for s, e, w in spans if s <= start < e), "")
        out.append(words.get(word, "other words"))
    return out


def object_patches(scene: list[dict], canvas: int, image_size: int, patch: int) -> list[bool]:
    """Per patch (row-major): True when >= 1/4 of it lies in an object's box, the box from the synth
    ``scene`` (quadrant and size; the unknown jitter widens it by the most it can move)."""
    from data_prep.synth_world import JITTER, QUADRANTS, SIZE_FRACTION

    half, scale, grid = canvas / 2, canvas / image_size, image_size // patch
    boxes = []
    for obj in scene:
        side = SIZE_FRACTION[obj["size"]] * canvas
        r = side / 2 + JITTER * max(0.0, (half - side) / 2 - 1)
        col, row = QUADRANTS.index(obj["quadrant"]) % 2, QUADRANTS.index(obj["quadrant"]) // 2
        cx, cy = col * half + half / 2, row * half + half / 2
        boxes.append((cx - r, cy - r, cx + r, cy + r))
    out = []
    for p in range(grid * grid):
        row, col = divmod(p, grid)
        x0, y0, size = col * patch * scale, row * patch * scale, patch * scale
        cover = sum(max(0.0, min(x0 + size, b[2]) - max(x0, b[0])) * max(0.0, min(y0 + size, b[3]) - max(y0, b[1]))
                    for b in boxes)
        out.append(cover >= size * size / 4)
    return out


def read_samples(data: Path, split: str, limit: int, text: str | None) -> Iterator[tuple[Image.Image, str | None, Any]]:
    """(image, text, synth scene or None) of the first ``limit`` samples of a data_prep folder (webdataset
    shards, in order) or of a folder of images (sorted; ``text`` for each)."""
    if not data.is_dir():
        raise ConfigError(f"--data {data}: not a folder")
    if not (data / "manifest.json").is_file():
        paths = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_EXTS)[:limit]
        if not paths:
            raise ConfigError(f"--data {data}: no manifest.json and no images ({', '.join(IMAGE_EXTS)})")
        for path in paths:
            yield open_image(path), text, None
        return
    import webdataset as wds

    from pipeline.data.loader import IMAGE_EXTS as FIELDS, decode_sample, shard_urls

    count = 0
    for sample in wds.WebDataset(shard_urls(str(data), split), shardshuffle=False, empty_check=False):
        field = next((f for f in FIELDS if f in sample), None)
        if field is None:
            continue
        decoded = decode_sample(sample, [field], ["txt", "json"])
        meta = decoded.get("json") if isinstance(decoded.get("json"), dict) else {}
        sample_text = text or decoded.get("txt") or meta.get("question") or meta.get("caption")
        yield decoded[field], sample_text, meta.get("scene")
        count += 1
        if count >= limit:
            return


def routing_stats(explainer: Explainer, samples: Iterator[tuple[Image.Image, str | None, Any]]) -> dict:
    """Counts per MoE call, modality and kind of token: {"tokens", "experts" [E], "dropped"} (module docstring)."""
    cfg = explainer.model.model.cfg
    experts = cfg.moe.num_experts
    stats: dict[str, Any] = {"samples": 0, "num_experts": experts, "top_k": cfg.moe.top_k, "calls": {}}
    for image, text, scene in samples:
        calls, spans, info = explainer.route(image, text)
        kinds = {"image": ["image CLS"] + (["object patches" if o else "background patches" for o in
                                            object_patches(scene, image.size[0], cfg.image_size, cfg.patch_size)]
                                           if scene else ["patches"] * explainer.grid ** 2)}
        if info["tokens"]:
            kinds["text"] = text_kinds(text, info["offsets"])
        for call in calls:
            entry = stats["calls"].setdefault(call.name, {"layer": call.layer, "key": call.key, "tokens": 0,
                                                          "load": [0] * experts, "dropped": 0, "kinds": {}})
            for modality, token_kinds in kinds.items():
                routed = split_call(call, spans, modality)
                if routed is None:
                    continue
                for kind, expert in zip(token_kinds, routed):
                    cell = entry["kinds"].setdefault(modality, {}).setdefault(
                        kind, {"tokens": 0, "experts": [0] * experts, "dropped": 0})
                    cell["tokens"] += 1
                    entry["tokens"] += 1
                    if expert == DROPPED:
                        cell["dropped"] += 1
                        entry["dropped"] += 1
                    else:
                        cell["experts"][expert] += 1
                        entry["load"][expert] += 1
        stats["samples"] += 1
    if not stats["samples"]:
        raise ConfigError("no samples with an image were read")
    return stats


def heat_rgb(share: float) -> tuple[int, int, int]:
    """White (0) -> dark blue (1)."""
    return tuple(int(round(w + (d - w) * share)) for w, d in zip((255, 255, 255), (8, 48, 107)))


def draw_stats(stats: dict) -> Image.Image:
    """Per MoE call one row: a heat map per modality (kinds x experts + dropped) and the load per expert."""
    fnt, small = font(12), font(11)
    experts = stats["num_experts"]
    cell_w, cell_h, label_w, bar_h = 44, 20, 170, 90
    heat_w = label_w + (experts + 1) * cell_w
    rows = []
    for name, entry in stats["calls"].items():
        maps_h = sum(20 + cell_h * (len(k) + 1) + 8 for k in entry["kinds"].values())
        rows.append((name, entry, max(maps_h, bar_h + 60)))
    width = MARGIN + heat_w + 2 * MARGIN + max(220, experts * 28 + 40) + MARGIN
    height = 40 + sum(26 + h for *_, h in rows) + MARGIN
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, 8), f"routing over {stats['samples']} samples: share of each kind of token per expert",
              fill=(0, 0, 0), font=fnt)
    y = 40
    for name, entry, h in rows:
        draw.text((MARGIN, y), f"{name} FFN ({entry['tokens']} tokens)", fill=(0, 0, 0), font=fnt)
        y += 26
        my = y
        for modality, kinds in entry["kinds"].items():
            draw.text((MARGIN, my), modality, fill=(90, 90, 90), font=small)
            heads = [f"e{e}" for e in range(experts)] + ["drop"]
            for j, head in enumerate(heads):
                draw.text((MARGIN + label_w + j * cell_w + 10, my), head, fill=(0, 0, 0), font=small)
            my += 20
            for kind, cell in kinds.items():
                draw.text((MARGIN, my + 4), f"{kind} ({cell['tokens']})", fill=(0, 0, 0), font=small)
                for j, count in enumerate(cell["experts"] + [cell["dropped"]]):
                    share = count / max(cell["tokens"], 1)
                    x = MARGIN + label_w + j * cell_w
                    draw.rectangle([x, my, x + cell_w - 2, my + cell_h - 2], fill=heat_rgb(share))
                    draw.text((x + 6, my + 4), f"{share:.0%}", fill=text_colour(heat_rgb(share)), font=small)
                my += cell_h
            my += cell_h + 8
        draw_load(draw, entry, MARGIN + heat_w + 2 * MARGIN, y, bar_h, small)
        y += h
    return canvas


def draw_load(draw: ImageDraw.ImageDraw, entry: dict, x0: int, y0: int, bar_h: int, fnt: ImageFont.ImageFont) -> None:
    """Bar chart: share of the call's tokens kept by each expert, then dropped (the tallest bar full height)."""
    counts = entry["load"] + [entry["dropped"]]
    total, highest = max(entry["tokens"], 1), max(max(counts), 1)
    draw.text((x0, y0), "load per expert (share of tokens)", fill=(0, 0, 0), font=fnt)
    base = y0 + 34 + bar_h  # room for the title and the tallest bar's label
    for j, count in enumerate(counts):
        x = x0 + j * 28
        top = base - int(round(bar_h * count / highest))
        draw.rectangle([x, top, x + 20, base], fill=expert_rgb(DROPPED if j == len(counts) - 1 else j))
        draw.text((x + 2, base + 3), "dr" if j == len(counts) - 1 else f"e{j}", fill=(0, 0, 0), font=fnt)
        draw.text((x, top - 13), f"{count / total:.0%}", fill=(0, 0, 0), font=fnt)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help exits here, before torch is imported
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for flag, value in (("--limit", args.limit), ("--threads", args.threads)):
        if value < 1:
            print(f"pipeline.explain: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    output = Path(args.output)
    try:
        images = [Path(p) for p in args.image or []]
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise ConfigError(f"--image: no such file: {', '.join(missing)}")
        if args.data and not Path(args.data).exists():
            raise ConfigError(f"--data {args.data}: no such folder")
        import torch

        torch.set_num_threads(args.threads)
        explainer = Explainer.load(Path(args.model), args.eval_capacity_factor)
        output.mkdir(parents=True, exist_ok=True)
        if images:
            written = explain_images(explainer, images, args.text, output)
        else:
            stats = routing_stats(explainer, read_samples(Path(args.data), args.split, args.limit, args.text))
            (output / "routing_stats.json").write_text(json.dumps(stats, indent=1))
            draw_stats(stats).save(output / "routing_stats.png")
            written = [output / "routing_stats.png", output / "routing_stats.json"]
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"pipeline.explain: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
