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
json = {audio_id, youtube_id, audiocap_ids, start_time, captions}. A clip not on disk is missing_file (the
message says when the other --name-by would find it); one only in a format soundfile cannot read (.m4a,
.webm: convert them, e.g. with ffmpeg) is unreadable_audio. audiocaps-download names clips {audiocap_id}.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterator

from data_prep.audio_files import AudioFolder, not_audio_skip, usable_captions
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


def clip_names(youtube_id: str, audiocap_ids: list[str], name_by: str) -> tuple[str, ...]:
    return (youtube_id, f"Y{youtube_id}") if name_by == "youtube_id" else tuple(audiocap_ids)


def missing_clip(youtube_id: str, audiocap_ids: list[str], folder: AudioFolder, name_by: str, where: str) -> Skip:
    """Why the clip is not found: a format soundfile cannot read, the other --name-by, or simply not there."""
    names = clip_names(youtube_id, audiocap_ids, name_by)
    unreadable = folder.unreadable(*names)
    if unreadable is not None:
        return not_audio_skip(unreadable, where)
    other = NAME_BY[1 - NAME_BY.index(name_by)]
    there = folder.find(*clip_names(youtube_id, audiocap_ids, other))
    hint = f"; {os.path.basename(there)} is there: pass --name-by {other}" if there else ""
    return Skip(MISSING_FILE, f"{where}: no clip named {' or '.join(names[:2])}{' ...' if len(names) > 2 else ''} "
                              f"(any audio extension) in {folder.root}{hint}")


def clip_record(youtube_id: str, rows: list[tuple[int, dict]], folder: AudioFolder, name_by: str,
                where: str) -> ReaderItem:
    audiocap_ids = [row["audiocap_id"].strip() for _, row in rows]
    captions = usable_captions([row["caption"] for _, row in rows], "caption")
    if not captions:
        return Skip(EMPTY_CAPTION, f"{where}: clip {youtube_id}: no usable caption")
    path = folder.find(*clip_names(youtube_id, audiocap_ids, name_by))
    if path is None:
        return missing_clip(youtube_id, audiocap_ids, folder, name_by, where)
    meta = {"audio_id": os.path.basename(path), "youtube_id": youtube_id, "audiocap_ids": audiocap_ids,
            "start_time": rows[0][1]["start_time"].strip(), "captions": captions, "source": where}
    return Record(audio={"flac": path}, text=captions[0], meta=meta)


def audiocaps_items(groups: list[tuple[str, list[tuple[int, dict]]]], name: str, folder: AudioFolder,
                    name_by: str) -> Iterator[ReaderItem]:
    for youtube_id, rows in groups:
        yield clip_record(youtube_id, rows, folder, name_by, f"{name}:{rows[0][0]}")


def run(args: argparse.Namespace) -> int:
    folder = AudioFolder(args.audio_root)
    stem = os.path.splitext(os.path.basename(args.captions))[0]
    split = args.split or (stem if stem in KNOWN_SPLITS else "train")
    groups = group_rows(args.captions)
    with make_writer(args, task="audio_retrieval", fields=AUDIO_TASK_FIELDS) as writer:
        writer.write_split(split, audiocaps_items(groups, os.path.basename(args.captions), folder, args.name_by),
                           total=len(groups))
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
