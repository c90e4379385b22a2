"""Helpers for the data_prep tests: tiny images, CLI runner, shard readers."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from data_prep.cli import main
from data_prep.shards import iter_tar_samples

REPO = Path(__file__).resolve().parents[1]
PALETTE = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 30), (160, 40, 200), (240, 240, 240)]


def jpeg_bytes(color=(200, 30, 30), size=(40, 30), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path, color=(200, 30, 30), size=(40, 30), fmt="JPEG") -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(color, size, fmt))
    return str(path)


def run_cli(*argv) -> int:
    """Run `data_prep` in-process (no progress bar)."""
    argv = [str(a) for a in argv]
    if argv[0] not in ("verify", "tokenizer"):
        argv.append("--no-progress")
    return main(argv)


def run_subprocess(*argv, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "data_prep", *map(str, argv)], env=env, cwd=REPO,
                          capture_output=True, text=True, **kwargs)


def manifest(out) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())


def samples(out, split=None) -> list[tuple[str, dict]]:
    """(key, {ext: bytes}) of every sample of the output folder (one split or all), in shard order."""
    m = manifest(out)
    result = []
    for name, info in m["splits"].items():
        if split is None or name == split:
            for shard in info["shards"]:
                result += list(iter_tar_samples(str(Path(out) / shard)))
    return result


def metas(out, split=None) -> list[dict]:
    return [json.loads(f["json"]) for _, f in samples(out, split)]


def tar_digests(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(out).glob("*.tar"))}


def pixel(jpg: bytes) -> tuple:
    img = Image.open(io.BytesIO(jpg)).convert("RGB")
    return img.getpixel((img.width // 2, img.height // 2))
