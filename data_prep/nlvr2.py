r"""`data_prep nlvr2`: NLVR2 JSON lines + image folder -> samples with both images, sentence and label.

    python -m data_prep nlvr2 --input nlvr2/data/dev.json --image-root nlvr2/images/dev --split dev \
        --output out/nlvr2_dev

The identifier `split-set_id-pair_id-sentence_id` names the images `split-set_id-pair_id-img0.png` and
`-img1.png`, looked up under --image-root/<directory>/ (train lines carry "directory") and then
--image-root/. Each sample: img0.jpg, img1.jpg, txt = sentence, json = {identifier, sentence, label}.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Iterator

from data_prep.cli_common import add_output_options, make_writer
from data_prep.records import BAD_LABEL, MISSING_FIELD, ReaderItem, Record, Skip, check_text
from data_prep.tables import iter_jsonl

IDENTIFIER_RE = re.compile(r"^(?P<split>[\w]+)-(?P<set>\d+)-(?P<pair>\d+)-(?P<sentence>\d+)$")
LABELS = {"true": True, "false": False}


def parse_label(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return LABELS.get(value.strip().lower())
    return None


def image_names(identifier: str) -> tuple[str, str] | None:
    """'dev-850-0-0' -> ('dev-850-0-img0.png', 'dev-850-0-img1.png'); None for a malformed identifier."""
    m = IDENTIFIER_RE.match(identifier)
    if not m:
        return None
    stem = f"{m['split']}-{m['set']}-{m['pair']}"
    return f"{stem}-img0.png", f"{stem}-img1.png"


def find_image(image_root: str, directory, name: str) -> str:
    if directory is not None:
        candidate = os.path.join(image_root, str(directory), name)
        if os.path.isfile(candidate):
            return candidate
    return os.path.join(image_root, name)


def nlvr2_record(row: dict, *, image_root: str, where: str) -> ReaderItem:
    """One NLVR2 line -> Record(img0.jpg, img1.jpg, txt, json) or the Skip saying why not."""
    missing = [k for k in ("identifier", "sentence", "label") if k not in row]
    if missing:
        return Skip(MISSING_FIELD, f"{where}: lacks {missing}")
    names = image_names(str(row["identifier"]))
    if names is None:
        return Skip(MISSING_FIELD, f"{where}: identifier {row['identifier']!r} is not split-set-pair-sentence")
    label = parse_label(row["label"])
    if label is None:
        return Skip(BAD_LABEL, f"{where}: label {row['label']!r} is not True/False")
    sentence = check_text(row["sentence"], "sentence")
    if isinstance(sentence, Skip):
        return Skip(sentence.reason, f"{where}: {sentence.detail}")
    images = {f"img{i}.jpg": find_image(image_root, row.get("directory"), n) for i, n in enumerate(names)}
    meta = {"identifier": row["identifier"], "sentence": sentence, "label": label,
            "images": [os.path.basename(n) for n in names]}
    return Record(images=images, text=sentence, meta=meta)


def nlvr2_items(path: str, image_root: str) -> Iterator[ReaderItem]:
    name = os.path.basename(path)
    for line, row in iter_jsonl(path):
        yield nlvr2_record(row, image_root=image_root, where=f"{name}:{line}")


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"{args.input}: NLVR2 JSON lines file not found")
    with make_writer(args, task="nlvr2", fields=["img0.jpg", "img1.jpg", "txt", "json"]) as writer:
        writer.write_split(args.split, nlvr2_items(args.input, args.image_root))
        writer.finish()
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("nlvr2", help="NLVR2 JSON lines -> paired-image shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="NLVR2 train.json / dev.json / test1.json (JSON lines)")
    p.add_argument("--image-root", required=True, help="images folder of that split")
    p.add_argument("--split", default="train", help="split name of the output (default %(default)s)")
    add_output_options(p)
    p.set_defaults(func=run)
