r"""`data_prep audiocaps`: AudioCaps CSV + clips already on disk -> audio-text retrieval shards.

    python -m data_prep audiocaps --captions test.csv --audio-root audiocaps/test --output out/audiocaps
    python -m data_prep audiocaps --captions train.csv --audio-root audiocaps/train --name-by audiocap_id \
        --output out/audiocaps

Expected files: `train.csv` / `val.csv` / `test.csv` with the header `audiocap_id,youtube_id,start_time,caption`,
and the clips you fetched, directly in --audio-root. Clips are looked up by name without extension (any of
.wav .flac .ogg .mp3 ...): with --name-by youtube_id (the default) as `{youtube_id}` or `Y{youtube_id}`, with
--name-by audiocap_id as `{audiocap_id}` (any audiocap_id of the clip's rows). Rows are grouped by
youtube_id (val/test have 5 captions per clip, train 1), in order of first appearance. The output split is
the CSV name (train, val, test; --split overrides). One sample per clip: flac, txt = first caption,
json = {audio_id, youtube_id, audiocap_ids, start_time, captions}. A clip not on disk is missing_file.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterator

from data_prep.audio_files import AudioFolder, usable_captions
from data_prep.cli_common import add_audio_options, add_output_options, make_writer
from data_prep.clotho import AUDIO_TASK_FIELDS
from data_prep.records import EMPTY_CAPTION, MISSING_FILE, ReaderItem, Record, Skip
from data_prep.tables import iter_rows

COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
NAME_BY = ("youtube_id", "audiocap_id")
KNOWN_SPLITS = ("train", "val", "test")


def group_rows(path: str) -> list[tuple[str, list[tuple[int, dict]]]]:
    """[(youtube_id, [(line, row), ...])] in order of first appearance."""
    groups: dict[str, list[tuple[int, dict]]] = {}
    for line, row in iter_rows(path, required=COLUMNS):
        groups.setdefault(row["youtube_id"].strip(), []).append((line, row))
    return list(groups.items())


def clip_record(youtube_id: str, rows: list[tuple[int, dict]], folder: AudioFolder, name_by: str,
                where: str) -> ReaderItem:
    audiocap_ids = [row["audiocap_id"].strip() for _, row in rows]
    names = (youtube_id, f"Y{youtube_id}") if name_by == "youtube_id" else tuple(audiocap_ids)
    captions = usable_captions([row["caption"] for _, row in rows], "caption")
    if not captions:
        return Skip(EMPTY_CAPTION, f"{where}: clip {youtube_id}: no usable caption")
    path = folder.find(*names)
    if path is None:
        return Skip(MISSING_FILE, f"{where}: no clip named {' or '.join(names[:2])}"
                                  f"{' ...' if len(names) > 2 else ''} (any audio extension) in {folder.root}")
    meta = {"audio_id": os.path.basename(path), "youtube_id": youtube_id, "audiocap_ids": audiocap_ids,
            "start_time": rows[0][1]["start_time"].strip(), "captions": captions, "source": where}
    return Record(audio={"flac": path}, text=captions[0], meta=meta)


def audiocaps_items(path: str, folder: AudioFolder, name_by: str) -> Iterator[ReaderItem]:
    name = os.path.basename(path)
    for youtube_id, rows in group_rows(path):
        yield clip_record(youtube_id, rows, folder, name_by, f"{name}:{rows[0][0]}")


def run(args: argparse.Namespace) -> int:
    folder = AudioFolder(args.audio_root)
    stem = os.path.splitext(os.path.basename(args.captions))[0]
    split = args.split or (stem if stem in KNOWN_SPLITS else "train")
    with make_writer(args, task="audio_retrieval", fields=AUDIO_TASK_FIELDS) as writer:
        writer.write_split(split, audiocaps_items(args.captions, folder, args.name_by))
        writer.finish()
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("audiocaps", help="AudioCaps CSV + clips on disk -> audio retrieval shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True, help="AudioCaps train.csv / val.csv / test.csv")
    p.add_argument("--audio-root", required=True, help="folder holding the clips")
    p.add_argument("--name-by", choices=NAME_BY, default="youtube_id",
                   help="how the clip files are named: {youtube_id} or Y{youtube_id}, or {audiocap_id} "
                        "(default %(default)s)")
    p.add_argument("--split", default=None, help="output split (default: the CSV name if train/val/test, "
                                                 "else train)")
    add_output_options(p, images=False)
    add_audio_options(p)
    p.set_defaults(func=run)
