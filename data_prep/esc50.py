r"""`data_prep esc50`: ESC-50 (or an ESC-50-style CSV) -> audio-classification shards + classes.json.

    python -m data_prep esc50 --input ESC-50-master --output out/esc50                 # train 1-4, test 5
    python -m data_prep esc50 --input ESC-50-master --folds train=2,3,4,5 test=1 --output out/esc50_f1

Expected files: INPUT/meta/esc50.csv with the header `filename,fold,target,category,...` (ESC-50 adds
esc10,src_file,take) and the clips in INPUT/audio/ (or --meta / --audio-root). `fold` and `target` are
integers; every row of a target must name the same category. --folds maps output splits to folds
(5-fold cross-validation: one output folder per held-out fold). classes.json = {"classes": [category of
target 0, 1, ...]} from the whole CSV, written on every run. One sample per clip: flac, cls = target
(text), json = {label, label_name, filename, fold, esc10?, src_file?, take?}.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterator

from data_prep.cli_common import add_audio_options, add_output_options, make_writer
from data_prep.records import InputFormatError, ReaderItem, Record
from data_prep.tables import iter_rows

COLUMNS = ("filename", "fold", "target", "category")
EXTRA_COLUMNS = ("esc10", "src_file", "take")
DEFAULT_FOLDS = ("train=1,2,3,4", "test=5")


def parse_folds(specs: list[str]) -> dict[str, set[int]]:
    """["train=1,2,3,4", "test=5"] -> {"train": {1, 2, 3, 4}, "test": {5}}; a fold in two splits is an error."""
    splits: dict[str, set[int]] = {}
    for spec in specs:
        split, _, folds = spec.partition("=")
        try:
            numbers = {int(f) for f in folds.split(",")}
        except ValueError:
            numbers = set()
        if not split or not numbers:
            raise ValueError(f"--folds {spec!r}: expected SPLIT=FOLD[,FOLD...], e.g. train=1,2,3,4 test=5")
        taken = {f for other in splits.values() for f in other} & numbers
        if split in splits or taken:
            raise ValueError(f"--folds {' '.join(specs)}: every split and every fold may appear once")
        splits[split] = numbers
    return splits


def read_meta(path: str) -> tuple[list[tuple[int, dict]], list[str]]:
    """(rows with int fold/target, class names by target); a malformed row stops with file:line."""
    rows, names = [], {}
    for line, row in iter_rows(path, required=COLUMNS):
        try:
            row["fold"], row["target"] = int(row["fold"]), int(row["target"])
        except ValueError:
            raise InputFormatError(path, line, f"fold {row['fold']!r} and target {row['target']!r} must be "
                                               f"integers") from None
        category = row["category"].strip()
        if row["target"] < 0 or names.setdefault(row["target"], category) != category:
            raise InputFormatError(path, line, f"target {row['target']} is category {category!r} here but "
                                               f"{names.get(row['target'])!r} before (targets must be >= 0, "
                                               f"one category each)")
        rows.append((line, row))
    missing = sorted(set(range(max(names, default=-1) + 1)) - set(names))
    if missing:
        raise InputFormatError(path, None, f"targets {missing} have no row; targets must be 0..N-1")
    return rows, [names[t] for t in range(len(names))]


def esc50_record(row: dict, audio_root: str, where: str) -> ReaderItem:
    meta = {"label": row["target"], "label_name": row["category"].strip(), "filename": row["filename"],
            "fold": row["fold"], "source": where}
    meta.update({c: row[c] for c in EXTRA_COLUMNS if c in row})
    return Record(audio={"flac": os.path.join(audio_root, row["filename"])}, extra={"cls": str(row["target"])},
                  meta=meta)


def fold_items(rows: list[tuple[int, dict]], folds: set[int], audio_root: str, name: str) -> Iterator[ReaderItem]:
    for line, row in rows:
        if row["fold"] in folds:
            yield esc50_record(row, audio_root, f"{name}:{line}")


def run(args: argparse.Namespace) -> int:
    splits = parse_folds(args.folds)
    meta = args.meta or os.path.join(args.input, "meta", "esc50.csv")
    audio_root = args.audio_root or os.path.join(args.input, "audio")
    if not os.path.isdir(audio_root):
        raise FileNotFoundError(f"{audio_root}: not a folder; pass --input ESC-50-master (the folder holding "
                                f"meta/esc50.csv and audio/), or --meta and --audio-root")
    rows, classes = read_meta(meta)
    present = {row["fold"] for _, row in rows}
    for split, folds in splits.items():
        if not folds & present:
            raise ValueError(f"--folds {split}={','.join(map(str, sorted(folds)))}: {meta} has folds "
                             f"{sorted(present)} only")
    with make_writer(args, task="audio_classification", fields=["flac", "cls", "json"]) as writer:
        for split, folds in splits.items():
            writer.write_split(split, fold_items(rows, folds, audio_root, os.path.basename(meta)),
                               total=sum(row["fold"] in folds for _, row in rows))
        writer.finish({"classes": ("classes.json", {"classes": classes})})
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("esc50", help="ESC-50-style CSV + clips -> audio classification shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=".", help="the ESC-50 folder (holding meta/esc50.csv and audio/)")
    p.add_argument("--meta", default=None, help="the CSV (default INPUT/meta/esc50.csv)")
    p.add_argument("--audio-root", default=None, help="folder of the clips (default INPUT/audio)")
    p.add_argument("--folds", nargs="+", default=list(DEFAULT_FOLDS), metavar="SPLIT=FOLDS",
                   help="output splits and their folds (default %(default)s)")
    add_output_options(p, images=False)
    add_audio_options(p)
    p.set_defaults(func=run)
