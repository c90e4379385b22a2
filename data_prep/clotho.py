r"""`data_prep clotho`: Clotho (v2) captions CSV + its WAV folder -> audio-text retrieval shards.

    python -m data_prep clotho --captions clotho_captions_development.csv --audio-root development \
        --output out/clotho                                    # split train
    python -m data_prep clotho --captions clotho_captions_evaluation.csv --audio-root evaluation \
        --output out/clotho                                    # split test, same folder

Expected files: `clotho_captions_{split}.csv` with the header `file_name,caption_1,...,caption_5`
(captions are quoted and may contain commas) and a folder holding the clips named in `file_name`.
The output split follows the CSV name: development -> train, validation -> val, evaluation -> test
(--split overrides). One sample per clip: flac, txt = caption_1, json = {audio_id, file_name,
captions: [the 5 captions]}. Empty captions are dropped; a clip without any is skipped (empty_caption).
A --audio-root holding none of the CSV's clips stops and names the subfolder that holds them (e.g. development/).
"""
from __future__ import annotations

import argparse
import os
from typing import Iterator

from data_prep.audio_files import usable_captions
from data_prep.cli_common import add_audio_options, add_output_options, make_writer
from data_prep.records import EMPTY_CAPTION, ReaderItem, Record, Skip
from data_prep.tables import iter_rows

CAPTION_COLUMNS = tuple(f"caption_{i}" for i in range(1, 6))
CLOTHO_SPLITS = {"development": "train", "validation": "val", "evaluation": "test"}
AUDIO_TASK_FIELDS = ["flac", "txt", "json"]


def default_split(captions_csv: str) -> str:
    """The output split named by a `clotho_captions_{split}.csv` file (train when the name says nothing)."""
    stem = os.path.splitext(os.path.basename(captions_csv))[0]
    return CLOTHO_SPLITS.get(stem.rsplit("_", 1)[-1], "train")


def clotho_record(row: dict, audio_root: str, where: str) -> ReaderItem:
    file_name = row["file_name"].strip()
    captions = usable_captions([row[c] for c in CAPTION_COLUMNS], "caption")
    if not captions:
        return Skip(EMPTY_CAPTION, f"{where}: {file_name}: no usable caption")
    meta = {"audio_id": file_name, "file_name": file_name, "captions": captions, "source": where}
    return Record(audio={"flac": os.path.join(audio_root, file_name)}, text=captions[0], meta=meta)


def clotho_items(rows: list[tuple[int, dict]], name: str, audio_root: str) -> Iterator[ReaderItem]:
    for line, row in rows:
        yield clotho_record(row, audio_root, f"{name}:{line}")


def check_audio_root(rows: list[tuple[int, dict]], captions_csv: str, audio_root: str) -> None:
    """Stop with what to pass when --audio-root holds none of the clips (e.g. the folder above development/)."""
    names = [row["file_name"].strip() for _, row in rows]
    if not names or any(os.path.isfile(os.path.join(audio_root, n)) for n in names):
        return
    below = sorted(d.path for d in os.scandir(audio_root)
                   if d.is_dir() and any(os.path.isfile(os.path.join(d.path, n)) for n in names[:100]))
    hint = f"; they are in {below[0]}: pass --audio-root {below[0]}" if below else (
        "; pass the folder that clotho_audio_<split>.7z extracts to: development/, validation/ or evaluation/")
    raise FileNotFoundError(f"--audio-root {audio_root} holds none of the {len(names)} clips named in "
                            f"{os.path.basename(captions_csv)} (e.g. {names[0]!r}){hint}")


def run(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.audio_root):
        raise FileNotFoundError(f"--audio-root {args.audio_root}: not a folder")
    split = args.split or default_split(args.captions)
    rows = list(iter_rows(args.captions, ("file_name", *CAPTION_COLUMNS)))
    check_audio_root(rows, args.captions, args.audio_root)
    with make_writer(args, task="audio_retrieval", fields=AUDIO_TASK_FIELDS) as writer:
        writer.write_split(split, clotho_items(rows, os.path.basename(args.captions), args.audio_root),
                           total=len(rows))
        writer.finish()
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("clotho", help="Clotho captions CSV + WAV folder -> audio retrieval shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True, help="clotho_captions_{development,validation,evaluation}.csv")
    p.add_argument("--audio-root", required=True, help="folder holding the clips named in file_name")
    p.add_argument("--split", default=None, help="output split (default: from the CSV name: development -> "
                                                 "train, validation -> val, evaluation -> test)")
    add_output_options(p, images=False)
    add_audio_options(p)
    p.set_defaults(func=run)
