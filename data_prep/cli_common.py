"""Options shared by every writing command and the glue from parsed arguments to a DatasetWriter."""
from __future__ import annotations

import argparse
import shlex
import sys

from data_prep.images import RESIZE_MODES, ImageOptions
from data_prep.writer import DatasetWriter

# options that do not change the output, so kept out of the manifest
NOT_OPTIONS = ("func", "workers", "progress", "command_line", "min_written")


def add_output_options(parser: argparse.ArgumentParser, *, image_size: int = 256, quality: int = 90,
                       shard_size: int = 1000, resize_mode: str = "shorter") -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--output", required=True, help="output folder (created; a rerun resumes in it)")
    g.add_argument("--image-size", type=int, default=image_size,
                   help="shorter side of the written images in pixels (default %(default)s)")
    g.add_argument("--resize-mode", choices=RESIZE_MODES, default=resize_mode,
                   help="shorter: keep aspect; center_crop: square crop; none: keep size (default %(default)s)")
    g.add_argument("--quality", type=int, default=quality, help="JPEG quality 1-100 (default %(default)s)")
    g.add_argument("--max-pixels", type=int, default=50_000_000,
                   help="skip images with more pixels than this (default %(default)s)")
    g.add_argument("--min-image-size", type=int, default=0,
                   help="skip images whose shorter side is below this (default %(default)s: off)")
    g.add_argument("--max-aspect-ratio", type=float, default=0.0,
                   help="skip images with longer/shorter side above this (default %(default)s: off)")
    g.add_argument("--shard-size", type=int, default=shard_size, help="samples per shard (default %(default)s)")
    g.add_argument("--workers", type=int, default=1,
                   help="encoding processes; output is byte-identical for any value (default %(default)s)")
    g.add_argument("--min-written", type=float, default=0.5,
                   help="fail (exit 2) when a split writes less than this fraction of the records read, or "
                        "nothing (default %(default)s)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def image_options(args: argparse.Namespace) -> ImageOptions:
    return ImageOptions(size=args.image_size, resize_mode=args.resize_mode, quality=args.quality,
                        max_pixels=args.max_pixels, min_size=args.min_image_size,
                        max_aspect_ratio=args.max_aspect_ratio)


def recorded_options(args: argparse.Namespace) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_OPTIONS}


def command_line(argv: list[str] | None) -> str:
    return "data_prep " + shlex.join(sys.argv[1:] if argv is None else argv)


def make_writer(args: argparse.Namespace, *, task: str, fields: list[str], out_dir: str | None = None,
                options: dict | None = None) -> DatasetWriter:
    """A DatasetWriter configured from the shared options (`out_dir` overrides --output, e.g. synth parts)."""
    return DatasetWriter(out_dir or args.output, task=task, fields=fields, image_opts=image_options(args),
                         shard_size=args.shard_size, workers=args.workers, command=args.command_line,
                         options=options if options is not None else recorded_options(args),
                         progress=args.progress, min_written=args.min_written)
