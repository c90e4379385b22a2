"""`data_prep classify`: image-classification shards from class folders or a table; writes classes.json.

    python -m data_prep classify --input imagenette/ --output out/cls        # DIR/<class>/<image>
    python -m data_prep classify --input imagenette/ --output out/cls        # DIR/<split>/<class>/<image>
    python -m data_prep classify --input labels.csv --image-root imgs --label-column label --output out/cls

Classes are the sorted class-folder names (or sorted distinct label values; integer labels are used
as they are). Each sample: jpg, cls = label index (text), json = {label, label_name, file}.
classes.json = {"classes": [names in label order]}.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterator

from data_prep.cli_common import add_output_options, make_writer
from data_prep.pairs import image_source
from data_prep.records import BAD_LABEL, MISSING_FIELD, ReaderItem, Record, Skip
from data_prep.tables import iter_rows

SPLIT_NAMES = ("train", "val", "validation", "test")
HIDDEN = (".", "_")


def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith(HIDDEN))


def _files(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)) and not f.startswith(HIDDEN))


def folder_splits(root: str, default_split: str) -> dict[str, str]:
    """{split: folder of class folders}: DIR/<split>/<class>/ when every subfolder is a split name."""
    subdirs = _subdirs(root)
    if subdirs and all(d in SPLIT_NAMES for d in subdirs):
        return {d: os.path.join(root, d) for d in subdirs}
    return {default_split: root}


def folder_items(class_root: str, classes: list[str]) -> Iterator[ReaderItem]:
    for label, name in enumerate(classes):
        folder = os.path.join(class_root, name)
        if not os.path.isdir(folder):
            continue
        for file in _files(folder):
            rel = f"{name}/{file}"
            yield Record(images={"jpg": os.path.join(folder, file)}, extra={"cls": str(label)},
                         meta={"label": label, "label_name": name, "file": rel})


def table_labels(rows: list, label_column: str) -> list[str]:
    """Class names: str(i) for 0..max when every label is an int, else sorted distinct strings."""
    values = [row.get(label_column) for _, row in rows]
    values = [v for v in values if v is not None and v != ""]
    if values and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return [str(i) for i in range(max(values) + 1)]
    return sorted({str(v).strip() for v in values})


def table_record(row: dict, *, image_column: str, label_column: str, image_root: str, classes: list[str],
                 where: str) -> ReaderItem:
    if row.get(image_column) is None:
        return Skip(MISSING_FIELD, f"{where}: no {image_column!r}")
    value = row.get(label_column)
    if value is None or value == "":
        return Skip(MISSING_FIELD, f"{where}: no {label_column!r}")
    name = str(value).strip()
    if name not in classes:
        return Skip(BAD_LABEL, f"{where}: label {value!r} not in classes")
    source = image_source(row[image_column], image_root)
    if isinstance(source, Skip):
        return Skip(source.reason, f"{where}: {source.detail}")
    label = classes.index(name)
    meta = {"label": label, "label_name": name, "source": where}
    if isinstance(row[image_column], str):
        meta["file"] = row[image_column]
    return Record(images={"jpg": source}, extra={"cls": str(label)}, meta=meta)


def run(args: argparse.Namespace) -> int:
    if os.path.isdir(args.input):
        splits = folder_splits(args.input, args.split)
        classes = sorted({c for root in splits.values() for c in _subdirs(root)})
        if not classes:
            raise ValueError(f"{args.input}: no class folders; expected DIR/<class>/<image> or "
                             f"DIR/<split>/<class>/<image>")
        plan = {split: folder_items(root, classes) for split, root in splits.items()}
    else:
        rows = list(iter_rows(args.input, required=(args.image_column, args.label_column)))
        classes = table_labels(rows, args.label_column)
        root = args.image_root or os.path.dirname(os.path.abspath(args.input))
        name = os.path.basename(args.input)
        plan = {args.split: (table_record(row, image_column=args.image_column, label_column=args.label_column,
                                          image_root=root, classes=classes, where=f"{name}:{line}")
                             for line, row in rows)}
    with make_writer(args, task="classification", fields=["jpg", "cls", "json"]) as writer:
        for split, items in plan.items():
            writer.write_split(split, items)
        writer.finish({"classes": ("classes.json", {"classes": classes})})
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("classify", help="image classification shards from class folders or a table",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of class folders, or a JSONL/CSV/parquet table")
    p.add_argument("--image-root", default=None, help="base of relative image paths (tables)")
    p.add_argument("--image-column", default="image", help="table image column (default %(default)s)")
    p.add_argument("--label-column", default="label", help="table label column (default %(default)s)")
    p.add_argument("--split", default="train", help="split name when the input has none (default %(default)s)")
    add_output_options(p)
    p.set_defaults(func=run)
