"""Training input pipeline throughput (pipeline.data.loader: shards -> decode -> transforms -> tokenize -> batch) vs a
bare decode loop on the same shards, and the data-wait fraction of real training runs.

    .venv/bin/python bench/bench_data_loading.py                  # synth + photo shards, 2 training runs
    .venv/bin/python bench/bench_data_loading.py --photos DIR --photo-samples 400 --workers 0 1 2
    .venv/bin/python bench/bench_data_loading.py --quick          # smoke run

Shards: ``synth`` = the cached ``data_prep synth`` captions (64x64 JPEG q95, runs/bench/); ``photos`` = the
photos of ``--photos`` (default ../shared/data/photos) repeated to ``--photo-samples`` rows and written by
``python -m data_prep pairs`` (shorter side 256, JPEG q90: img2dataset-sized). The loader is the real
``pipeline.data.loader.build_train_loader`` with the ``vl_pretrain`` task (resize to ``image_size``, normalise,
tokenize to 32 tokens, stack micro-batches of 16); ``image_size`` is 64 for synth (the demo) and
``--photo-image-size`` (224) for photos. workers=0 runs the pipeline in this process: the cost of one
worker; workers>=1 are DataLoader processes (what a rank runs). "bare decode" = read the tar members and
``PIL.Image.open(...).convert("RGB")`` each image, nothing else. The per-stage split (decode, image
transform, tokenize) times the task's own functions on the same samples in this process.

Data wait: ``train/data_wait_frac`` (time in ``next(loader)`` / step time, rank 0) from ``pipeline.train``
runs of the demo recipe (fp32, 2 ranks, 1 worker each) on synth and on the photo shards (at 64 px).
Prints tables; writes JSON to bench/results/data_loading_<time>.json.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "photos"
MICRO_BATCH = 16
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS if DEFAULT_PHOTOS.is_dir() else None,
                   help="folder of photos for the real-sized shards (default ../shared/data/photos if present)")
    p.add_argument("--photo-samples", type=int, default=600, help="rows of the photo table (photos repeated)")
    p.add_argument("--photo-image-size", type=int, default=224, help="training image size on photo shards")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to time")
    p.add_argument("--batches", type=int, default=30, help="timed micro-batches per loader setting")
    p.add_argument("--train-runs", nargs="*", choices=["synth", "photos"], default=["synth", "photos"],
                   help="training runs to read the data-wait fraction from (none: skip)")
    p.add_argument("--train-steps", type=int, default=12, help="measured steps of each training run")
    p.add_argument("--quick", action="store_true", help="smoke run: few batches, workers 0, synth run 2 steps")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ shards
def photo_shards(photos: Path, samples: int) -> Path:
    """``data_prep pairs`` output of ``samples`` rows cycling through the photos (cached in runs/bench)."""
    out = common.BENCH_RUNS / f"photo_pairs{samples}"
    if (out / "manifest.json").is_file():
        return out
    files = sorted(p for p in photos.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise SystemExit(f"--photos {photos}: no .jpg/.jpeg/.png files")
    table = common.BENCH_RUNS / f"photo_pairs{samples}.jsonl"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("".join(json.dumps({"image": str(files[i % len(files)].resolve()),
                                         "caption": f"a photo of a {files[i % len(files)].stem} number {i}"})
                             + "\n" for i in range(samples)))
    common._data_prep("pairs", "--input", table, "--output", out, "--shard-size", 200, "--workers", 2,
                      "--no-progress")
    return out


def tar_images(folder: Path, split: str = "train"):
    """Image bytes of every sample of ``split`` in shard order."""
    from pipeline.data.loader import shard_urls

    for url in shard_urls(str(folder), split):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(IMAGE_EXTS):
                    yield tar.extractfile(member).read()


# ------------------------------------------------------------------------------------------ timing
def build(folder: Path, tokenizer: Path, image_size: int, workers: int, sets: list[str] | None = None):
    from pipeline.run.build import build_task, load_tokenizer
    from pipeline.recipe import load_recipe
    from pipeline.tasks import DistInfo

    patch = 16 if image_size % 16 == 0 and image_size > 64 else 8
    recipe = load_recipe(REPO / common.VL_RECIPE, common.data_sets(folder, tokenizer, workers=workers)
                                    + [f"data.image_size={image_size}", f"model.image_size={image_size}",
                                       f"model.patch_size={patch}", *(sets or [])])
    task = build_task(recipe, load_tokenizer(recipe.data.tokenizer), DistInfo(0, 1))
    return recipe, task


def loader_rate(folder: Path, tokenizer: Path, image_size: int, workers: int, batches: int) -> dict[str, float]:
    """samples/s of the real training loader (after the first batch: worker start and shuffle fill)."""
    import torch

    from pipeline.data.loader import build_train_loader

    torch.set_num_threads(1)
    recipe, task = build(folder, tokenizer, image_size, workers, ["data.shuffle_buffer=100"])
    iterator = iter(build_train_loader(recipe.data, task, MICRO_BATCH, 0, seed=0))
    first = time.perf_counter()
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator
    return {"samples_per_s": batches * MICRO_BATCH / seconds, "first_batch_s": start - first}


def bare_decode_rate(folder: Path, limit: int) -> float:
    from PIL import Image

    images = [data for data, _ in zip(tar_images(folder), range(limit))]
    for data in images[:8]:  # warm-up: decoder libraries loaded, caches filled
        Image.open(io.BytesIO(data)).convert("RGB")
    start = time.perf_counter()
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB")
    return len(images) / (time.perf_counter() - start)


def stage_split(folder: Path, tokenizer: Path, image_size: int, limit: int) -> dict[str, float]:
    """ms per sample of decode / image transform / tokenize, with the task's own functions."""
    from PIL import Image

    from pipeline.tasks.downstream_common import image_tensor

    _, task = build(folder, tokenizer, image_size, 0)
    images = [data for data, _ in zip(tar_images(folder), range(limit))]
    times = {"decode_ms": 0.0, "transform_ms": 0.0, "tokenize_ms": 0.0}
    for data in images:
        t0 = time.perf_counter()
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
        t1 = time.perf_counter()
        image_tensor(rgb, image_size)
        t2 = time.perf_counter()
        task.tokenize("a photo of a red circle left of a blue square number 12")
        t3 = time.perf_counter()
        times["decode_ms"] += t1 - t0
        times["transform_ms"] += t2 - t1
        times["tokenize_ms"] += t3 - t2
    sizes = [Image.open(io.BytesIO(data)).size for data in images]
    mean_w, mean_h = (round(sum(s[i] for s in sizes) / len(sizes)) for i in (0, 1))
    return {**{k: 1e3 * v / len(images) for k, v in times.items()}, "stored_size": f"{mean_w}x{mean_h}"}


def data_wait_run(name: str, folder: Path, tokenizer: Path, steps: int, warmup: int) -> dict[str, Any]:
    sets = common.data_sets(folder, tokenizer) + [
        f"train.steps={warmup + steps}", f"train.log_every={warmup}", "train.save_every=0", "train.eval_every=0",
        "schedule.warmup_steps=2", "train.peak_tflops=1.0"]
    run = common.run_training(common.BENCH_RUNS / "data_wait" / name, sets, 2, "ds_configs/zero2_fp32.json")
    window = common.measured_window(run["log"], warmup)
    return {"shards": name, **window, "command": run["command"], "load_average": run["load_average"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.batches, args.workers, args.train_steps = 3, [0], 2
        args.train_runs = ["synth"] if args.train_runs else []
        args.photo_samples = min(args.photo_samples, 100)
    captions, tokenizer = common.ensure_synth()
    datasets = {"synth": (captions, 64)}
    if args.photos is not None:
        datasets["photos"] = (photo_shards(args.photos, args.photo_samples), args.photo_image_size)
    else:
        print("no --photos folder: photo shards skipped")
    rows, stages = [], []
    for name, (folder, image_size) in datasets.items():
        limit = max(args.batches * MICRO_BATCH, 64)
        bare = bare_decode_rate(folder, limit)
        stages.append({"shards": name, "image_size": image_size, **stage_split(folder, tokenizer, image_size, 200)})
        for workers in args.workers:
            rate = loader_rate(folder, tokenizer, image_size, workers, args.batches)
            per_worker = rate["samples_per_s"] / max(workers, 1)
            rows.append({"shards": name, "image_size": image_size, "workers": workers, **rate,
                         "per_worker": per_worker, "bare_decode_per_s": bare, "vs_bare": per_worker / bare})
            print(f"  {name} workers={workers}: {rate['samples_per_s']:.0f} samples/s", flush=True)
    waits = []
    for name in args.train_runs:
        if name in datasets:
            waits.append(data_wait_run(name, datasets[name][0], tokenizer, args.train_steps,
                                       2 if args.quick else 3))
    print(f"\ntraining input pipeline, vl_pretrain task, micro-batch {MICRO_BATCH}, {args.batches} batches; "
          f"{common.load_line()}")
    loader_table = common.print_table(
        ["shards", "image size", "workers", "samples/s", "per worker", "bare decode/s", "per worker / bare"],
        [[r["shards"], r["image_size"], r["workers"] or "0 (in-process)", r["samples_per_s"], r["per_worker"],
          r["bare_decode_per_s"], f"{r['vs_bare']:.2f}"] for r in rows])
    print("\nper-sample cost of the stages (ms, this process)")
    stage_table = common.print_table(
        ["shards", "stored JPEG (mean WxH)", "image size", "decode", "resize+normalise", "tokenize"],
        [[s["shards"], s["stored_size"], s["image_size"], s["decode_ms"], s["transform_ms"], s["tokenize_ms"]]
         for s in stages])
    wait_table = ""
    if waits:
        print("\ndata wait in pipeline.train (demo recipe, fp32, 2 ranks, 1 worker each, rank 0), target < 5%")
        wait_table = common.print_table(
            ["shards", "measured steps", "s/step", "samples/s", "data wait", "target met"],
            [[w["shards"], w["measured_steps"], w["step_time_s"], w["samples_per_s"],
              f"{w['data_wait_frac']:.2%}", "yes" if w["data_wait_frac"] < 0.05 else "no"] for w in waits])
    common.write_result("data_loading", {"settings": vars(args), "loader": rows, "stages": stages,
                                         "data_wait": waits, "tables": [loader_table, stage_table, wait_table]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
