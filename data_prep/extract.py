"""`data_prep extract DIR --split val --limit N --output OUT`: the first N samples of a split as plain files.

    python -m data_prep extract runs/demo/data/vqa --split val --limit 8 --output heldout
    python -m pipeline.predict --model exports/vqa --input heldout/samples.jsonl
    python -m pipeline.explain --model exports/vqa --image heldout/*.jpg --output explain

Writes OUT/<key>.<jpg|png|flac|...> (the shard's media bytes, unchanged) and OUT/samples.jsonl, one line per
sample in shard order, in pipeline.predict's input format: {"id", "image" or "audio" (file name relative to
the JSONL), "question" (VQA-style tasks) or "text" (the sample's txt, else its first caption / sentence),
"truth": the sample's json}. For looking at a corpus, and for feeding held-out samples to an exported model.
Samples are read in shard order, as `data_prep verify` reads them; an unreadable shard is an error.
"""
from __future__ import annotations

import argparse
import json
import os

from data_prep import manifest as mf
from data_prep.shards import iter_tar_samples

MEDIA = {"image": ("jpg", "jpeg", "png", "webp"), "audio": ("flac", "wav")}
TEXT_KEYS = ("caption", "captions", "sentence", "hypothesis")  # first of these in the json, when no txt


def sample_line(key: str, fields: dict[str, bytes]) -> tuple[dict, dict[str, bytes]]:
    """(JSONL object, {file name: bytes}) of one sample."""
    meta = json.loads(fields["json"]) if "json" in fields else {}
    line: dict = {"id": meta.get("question_id", key) if isinstance(meta, dict) else key}
    files = {}
    for kind, exts in MEDIA.items():
        ext = next((e for e in exts if e in fields), None)
        if ext is not None:
            files[f"{key}.{ext}"] = fields[ext]
            line[kind] = f"{key}.{ext}"
    text = fields["txt"].decode("utf-8") if "txt" in fields else None
    if text is None and isinstance(meta, dict):
        found = next((meta[k] for k in ("question", *TEXT_KEYS) if meta.get(k)), None)
        text = found[0] if isinstance(found, list) else found
    if text:
        line["question" if isinstance(meta, dict) and "question" in meta else "text"] = text
    line["truth"] = meta
    return line, files


def extract(data: str, split: str, limit: int, output: str) -> int:
    manifest = mf.load_manifest(data)
    if split not in manifest["splits"]:
        raise ValueError(f"{data}: no split {split!r} (has: {', '.join(sorted(manifest['splits']))})")
    os.makedirs(output, exist_ok=True)
    lines = []
    for name in manifest["splits"][split]["shards"]:
        for key, fields in iter_tar_samples(os.path.join(data, name)):
            line, files = sample_line(key, fields)
            for file_name, payload in files.items():
                with open(os.path.join(output, file_name), "wb") as fh:
                    fh.write(payload)
            lines.append(line)
            if len(lines) == limit:
                break
        if len(lines) == limit:
            break
    with open(os.path.join(output, "samples.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in lines)
    return len(lines)


def run(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    count = extract(args.data, args.split, args.limit, args.output)
    print(f"data_prep extract: {count} samples of {args.data} ({args.split}) -> "
          f"{os.path.join(args.output, 'samples.jsonl')}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("extract", help="write the first N samples of a split as files + a JSONL",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DIR", help="a data_prep output folder")
    p.add_argument("--split", default="val", help="split to read (default %(default)s)")
    p.add_argument("--limit", type=int, default=8, help="samples to write (default %(default)s)")
    p.add_argument("--output", required=True, help="folder for the files and samples.jsonl (created)")
    p.set_defaults(func=run)
