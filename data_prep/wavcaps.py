r"""`data_prep wavcaps`: a WavCaps per-source JSON + its audio folder -> audio-text pair shards.

    python -m data_prep wavcaps --input json_files/SoundBible/sb_final.json --audio-root SoundBible_flac \
        --output out/wavcaps --split soundbible

Expected files: one WavCaps JSON (FreeSound, BBC Sound Effects, SoundBible or AudioSet_SL) of the form
{"data": [{"id", "caption", "file_name"? / "audio"?, "duration"?, ...}, ...]} and the folder of its clips
(WavCaps ships FLAC). A clip is found by the base name of "file_name" or "audio" when present, else by
"id" as a file name or as a name without extension. One sample per entry: flac, txt = caption,
json = {id, caption, file, source}.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterator

from data_prep.audio_files import AudioFolder, not_audio_skip
from data_prep.cli_common import add_audio_options, add_output_options, make_writer
from data_prep.clotho import AUDIO_TASK_FIELDS
from data_prep.jsonio import load_json_file, require_list
from data_prep.records import MISSING_FIELD, MISSING_FILE, ReaderItem, Record, Skip, check_text

WAVCAPS_SHAPE = '{"data": [{"id", "caption", "file_name"? or "audio"?, "duration"?, ...}, ...]}'


def clip_names(entry: dict) -> list[str]:
    """File names to look for, best first: the base names of file_name / audio, then the id."""
    names = [os.path.basename(entry[k]) for k in ("file_name", "audio") if isinstance(entry.get(k), str)]
    if isinstance(entry.get("id"), (str, int)) and not isinstance(entry.get("id"), bool):
        ident = str(entry["id"])
        names += [ident, os.path.splitext(ident)[0]]
    return [n for n in names if n]


def wavcaps_record(entry, folder: AudioFolder, where: str) -> ReaderItem:
    if not isinstance(entry, dict) or "id" not in entry:
        return Skip(MISSING_FIELD, f"{where}: expected an object with 'id' and 'caption'")
    caption = check_text(entry.get("caption"), "caption")
    if isinstance(caption, Skip):
        return Skip(caption.reason, f"{where}: {caption.detail}")
    names = clip_names(entry)
    path = folder.find(*names)
    if path is None and folder.unreadable(*names):
        return not_audio_skip(folder.unreadable(*names), where)
    if path is None:
        return Skip(MISSING_FILE, f"{where}: no clip named {' or '.join(dict.fromkeys(names))} in {folder.root}")
    meta = {"id": entry["id"], "caption": caption, "file": os.path.basename(path), "source": where}
    return Record(audio={"flac": path}, text=caption, meta=meta)


def wavcaps_items(entries: list, name: str, folder: AudioFolder) -> Iterator[ReaderItem]:
    for i, entry in enumerate(entries):
        yield wavcaps_record(entry, folder, f"{name}: data[{i}]")


def run(args: argparse.Namespace) -> int:
    folder = AudioFolder(args.audio_root)
    entries = require_list(load_json_file(args.input, WAVCAPS_SHAPE), args.input, "data", WAVCAPS_SHAPE)
    with make_writer(args, task="audio_pairs", fields=AUDIO_TASK_FIELDS) as writer:
        writer.write_split(args.split, wavcaps_items(entries, os.path.basename(args.input), folder),
                           total=len(entries))
        writer.finish()
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("wavcaps", help="WavCaps JSON + audio folder -> audio-text pair shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="one WavCaps JSON ({\"data\": [...]})")
    p.add_argument("--audio-root", required=True, help="folder holding that source's clips")
    p.add_argument("--split", default="train", help="output split (default %(default)s)")
    add_output_options(p, images=False)
    add_audio_options(p)
    p.set_defaults(func=run)
