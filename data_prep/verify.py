"""`data_prep verify DIR`: check an output folder against its manifest; exit 1 on any mismatch.

    python -m data_prep verify runs/demo/data/vqa

Checks: every listed shard exists and has the recorded sha256; every sample has exactly the manifest
fields, a dot-free key equal to its json "key", UTF-8 text, fully decodable images and mono FLAC audio
with the rate and length its json "audio" states; per-shard counts
match sizes.json and split totals match the manifest; no split is empty; extra files (answers.json, classes.json) load.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import tarfile

import soundfile as sf
from PIL import Image

from data_prep import manifest as mf
from data_prep.shards import iter_tar_samples

KEY_RE = re.compile(r"^[A-Za-z0-9_]+$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
JSON_KEYS = {
    "pairs": ("key",),
    "vqa": ("key", "question", "question_id", "image_id", "question_type", "answer_type", "answers", "targets"),
    "retrieval": ("key", "image_id", "filename", "captions"),
    "nlvr2": ("key", "identifier", "sentence", "label"),
    "classification": ("key", "label", "label_name"),
    "gqa": ("key", "question", "question_id", "image_id", "full_answer", "question_type"),
    "snli_ve": ("key", "pair_id", "image_id", "hypothesis", "premise", "label", "label_name"),
    "audio_retrieval": ("key", "audio_id", "captions", "audio"),
    "audio_pairs": ("key", "caption", "audio"),
    "audio_classification": ("key", "label", "label_name", "audio"),
}
AUDIO_EXTS = ("flac",)
MAX_REPORTED = 20


def check_sample(key: str, fields: dict[str, bytes], expected: set[str], json_keys: tuple) -> list[str]:
    """Problems with one sample (empty list when fine)."""
    problems = []
    if not KEY_RE.match(key):
        problems.append(f"key {key!r} has characters other than letters, digits, underscore")
    if set(fields) != expected:
        problems.append(f"{key}: fields {sorted(fields)} != manifest fields {sorted(expected)}")
    for ext, data in fields.items():
        if ext.rsplit(".", 1)[-1] in IMAGE_EXTS:
            try:
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
            except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad image
                problems.append(f"{key}.{ext}: image does not decode ({exc})")
        elif ext in AUDIO_EXTS:
            problems += _check_audio(key, ext, data, fields.get("json", b""))
        elif ext in ("txt", "cls", "json"):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"{key}.{ext}: not UTF-8")
                continue
            if ext == "json":
                problems += _check_json(key, text, json_keys)
    return problems


def _check_audio(key: str, ext: str, data: bytes, meta_bytes: bytes) -> list[str]:
    """The clip decodes, is mono, and has the sample rate and length its json "audio" entry states."""
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is bad audio
        return [f"{key}.{ext}: audio does not decode ({exc.__class__.__name__}: {getattr(exc, 'error_string', exc)})"]
    try:
        stated = json.loads(meta_bytes)["audio"][ext]
    except (ValueError, KeyError, TypeError):
        return [f"{key}.json: no audio.{ext} entry"]
    problems = [] if samples.shape[1] == 1 else [f"{key}.{ext}: {samples.shape[1]} channels, expected mono"]
    if rate != stated.get("sample_rate") or abs(len(samples) / rate - stated.get("seconds", -1)) > 1e-5:
        problems.append(f"{key}.{ext}: {len(samples)} samples at {rate} Hz, json says {stated}")
    return problems


def _check_json(key: str, text: str, json_keys: tuple) -> list[str]:
    try:
        meta = json.loads(text)
    except ValueError as exc:
        return [f"{key}.json: invalid JSON ({exc})"]
    if not isinstance(meta, dict):
        return [f"{key}.json: not an object"]
    problems = [f"{key}.json: missing {k!r}" for k in json_keys if k not in meta]
    if meta.get("key") != key:
        problems.append(f"{key}.json: key {meta.get('key')!r} != {key!r}")
    return problems


def verify(out_dir: str) -> tuple[list[str], dict]:
    """(problems, counts) for an output folder."""
    manifest = mf.load_manifest(out_dir)
    problems: list[str] = []
    sizes = mf.read_json(os.path.join(out_dir, mf.SIZES))
    checksums = manifest.get("checksums", {})
    expected, json_keys = set(manifest["fields"]), JSON_KEYS.get(manifest["task"], ("key",))
    counts = {"shards": 0, "samples": 0}
    for split, info in manifest["splits"].items():
        split_total = 0
        for name in info["shards"]:
            path = os.path.join(out_dir, name)
            if not os.path.isfile(path):
                problems.append(f"{name}: listed in the manifest but missing")
                continue
            if name in checksums and mf.file_sha256(path) != checksums[name]:
                problems.append(f"{name}: sha256 differs from the manifest (modified after writing)")
            keys: set[str] = set()
            n = 0
            try:
                for key, fields in iter_tar_samples(path):
                    n += 1
                    if key in keys:
                        problems.append(f"{name}: key {key} appears twice")
                    keys.add(key)
                    problems += check_sample(key, fields, expected, json_keys)
            except (tarfile.TarError, OSError) as exc:
                problems.append(f"{name}: unreadable tar ({exc})")
            if sizes.get(name) != n:
                problems.append(f"{name}: {n} samples, sizes.json says {sizes.get(name)}")
            split_total += n
            counts["shards"] += 1
        if split_total != info["num_samples"]:
            problems.append(f"split {split}: {split_total} samples, manifest says {info['num_samples']}")
        if split_total == 0:
            problems.append(f"split {split}: no samples (the conversion wrote nothing)")
        counts["samples"] += split_total
    listed = {n for info in manifest["splits"].values() for n in info["shards"]}
    for name in sorted(f for f in os.listdir(out_dir) if f.endswith(".tar") and f not in listed):
        problems.append(f"{name}: shard file not listed in the manifest")
    if set(sizes) != listed:
        problems.append(f"sizes.json lists {sorted(set(sizes) ^ listed)} differently from the manifest")
    problems += check_files(out_dir, manifest.get("files", {}))
    return problems, counts


def check_files(out_dir: str, files: dict[str, str]) -> list[str]:
    """answers.json: equal-length 'answers' (str) and 'counts'; classes.json: a 'classes' list of str."""
    problems = []
    for role, name in files.items():
        try:
            obj = mf.read_json(os.path.join(out_dir, name))
        except (OSError, ValueError) as exc:
            problems.append(f"{role} file {name}: {exc}")
            continue
        if role == "answers" and not (isinstance(obj.get("answers"), list) and isinstance(obj.get("counts"), list)
                                      and len(obj["answers"]) == len(obj["counts"])
                                      and all(isinstance(a, str) for a in obj["answers"])):
            problems.append(f"{name}: expected {{'answers': [str...], 'counts': [int...]}} of equal length")
        if role == "classes" and not (isinstance(obj.get("classes"), list)
                                      and all(isinstance(c, str) for c in obj["classes"])):
            problems.append(f"{name}: expected {{'classes': [str...]}}")
    return problems


def run(args: argparse.Namespace) -> int:
    status = 0
    for out_dir in args.dirs:
        problems, counts = verify(out_dir)
        leftovers = sorted(f for f in os.listdir(out_dir) if f.endswith(mf.TMP_SUFFIX))
        if leftovers:
            print(f"verify {out_dir}: note: unfinished temporary files (ignored): {leftovers[:5]}")
        for problem in problems[:MAX_REPORTED]:
            print(f"verify {out_dir}: {problem}")
        if len(problems) > MAX_REPORTED:
            print(f"verify {out_dir}: ... and {len(problems) - MAX_REPORTED} more problems")
        state = "OK" if not problems else f"FAILED ({len(problems)} problems)"
        print(f"verify {out_dir}: {state}: {counts['samples']} samples in {counts['shards']} shards")
        status = status or (1 if problems else 0)
    return status


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help="check output folders against their manifests",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="data_prep output folders")
    p.set_defaults(func=run)
