r"""`data_prep snli_ve`: SNLI-VE JSON lines + Flickr30k images -> visual-entailment shards + classes.json.

    python -m data_prep snli_ve --input snli_ve_train.jsonl --image-root flickr30k-images \
        --output out/snli_ve --split train

Input lines: "Flikr30kID" (sic, e.g. "3416050480.jpg"; ".jpg" is added when it has no extension),
"sentence2" (the hypothesis), "gold_label" (entailment | neutral | contradiction; others, e.g. "-", are
skipped as bad_label), "pairID", optional "sentence1" (the premise caption) and "captionID".
Each sample: jpg, txt = hypothesis, json = {pair_id, image_id (the file name without extension),
hypothesis, premise ("" when absent), label (0 entailment, 1 neutral, 2 contradiction), label_name}.
classes.json = {"classes": ["entailment", "neutral", "contradiction"]}.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterator

from data_prep.cli_common import add_output_options, make_writer
from data_prep.records import BAD_LABEL, MISSING_FIELD, ReaderItem, Record, Skip, check_text
from data_prep.tables import iter_jsonl

CLASSES = ["entailment", "neutral", "contradiction"]
IMAGE_FIELDS = ("Flikr30kID", "Flickr30kID")  # the official files spell it "Flikr30kID"


def snli_ve_record(row: dict, *, image_root: str, where: str) -> ReaderItem:
    """One SNLI-VE line -> Record(jpg, txt, json), or the Skip saying why not."""
    image = next((row[f] for f in IMAGE_FIELDS if row.get(f) not in (None, "")), None)
    missing = [k for k, v in (("Flikr30kID", image), ("sentence2", row.get("sentence2")),
                              ("gold_label", row.get("gold_label")), ("pairID", row.get("pairID"))) if v is None]
    if missing:
        return Skip(MISSING_FIELD, f"{where}: lacks {missing}")
    label_name = str(row["gold_label"]).strip()
    if label_name not in CLASSES:
        return Skip(BAD_LABEL, f"{where}: gold_label {row['gold_label']!r} is not one of {CLASSES}")
    hypothesis = check_text(row["sentence2"], "sentence2")
    if isinstance(hypothesis, Skip):
        return Skip(hypothesis.reason, f"{where}: {hypothesis.detail}")
    premise = check_text(row.get("sentence1"), "sentence1")
    file_name = str(image).strip()
    stem, ext = os.path.splitext(file_name)
    meta = {"pair_id": str(row["pairID"]), "image_id": stem, "hypothesis": hypothesis,
            "premise": premise if isinstance(premise, str) else "", "label": CLASSES.index(label_name),
            "label_name": label_name}
    path = os.path.join(image_root, file_name if ext else f"{file_name}.jpg")
    return Record(images={"jpg": path}, text=hypothesis, meta=meta)


def snli_ve_items(path: str, image_root: str) -> Iterator[ReaderItem]:
    name = os.path.basename(path)
    for line, row in iter_jsonl(path):
        yield snli_ve_record(row, image_root=image_root, where=f"{name}:{line}")


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"{args.input}: SNLI-VE JSON lines file not found (snli_ve_{{train,dev,test}}.jsonl)")
    with make_writer(args, task="snli_ve", fields=["jpg", "txt", "json"]) as writer:
        writer.write_split(args.split, snli_ve_items(args.input, args.image_root))
        writer.finish({"classes": ("classes.json", {"classes": CLASSES})})
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("snli_ve", help="SNLI-VE JSON lines -> visual entailment shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="snli_ve_{train,dev,test}.jsonl")
    p.add_argument("--image-root", required=True, help="folder of the Flickr30k images")
    p.add_argument("--split", default="train", help="split name of the output (default %(default)s)")
    add_output_options(p)
    p.set_defaults(func=run)
