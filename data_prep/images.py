"""Image loading, checks, resizing and JPEG encoding (runs inside the worker processes)."""
from __future__ import annotations

import dataclasses
import io
import os
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from data_prep.records import (BAD_ASPECT_RATIO, CORRUPT_IMAGE, MISSING_FILE, NOT_AN_IMAGE, TOO_MANY_PIXELS,
                               TOO_SMALL, ImageSource, SkipSample)

RESIZE_MODES = ("shorter", "center_crop", "none")


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How every image is turned into the output JPEG."""

    size: int = 256  # target of the shorter side (or of both sides with center_crop)
    resize_mode: str = "shorter"  # shorter | center_crop | none
    quality: int = 90
    max_pixels: int = 50_000_000  # width * height above this -> skipped as too_many_pixels
    min_size: int = 0  # shorter side below this -> skipped as too_small
    max_aspect_ratio: float = 0.0  # longer/shorter side above this -> skipped as bad_aspect_ratio (0: off)

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.size < 1 or not 1 <= self.quality <= 100 or self.max_pixels < 1 or self.min_size < 0 \
                or self.max_aspect_ratio < 0:
            raise ValueError(f"bad image options: {self}")


def open_image(source: ImageSource, max_pixels: int) -> Image.Image:
    """Decode a path / bytes / renderable source to an RGB image, or raise SkipSample."""
    if hasattr(source, "render"):
        return source.render().convert("RGB")
    if isinstance(source, str):
        if not os.path.isfile(source):
            raise SkipSample(MISSING_FILE, "no such file")
        with open(source, "rb") as f:
            data = f.read()
    else:
        data = bytes(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise SkipSample(TOO_MANY_PIXELS, f"{img.width}x{img.height}")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # a portrait photo stored landscape + EXIF rotation
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipSample(TOO_MANY_PIXELS, str(exc)) from None
    except UnidentifiedImageError:
        raise SkipSample(NOT_AN_IMAGE, "not a known image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise SkipSample(CORRUPT_IMAGE, str(exc)) from None
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def resize(img: Image.Image, size: int, mode: str) -> Image.Image:
    """Shorter side to `size` keeping aspect, or a centre square crop of `size`, or unchanged."""
    if mode == "none":
        return img
    if mode == "center_crop":
        return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(new, Image.Resampling.BICUBIC)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def check_geometry(img: Image.Image, opts: ImageOptions) -> None:
    """The optional filters on the source size: --min-image-size and --max-aspect-ratio."""
    short, long = min(img.size), max(img.size)
    if short < opts.min_size:
        raise SkipSample(TOO_SMALL, f"{img.width}x{img.height} < {opts.min_size}")
    if opts.max_aspect_ratio and long > opts.max_aspect_ratio * short:
        raise SkipSample(BAD_ASPECT_RATIO, f"{img.width}x{img.height}")


def process_image(source: ImageSource, opts: ImageOptions) -> bytes:
    """Source -> checked, resized, re-encoded JPEG bytes (deterministic for the same input)."""
    img = open_image(source, opts.max_pixels)
    check_geometry(img, opts)
    return encode_jpeg(resize(img, opts.size, opts.resize_mode), opts.quality)
