"""`data_prep pairs`: image-text pairs from a table, an image folder or existing shards.

    python -m data_prep pairs --input pairs.jsonl --image-root images/ --output out/pairs
    python -m data_prep pairs --input captions.csv --caption-column text --output out/pairs --workers 4
    python -m data_prep pairs --input table.parquet --output out/pairs    # image column: path or bytes
    python -m data_prep pairs --input imagefolder/ --output out/pairs     # with imagefolder/metadata.jsonl
    python -m data_prep pairs --input img2dataset_out/ --output out/pairs --image-size 224   # re-shard

Tables (JSONL, CSV, TSV, parquet): column --image-column (default "image": a path relative to
--image-root, raw bytes, or a {"bytes", "path"} struct) and --caption-column (default "caption").
An image folder holds `metadata.jsonl` (or .csv) with a `file_name` column, as HF `imagefolder`.
A folder of .tar files (img2dataset / webdataset) is read sample by sample: image + `.txt` caption.
"""
from __future__ import annotations

import argparse
import glob
import os
import tarfile
from typing import Any, Iterator

from data_prep.cli_common import add_output_options, make_writer
from data_prep.records import (DUPLICATE_KEY, MISSING_FIELD, InputFormatError, ReaderItem, Record, Skip, check_text,
                               media_source)
from data_prep.shards import iter_tar_samples
from data_prep.tables import iter_rows

SOURCE_ID_COLUMNS = ("id", "key", "url", "image_id", "sha256")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def image_source(value: Any, image_root: str) -> str | bytes | Skip:
    """A table cell as an image source: a path (joined to image_root), bytes, or an HF image struct."""
    return media_source(value, image_root, "image")


def pair_record(row: dict, *, image_column: str, caption_column: str, image_root: str,
                where: str) -> ReaderItem:
    """A table row -> Record(jpg, txt=caption, json={caption, source ids}) or the Skip saying why not."""
    if image_column not in row or row[image_column] is None:
        return Skip(MISSING_FIELD, f"{where}: no {image_column!r}")
    if caption_column not in row:
        return Skip(MISSING_FIELD, f"{where}: no {caption_column!r}")
    caption = check_text(row[caption_column], caption_column)
    if isinstance(caption, Skip):
        return Skip(caption.reason, f"{where}: {caption.detail}")
    source = image_source(row[image_column], image_root)
    if isinstance(source, Skip):
        return Skip(source.reason, f"{where}: {source.detail}")
    meta = {"caption": caption, "source": where}
    meta.update({c: row[c] for c in SOURCE_ID_COLUMNS if isinstance(row.get(c), (str, int))})
    if isinstance(row[image_column], str):
        meta["image"] = row[image_column]
    return Record(images={"jpg": source}, text=caption, meta=meta)


def table_items(path: str, image_column: str, caption_column: str, image_root: str) -> Iterator[ReaderItem]:
    name = os.path.basename(path)
    for line, row in iter_rows(path, required=(image_column, caption_column)):
        yield pair_record(row, image_column=image_column, caption_column=caption_column, image_root=image_root,
                          where=f"{name}:{line}")


def shard_sample_record(fields: dict[str, bytes], where: str) -> ReaderItem:
    """An img2dataset / webdataset sample -> Record (image bytes + .txt caption) or Skip."""
    image = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
    if image is None:
        return Skip(MISSING_FIELD, f"{where}: no image ({'/'.join(IMAGE_EXTS)})")
    if "txt" not in fields:
        return Skip(MISSING_FIELD, f"{where}: no .txt caption")
    caption = check_text(fields["txt"], "txt")
    if isinstance(caption, Skip):
        return Skip(caption.reason, f"{where}: {caption.detail}")
    return Record(images={"jpg": image}, text=caption, meta={"caption": caption, "source": where})


def shard_items(paths: list[str]) -> Iterator[ReaderItem]:
    """Samples of webdataset tars; a key seen before in the same tar is skipped as duplicate_key."""
    for path in paths:
        name = os.path.basename(path)
        seen: set[str] = set()
        try:
            for key, fields in iter_tar_samples(path):
                if key in seen:
                    yield Skip(DUPLICATE_KEY, f"{name}/{key}: key seen before in this tar; the first is kept")
                    continue
                seen.add(key)
                yield shard_sample_record(fields, f"{name}/{key}")
        except (tarfile.TarError, OSError) as exc:
            raise InputFormatError(path, None, f"unreadable tar ({exc}); expected webdataset shards") from None


def resolve_input(args: argparse.Namespace) -> tuple[str, Iterator[ReaderItem]]:
    """(kind, items) for --input: a table file, a .tar, a folder of tars, or an image folder."""
    path = args.input
    if os.path.isfile(path) and path.endswith(".tar"):
        return "shards", shard_items([path])
    if os.path.isfile(path):
        root = args.image_root or os.path.dirname(os.path.abspath(path))
        return "table", table_items(path, args.image_column, args.caption_column, root)
    if not os.path.isdir(path):
        raise InputFormatError(path, None, "not found; expected a table file, a .tar or a folder")
    tars = sorted(glob.glob(os.path.join(path, "*.tar")))
    if tars:
        return "shards", shard_items(tars)
    for meta in METADATA_FILES:
        if os.path.isfile(os.path.join(path, meta)):
            image_column = args.image_column if args.image_column != "image" else "file_name"
            return "imagefolder", table_items(os.path.join(path, meta), image_column, args.caption_column,
                                              args.image_root or path)
    raise InputFormatError(path, None, f"folder has neither .tar shards nor {' / '.join(METADATA_FILES)}")


def run(args: argparse.Namespace) -> int:
    _, items = resolve_input(args)
    with make_writer(args, task="pairs", fields=["jpg", "txt", "json"]) as writer:
        writer.write_split(args.split, items)
        writer.finish()
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pairs", help="image-text pairs from tables, image folders or shards",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL/CSV/TSV/parquet file, .tar, folder of tars, "
                                                  "or image folder with metadata.jsonl")
    p.add_argument("--image-root", default=None, help="base of relative image paths (default: next to --input)")
    p.add_argument("--image-column", default="image", help="image path/bytes column (default %(default)s; "
                                                           "file_name for image folders)")
    p.add_argument("--caption-column", default="caption", help="caption column (default %(default)s)")
    p.add_argument("--split", default="train", help="split name of the output (default %(default)s)")
    add_output_options(p)
    p.set_defaults(func=run)
