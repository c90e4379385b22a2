"""Throughput of audio `data_prep` (audio_pairs) vs a bare soundfile decode - mono - soxr - FLAC loop.

    .venv/bin/python bench/bench_audio_prep.py
    .venv/bin/python bench/bench_audio_prep.py --num-clips 200 --seconds 10 --workers 1 2 --repeats 3

Inputs: --num-clips stereo 44.1 kHz 16-bit WAV clips of --seconds (tones over noise, written here).
Both methods process the same files in the same run: the bare loop reads, mixes down, resamples to
--sample-rate and encodes 16-bit FLAC; `audio_pairs` runs in-process through the real CLI entry (pool
start, checks, tar writing, hashing and manifest included) into a fresh folder each time. Best of
--repeats, interleaved. Prints a table; writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_data_prep import best_of_interleaved, timed  # noqa: E402
from data_prep.cli import main as data_prep_main  # noqa: E402

SOURCE_RATE = 44100


def make_inputs(out: Path, count: int, seconds: float) -> list[str]:
    rng = np.random.default_rng(0)
    t = np.arange(round(seconds * SOURCE_RATE)) / SOURCE_RATE
    files = []
    for i in range(count):
        wave = 0.3 * np.sin(2 * np.pi * (200 + 10 * i) * t) + 0.05 * rng.standard_normal(len(t))
        path = out / f"{i:06d}.wav"
        sf.write(str(path), np.stack([wave, 0.5 * wave], axis=1), SOURCE_RATE, subtype="PCM_16")
        files.append(str(path))
    return files


def bare_loop(files: list[str], rate: int) -> None:
    """The reference: decode, mean of the channels, soxr resample, encode 16-bit FLAC."""
    for path in files:
        samples, source_rate = sf.read(path, dtype="float32", always_2d=True)
        mono = soxr.resample(samples.mean(axis=1), source_rate, rate)
        buf = io.BytesIO()
        sf.write(buf, mono, rate, format="FLAC", subtype="PCM_16")


def prep_run(table: Path, out: Path, workers: int, rate: int, shard_size: int) -> None:
    shutil.rmtree(out, ignore_errors=True)
    rc = data_prep_main(["audio_pairs", "--input", str(table), "--output", str(out), "--sample-rate", str(rate),
                         "--shard-size", str(shard_size), "--workers", str(workers), "--no-progress"])
    if rc != 0:
        raise SystemExit(f"data_prep audio_pairs failed with {rc}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-clips", type=int, default=120, help="input clips")
    p.add_argument("--seconds", type=float, default=10.0, help="length of every input clip")
    p.add_argument("--sample-rate", type=int, default=16000, help="output rate")
    p.add_argument("--shard-size", type=int, default=30, help="samples per shard")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per method")
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_audio_prep_") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        files = make_inputs(tmp / "in", args.num_clips, args.seconds)
        table = tmp / "clips.jsonl"
        table.write_text("".join(json.dumps({"audio": f, "caption": f"clip {i}"}) + "\n"
                                 for i, f in enumerate(files)))
        n = len(files)
        bare_loop(files[: min(10, n)], args.sample_rate)  # warm the page cache
        runs = {"bare": lambda: timed(bare_loop, files, args.sample_rate)}
        for w in args.workers:
            runs[f"prep_w{w}"] = (lambda w=w: timed(prep_run, table, tmp / "out", w, args.sample_rate,
                                                    args.shard_size))
        timings, rates, cpu_ms = best_of_interleaved(runs, args.repeats, n)
    base = rates[f"prep_w{args.workers[0]}"]
    load = os.getloadavg()[0]
    print(f"{n} stereo WAV clips of {args.seconds:g} s at {SOURCE_RATE} Hz -> mono FLAC at {args.sample_rate} Hz; "
          f"best of {args.repeats} (interleaved); {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'method':<24}{'workers':>8}{'clips/s':>10}{'x bare per worker':>19}{'x vs 1st':>10}{'CPU ms/clip':>13}")
    print(f"{'bare decode-soxr-flac':<24}{1:>8}{rates['bare']:>10.1f}{1.0:>19.2f}{'-':>10}{cpu_ms['bare']:>13.2f}")
    for w in args.workers:
        r = rates[f"prep_w{w}"]
        print(f"{'data_prep audio_pairs':<24}{w:>8}{r:>10.1f}{r / rates['bare'] / w:>19.2f}{r / base:>10.2f}"
              f"{cpu_ms[f'prep_w{w}']:>13.2f}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "data_prep_audio", "command": " ".join([sys.executable, *sys.argv]), "num_clips": n,
              "seconds": args.seconds, "sample_rate": args.sample_rate, "repeats": args.repeats,
              "cpus": os.cpu_count(), "platform": platform.platform(), "load_average": load,
              "wall_seconds": timings, "clips_per_s": rates, "cpu_ms_per_clip": cpu_ms,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = args.results_dir / f"data_prep_audio_{time.strftime('%Y%m%d_%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
