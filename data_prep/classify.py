"""`data_prep classify`: image-classification shards from class folders or a table; writes classes.json.

    python -m data_prep classify --input imagenette/ --output out/cls        # DIR/<class>/<image>
    python -m data_prep classify --input imagenette/ --output out/cls        # DIR/<split>/<class>/<image>
    python -m data_prep classify --input labels.csv --image-root imgs --label-column label --output out/cls

Classes are the sorted class-folder names of the train split that hold a usable image (or sorted
distinct label values; integer labels are used as they are). Each sample: jpg, cls = label index (text),
json = {label, label_name, file}. classes.json = {"classes": [names in label order]}, written with the
train split; another split written alone uses the folder's classes.json.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterator

from PIL import Image

from data_prep.cli_common import add_output_options, make_writer
from data_prep.folder_files import TRAIN_SPLIT, note_if_absent
from data_prep.manifest import read_json
from data_prep.pairs import image_source
from data_prep.records import BAD_LABEL, MISSING_FIELD, ReaderItem, Record, Skip
from data_prep.tables import iter_rows
from data_prep.writer import DatasetWriter

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


def has_usable_image(folder: str) -> bool:
    """Whether any file of `folder` opens as an image (header only; stops at the first that does)."""
    for file in _files(folder):
        try:
            with Image.open(os.path.join(folder, file)):
                return True
        except (OSError, ValueError, SyntaxError):
            continue
    return False


def folder_classes(roots: list[str], writer: DatasetWriter) -> list[str]:
    """Sorted class-folder names under `roots` that hold at least one usable image (the others get no id)."""
    names = sorted({c for root in roots for c in _subdirs(root)})
    usable = [n for n in names if any(has_usable_image(os.path.join(r, n)) for r in roots
                                      if os.path.isdir(os.path.join(r, n)))]
    if len(usable) < len(names):
        empty = ", ".join(n for n in names if n not in usable)
        writer.add_note(f"class folders without a usable image get no class id: {empty}")
    return usable


def folder_items(class_root: str, classes: list[str]) -> Iterator[ReaderItem]:
    for name in _subdirs(class_root):
        folder = os.path.join(class_root, name)
        for file in _files(folder):
            rel = f"{name}/{file}"
            if name not in classes:
                yield Skip(BAD_LABEL, f"{rel}: class folder {name!r} has no class id (classes: {classes[:5]}...)")
                continue
            label = classes.index(name)
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


def existing_classes(writer: DatasetWriter) -> list[str] | None:
    """The folder's classes.json (written with its train split), or None."""
    if "classes" not in writer.state.files:
        return None
    path = os.path.join(writer.out_dir, writer.state.files["classes"])
    classes = read_json(path).get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: expected {{'classes': [str, ...]}}")
    return classes


def plan_splits(args: argparse.Namespace, writer: DatasetWriter) -> tuple[list[str], dict[str, Iterator]]:
    """(classes, {split: items}): class ids come from the train split, else from the folder's classes.json."""
    kept = existing_classes(writer)
    if os.path.isdir(args.input):
        splits = folder_splits(args.input, args.split)
        if not any(_subdirs(root) for root in splits.values()):
            raise ValueError(f"{args.input}: no class folders; expected DIR/<class>/<image> or "
                             f"DIR/<split>/<class>/<image>")
        if TRAIN_SPLIT in splits:
            classes = folder_classes([splits[TRAIN_SPLIT]], writer)
        else:
            classes = kept or folder_classes(list(splits.values()), writer)
        return classes, {split: folder_items(root, classes) for split, root in splits.items()}
    rows = list(iter_rows(args.input, required=(args.image_column, args.label_column)))
    classes = table_labels(rows, args.label_column) if args.split == TRAIN_SPLIT or not kept else kept
    root = args.image_root or os.path.dirname(os.path.abspath(args.input))
    name = os.path.basename(args.input)
    return classes, {args.split: (table_record(row, image_column=args.image_column, label_column=args.label_column,
                                               image_root=root, classes=classes, where=f"{name}:{line}")
                                  for line, row in rows)}


def run(args: argparse.Namespace) -> int:
    with make_writer(args, task="classification", fields=["jpg", "cls", "json"]) as writer:
        classes, plan = plan_splits(args, writer)
        if not classes:
            raise ValueError(f"{args.input}: no class with a usable image or label")
        for split, items in plan.items():
            writer.write_split(split, items)
        if TRAIN_SPLIT in plan:
            writer.finish({"classes": ("classes.json", {"classes": classes})})
        else:
            note_if_absent(writer, "classes", "classes.json")
            writer.finish()
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
