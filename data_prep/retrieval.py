r"""`data_prep retrieval`: Karpathy-split JSON (COCO / Flickr30k) -> one sample per image, all captions.

    python -m data_prep retrieval --input dataset_flickr30k.json --image-root flickr30k-images \
        --output out/f30k

Splits come from each image's "split" field: train, val, test, and restval (merged into train by
default; --restval keep writes it as its own split, --restval drop leaves it out). Each sample: jpg,
txt = first caption, json = {image_id, filename, captions, split_source, imgid, cocoid?, sentids?}.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterator

from data_prep.cli_common import add_output_options, make_writer
from data_prep.jsonio import load_json_file, require_list
from data_prep.records import EMPTY_CAPTION, MISSING_FIELD, ReaderItem, Record, Skip, check_text

KARPATHY_SHAPE = ('{"images": [{"filename", "filepath"?, "split": train|val|test|restval, "imgid", '
                  '"sentences": [{"raw", "tokens"}, ...]}, ...]}')
SPLIT_ORDER = ("train", "val", "test", "restval")
RESTVAL_CHOICES = ("train", "keep", "drop")


def output_split(split: str, restval: str) -> str | None:
    """Where a Karpathy split goes: restval -> train (default), its own split, or nowhere."""
    if split == "restval":
        return {"train": "train", "keep": "restval", "drop": None}[restval]
    return split


def retrieval_record(image: dict, *, image_root: str, where: str) -> ReaderItem:
    """One Karpathy image entry -> Record (captions in file order, empty ones dropped) or Skip."""
    if not isinstance(image.get("filename"), str) or not isinstance(image.get("sentences"), list):
        return Skip(MISSING_FIELD, f"{where}: needs 'filename' and a 'sentences' list")
    captions = []
    for sentence in image["sentences"]:
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        text = check_text(raw, "raw")
        if not isinstance(text, Skip):
            captions.append(text)
    if not captions:
        return Skip(EMPTY_CAPTION, f"{where}: no usable caption")
    rel = os.path.join(image.get("filepath") or "", image["filename"])
    image_id = image.get("cocoid", image.get("imgid"))
    meta = {"image_id": image_id, "filename": image["filename"], "captions": captions,
            "split_source": image.get("split")}
    meta.update({k: image[k] for k in ("imgid", "cocoid", "sentids", "filepath") if k in image})
    return Record(images={"jpg": os.path.join(image_root, rel)}, text=captions[0], meta=meta)


def group_by_split(images: list, restval: str) -> dict[str, list[tuple[int, dict]]]:
    groups: dict[str, list[tuple[int, dict]]] = {}
    for i, image in enumerate(images):
        split = image.get("split") if isinstance(image, dict) else None
        target = output_split(split, restval) if isinstance(split, str) else "_invalid"
        if target is not None:
            groups.setdefault(target, []).append((i, image))
    order = {s: i for i, s in enumerate(SPLIT_ORDER)}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def split_items(entries: list[tuple[int, dict]], image_root: str, name: str) -> Iterator[ReaderItem]:
    for i, image in entries:
        yield retrieval_record(image, image_root=image_root, where=f"{name}: images[{i}]")


def run(args: argparse.Namespace) -> int:
    doc = load_json_file(args.input, KARPATHY_SHAPE)
    groups = group_by_split(require_list(doc, args.input, "images", KARPATHY_SHAPE), args.restval)
    name = os.path.basename(args.input)
    with make_writer(args, task="retrieval", fields=["jpg", "txt", "json"]) as writer:
        invalid = groups.pop("_invalid", [])
        for split, entries in groups.items():
            writer.write_split(split, split_items(entries, args.image_root, name), total=len(entries))
        writer.add_skipped(MISSING_FIELD, len(invalid))
        writer.finish()
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("retrieval", help="Karpathy-split JSON -> retrieval shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="dataset_coco.json / dataset_flickr30k.json")
    p.add_argument("--image-root", required=True, help="folder the images' filepath/filename are under")
    p.add_argument("--restval", choices=RESTVAL_CHOICES, default="train",
                   help="restval images: merged into train, kept as a split, or dropped (default %(default)s)")
    add_output_options(p)
    p.set_defaults(func=run)
