"""Routing pictures of an exported model: which expert took each image patch and each text token.

    python -m pipeline.explain --model exports/vqa --image a.jpg --text "what color is the circle?" --output out
    python -m pipeline.explain --model exports/vqa --data data/vqa --split val --limit 200 --output out
    python -m pipeline.explain --model exports/vqa --data photos/ --text "a photo" --limit 50 --output out

``--image``: ``routing_<stem>.png`` (``pipeline.routing_pictures``, as the trainer's TensorBoard images), one
column per MoE layer: the image as the model saw it (decoded and resized as training does, at the size of the
export's preprocessor_config.json) with each patch tinted by the colour of its expert (a solid dot of that
colour at the patch centre, black = dropped over capacity), the image CLS
and text tokens as boxes of the same colours, and a legend of token counts per expert for each MoE FFN
(image and text FFNs have their own experts: the same colour is a different expert in each);
``routing_<stem>.json`` holds the same routes. ``--data`` (a data_prep folder of shards, or a folder of
images): ``routing_stats.png``, per MoE FFN a heat map per modality (rows: kinds of tokens, as image
object vs background patches from the synth ``scene``, colour / shape / other words; columns: experts and
dropped; cell: share of that kind's tokens) and the load per expert, and ``routing_stats.json``.
Every input runs alone (batch 1, text tokenized, padded and truncated as training does, as one prediction);
with top-2 the first choice is shown.
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

from PIL import Image

from pipeline.config_utils import ConfigError
from pipeline.routing_pictures import DROPPED, MoECall, RoutingRecorder, draw_routing, draw_stats, split_call

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pipeline.explain")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


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


# ------------------------------------------------------------------------------------------ inputs
@dataclasses.dataclass
class Explainer:
    """An exported model with its tokenizer, its preprocessing and a recorder on its gates."""

    model: Any  # pipeline.hf.VLMoEModel
    tokenizer: Any
    recorder: RoutingRecorder
    image_size: int
    text_len: int

    @classmethod
    def load(cls, folder: Path, eval_capacity_factor: float | None = None) -> Explainer:
        if not (folder / "config.json").is_file():
            raise ConfigError(f"--model {folder}: no config.json (is it a python -m pipeline.export folder?)")
        from pipeline.hf.modeling import load_export
        from pipeline.predict import read_preprocessing

        image_size, text_len = read_preprocessing(folder)
        model, tokenizer = load_export(folder, eval_capacity_factor)
        if "image" not in model.model.cfg.modalities:
            raise ConfigError(f"--model {folder}: modalities {model.model.cfg.modalities} have no image")
        if not model.model.sparse_ffns():
            raise ConfigError(f"--model {folder}: no MoE layer, nothing to explain")
        return cls(model, tokenizer, RoutingRecorder(model.model), image_size, text_len)

    @property
    def grid(self) -> int:
        return self.image_size // self.model.model.cfg.patch_size

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """[3, H, W]: the image as training and evaluation prepare it (``downstream_common.image_tensor``)."""
        from pipeline.tasks.downstream_common import image_tensor

        return image_tensor(image, self.image_size)

    def tokenize(self, text: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, list]]:
        """(input_ids [1, L], attention_mask [1, L]) exactly as training's ``downstream_common.tokenize``, and
        ``tokens`` (word pieces) and ``offsets`` (character spans, (0, 0) for special tokens) of the real ones."""
        from pipeline.tasks.downstream_common import tokenize

        if self.tokenizer is None:
            raise ConfigError(f"--text: the model reads no text (modalities {self.model.model.cfg.modalities})")
        ids, mask = tokenize(self.tokenizer, [text], self.text_len)
        real = ids[0, :int(mask[0].sum())].tolist()
        enc = self.tokenizer(text, truncation=True, max_length=self.text_len, return_offsets_mapping=True)
        if enc["input_ids"] != real:
            raise ValueError(f"--text {text!r}: the tokenizer's offsets call gave other ids than training's")
        return ids, mask, {"tokens": self.tokenizer.convert_ids_to_tokens(real),
                           "offsets": [tuple(o) for o in enc["offset_mapping"]]}

    def route(self, image: Image.Image, text: str | None) -> tuple[list[MoECall], dict[str, tuple[int, int]], dict]:
        """(calls, spans, text info) of one image (+ text) alone (batch 1): text info as ``tokenize``'s."""
        inputs: dict[str, tuple[Any, ...]] = {"image": (self.pixels(image)[None],)}
        info: dict[str, Any] = {"tokens": [], "offsets": []}
        if text is not None:
            ids, mask, info = self.tokenize(text)
            inputs["text"] = (ids, mask)
        calls, spans = self.recorder.run(inputs)
        return calls, spans, info


def explain_images(explainer: Explainer, paths: list[Path], text: str | None, output: Path) -> list[Path]:
    """``routing_<stem>.png`` and ``.json`` per image in ``output`` (created); returns the pictures. The picture
    shows the image as the model saw it (resized to its image size)."""
    from pipeline.routing_pictures import tensor_image

    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        image = open_image(path)
        calls, spans, info = explainer.route(image, text)
        title = f"{path.name}" + (f": {text!r}" if text else "")
        picture, layout = draw_routing(tensor_image(explainer.pixels(image)), calls, spans, info["tokens"],
                                       explainer.grid, title)
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
    """The image decoded as the data loader decodes a shard's (``pipeline.data.loader.decode_sample``)."""
    from pipeline.data.loader import decode_sample

    try:
        return decode_sample({"jpg": path.read_bytes()}, ["jpg"])["jpg"]
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
    stats: dict[str, Any] = {"samples": 0, "num_experts": experts, "top_k": cfg.moe.top_k,
                             "dropless": cfg.moe.impl == "dropless", "calls": {}}
    for image, text, scene in samples:
        calls, spans, info = explainer.route(image, text)
        kinds = {"image": ["image CLS"] + (["object patches" if o else "background patches" for o in
                                            object_patches(scene, image.size[0], explainer.image_size, cfg.patch_size)]
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
