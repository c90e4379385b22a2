"""Options shared by every writing command and the glue from parsed arguments to a DatasetWriter."""
from __future__ import annotations

import argparse
import shlex
import sys

from data_prep.audio import AudioOptions
from data_prep.images import RESIZE_MODES, ImageOptions
from data_prep.writer import DatasetWriter

# options that do not change the output, so kept out of the manifest
NOT_OPTIONS = ("func", "workers", "progress", "command_line", "min_written")


def add_output_options(parser: argparse.ArgumentParser, *, image_size: int = 256, quality: int = 90,
                       shard_size: int = 1000, resize_mode: str = "shorter", images: bool = True) -> None:
    """The shared options; images=False leaves out the image ones (audio-only commands)."""
    g = parser.add_argument_group("output")
    g.add_argument("--output", required=True, help="output folder (created; a rerun resumes in it)")
    g.add_argument("--shard-size", type=int, default=shard_size, help="samples per shard (default %(default)s)")
    g.add_argument("--workers", type=int, default=1,
                   help="encoding processes; output is byte-identical for any value (default %(default)s)")
    g.add_argument("--min-written", type=float, default=0.5,
                   help="fail (exit 2) when a split writes less than this fraction of the records read, or "
                        "nothing (default %(default)s)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    if images:
        add_image_options(parser, image_size=image_size, quality=quality, resize_mode=resize_mode)


def add_image_options(parser: argparse.ArgumentParser, *, image_size: int, quality: int, resize_mode: str) -> None:
    g = parser.add_argument_group("images")
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


def add_audio_options(parser: argparse.ArgumentParser) -> None:
    d = AudioOptions()
    g = parser.add_argument_group("audio (decoded with soundfile, mixed down to mono, resampled with soxr, "
                                  "stored as 16-bit FLAC)")
    g.add_argument("--sample-rate", type=int, default=d.sample_rate,
                   help="output sample rate in Hz (default %(default)s)")
    g.add_argument("--max-seconds", type=float, default=d.max_seconds,
                   help="longer clips keep their first MAX_SECONDS (cropped from the start; nothing is padded: "
                        "the loader pads) (default %(default)s)")
    g.add_argument("--min-seconds", type=float, default=d.min_seconds,
                   help="skip clips shorter than this as audio_too_short (default %(default)s)")
    g.add_argument("--silence-peak", type=float, default=d.silence_peak,
                   help="skip clips whose peak |sample| (full scale 1.0) is below this as silent_audio "
                        "(default %(default)s, about -80 dBFS)")


def audio_options(args: argparse.Namespace) -> AudioOptions | None:
    """The audio options of a command that has them, else None."""
    if not hasattr(args, "sample_rate"):
        return None
    return AudioOptions(sample_rate=args.sample_rate, max_seconds=args.max_seconds, min_seconds=args.min_seconds,
                        silence_peak=args.silence_peak)


def image_options(args: argparse.Namespace) -> ImageOptions:
    if not hasattr(args, "image_size"):
        return ImageOptions()
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
                         progress=args.progress, min_written=args.min_written,
                         audio_opts=audio_options(args) if "flac" in fields else None)  # image folders: none
