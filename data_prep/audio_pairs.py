r"""`data_prep audio_pairs`: audio-text pairs from a JSONL / CSV / TSV / parquet table.

    python -m data_prep audio_pairs --input clips.jsonl --audio-root clips/ --output out/audio_pairs
    python -m data_prep audio_pairs --input table.parquet --audio-column audio --caption-column text \
        --output out/audio_pairs

Expected file: one row per clip with --audio-column (default "audio": a path relative to --audio-root,
raw file bytes, or a {"bytes", "path"} struct as written by HF `Audio(decode=False)`) and
--caption-column (default "caption": one caption, or in JSONL/parquet a list of captions). One sample
per row: flac, txt = (first) caption, json = {caption, captions (when the cell is a list), audio_path
(when a path), source, id/key columns when present}.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterator

from data_prep.audio_files import audio_source, usable_captions
from data_prep.cli_common import add_audio_options, add_output_options, make_writer
from data_prep.clotho import AUDIO_TASK_FIELDS
from data_prep.pairs import SOURCE_ID_COLUMNS
from data_prep.records import EMPTY_CAPTION, MISSING_FIELD, ReaderItem, Record, Skip, check_text
from data_prep.tables import iter_rows


def row_captions(value, column: str) -> list[str] | Skip:
    """A caption cell (text or a list of texts) as its usable captions, or the Skip saying why none."""
    if isinstance(value, (list, tuple)):
        captions = usable_captions(list(value), column)
        return captions or Skip(EMPTY_CAPTION, f"no usable caption in {column!r}")
    caption = check_text(value, column)
    return caption if isinstance(caption, Skip) else [caption]


def audio_pair_record(row: dict, *, audio_column: str, caption_column: str, audio_root: str,
                      where: str) -> ReaderItem:
    if row.get(audio_column) is None:
        return Skip(MISSING_FIELD, f"{where}: no {audio_column!r}")
    captions = row_captions(row.get(caption_column), caption_column)
    if isinstance(captions, Skip):
        return Skip(captions.reason, f"{where}: {captions.detail}")
    source = audio_source(row[audio_column], audio_root)
    if isinstance(source, Skip):
        return Skip(source.reason, f"{where}: {source.detail}")
    meta = {"caption": captions[0], "source": where}
    if isinstance(row[caption_column], (list, tuple)):
        meta["captions"] = captions
    if isinstance(row[audio_column], str):
        meta["audio_path"] = row[audio_column]
    meta.update({c: row[c] for c in SOURCE_ID_COLUMNS if isinstance(row.get(c), (str, int))})
    return Record(audio={"flac": source}, text=captions[0], meta=meta)


def table_items(path: str, audio_column: str, caption_column: str, audio_root: str) -> Iterator[ReaderItem]:
    name = os.path.basename(path)
    for line, row in iter_rows(path, required=(audio_column, caption_column)):
        yield audio_pair_record(row, audio_column=audio_column, caption_column=caption_column,
                                audio_root=audio_root, where=f"{name}:{line}")


def run(args: argparse.Namespace) -> int:
    root = args.audio_root or os.path.dirname(os.path.abspath(args.input))
    with make_writer(args, task="audio_pairs", fields=AUDIO_TASK_FIELDS) as writer:
        writer.write_split(args.split, table_items(args.input, args.audio_column, args.caption_column, root))
        writer.finish()
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("audio_pairs", help="audio-text pairs from a JSONL/CSV/parquet table",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL/CSV/TSV/parquet file")
    p.add_argument("--audio-root", default=None, help="base of relative audio paths (default: next to --input)")
    p.add_argument("--audio-column", default="audio", help="audio path/bytes column (default %(default)s)")
    p.add_argument("--caption-column", default="caption", help="caption(s) column (default %(default)s)")
    p.add_argument("--split", default="train", help="split name of the output (default %(default)s)")
    add_output_options(p, images=False)
    add_audio_options(p)
    p.set_defaults(func=run)
