"""Throughput of `data_prep pairs` on real-sized JPEGs vs a bare PIL decode-resize-encode loop.

    .venv/bin/python bench/bench_data_prep.py                      # photos from ../shared/data/photos
    .venv/bin/python bench/bench_data_prep.py --num-images 400 --workers 1 2 --repeats 3

Inputs: the photos in --photos, resized/cropped to --input-size (default 640x480) JPEGs (quality 90) with
varied crops, repeated to --num-images files. Each method is timed on the same files in the same run;
`pairs` runs in-process through the real CLI entry (pool start, tar writing, hashing and manifest
included) into a fresh folder each time. Best of --repeats. Prints a table; writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.cli import main as data_prep_main  # noqa: E402

DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "photos"


def make_inputs(photos: Path, out: Path, count: int, size: tuple[int, int]) -> list[str]:
    """`count` JPEGs of `size`, cycling through the photos with a different crop each time."""
    sources = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not sources:
        raise SystemExit(f"no photos in {photos}")
    images = [Image.open(p).convert("RGB") for p in sources]
    files = []
    for i in range(count):
        img = images[i % len(images)]
        scale = 1.0 + 0.15 * ((i // len(images)) % 4)
        big = img.resize((max(size[0], round(img.width * scale * size[1] / img.height)),
                          round(size[1] * scale)), Image.Resampling.BICUBIC)
        crop = ImageOps.fit(big, size, Image.Resampling.BICUBIC, centering=((i % 5) / 4, (i % 3) / 2))
        path = out / f"{i:06d}.jpg"
        crop.save(path, format="JPEG", quality=90)
        files.append(str(path))
    return files


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (pool workers), user + system."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn(*args)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn(*args)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def best_of_interleaved(runs: dict, repeats: int, n: int) -> tuple[dict, dict, dict]:
    """Run every ``runs[name]()`` (each returns ``timed``'s pair) ``repeats`` times, interleaved so that load
    changes hit every method alike; (best wall seconds, items/s, CPU ms per item) per name for ``n`` items."""
    results = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    timings = {k: min(wall for wall, _ in v) for k, v in results.items()}
    cpu_ms = {k: 1000 * min(cpu for _, cpu in v) / n for k, v in results.items()}
    return timings, {k: n / v for k, v in timings.items()}, cpu_ms


def bare_loop(files: list[str], size: int, quality: int) -> None:
    """The reference: open, decode, resize the shorter side, encode."""
    for path in files:
        img = Image.open(path).convert("RGB")
        scale = size / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)


def pairs_run(table: Path, out: Path, workers: int, size: int, quality: int, shard_size: int) -> None:
    shutil.rmtree(out, ignore_errors=True)
    rc = data_prep_main(["pairs", "--input", str(table), "--output", str(out), "--image-size", str(size),
                         "--quality", str(quality), "--shard-size", str(shard_size), "--workers", str(workers),
                         "--no-progress"])
    if rc != 0:
        raise SystemExit(f"data_prep pairs failed with {rc}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of source photos")
    p.add_argument("--num-images", type=int, default=300, help="input files (photos repeated)")
    p.add_argument("--input-size", default="640x480", help="WxH of the input JPEGs")
    p.add_argument("--image-size", type=int, default=256, help="output shorter side")
    p.add_argument("--quality", type=int, default=90, help="output JPEG quality")
    p.add_argument("--shard-size", type=int, default=50, help="samples per shard")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per method")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.photos.is_dir():
        raise SystemExit(f"--photos {args.photos} is not a folder")
    width, height = map(int, args.input_size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="bench_data_prep_") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        files = make_inputs(args.photos, tmp / "in", args.num_images, (width, height))
        table = tmp / "pairs.jsonl"
        table.write_text("".join(json.dumps({"image": f, "caption": f"photo {i}"}) + "\n"
                                 for i, f in enumerate(files)))
        n = len(files)
        bare_loop(files[: min(20, n)], args.image_size, args.quality)  # warm the page cache
        runs = {"bare_pil": lambda: timed(bare_loop, files, args.image_size, args.quality)}
        for w in args.workers:
            runs[f"pairs_w{w}"] = (lambda w=w: timed(pairs_run, table, tmp / "out", w, args.image_size,
                                                     args.quality, args.shard_size))
        timings, rates, cpu_ms = best_of_interleaved(runs, args.repeats, n)
    base = rates[f"pairs_w{args.workers[0]}"]
    rows = [("bare PIL loop", 1, rates["bare_pil"], 1.0, None, cpu_ms["bare_pil"])]
    for w in args.workers:
        r = rates[f"pairs_w{w}"]
        rows.append(("data_prep pairs", w, r, r / rates["bare_pil"] / w, r / base, cpu_ms[f"pairs_w{w}"]))
    load = os.getloadavg()[0]
    print(f"{n} JPEGs {width}x{height} -> shorter side {args.image_size}, quality {args.quality}; "
          f"best of {args.repeats} (interleaved); {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'method':<18}{'workers':>8}{'samples/s':>12}{'x bare per worker':>19}{'x vs 1st':>10}"
          f"{'CPU ms/sample':>15}")
    for name, w, r, per_worker, speedup, cpu in rows:
        print(f"{name:<18}{w:>8}{r:>12.1f}{per_worker:>19.2f}{(f'{speedup:.2f}' if speedup else '-'):>10}"
              f"{cpu:>15.2f}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "data_prep_pairs", "command": " ".join([sys.executable, *sys.argv]),
              "num_images": n, "input_size": [width, height], "image_size": args.image_size,
              "quality": args.quality, "repeats": args.repeats, "cpus": os.cpu_count(),
              "platform": platform.platform(), "load_average": load, "seconds": timings, "samples_per_s": rates,
              "cpu_ms_per_sample": cpu_ms,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = args.results_dir / f"data_prep_{time.strftime('%Y%m%d_%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
