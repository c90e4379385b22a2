"""Audio loading, checks, mono mix-down, resampling (soxr) and FLAC encoding (runs inside the worker processes).

Policy: every channel is averaged to mono; the clip is resampled to one rate with soxr (libsoxr, "HQ");
a clip longer than ``max_seconds`` keeps its first ``max_seconds`` (cropped from the start); nothing is
padded (the loader pads). The stored FLAC is 16-bit PCM. Bad audio raises ``SkipSample`` with its reason:
unreadable, empty (no frames or a 0-byte file), shorter than ``min_seconds``, NaN/inf samples in the
stored part, silent (peak of the stored mono clip below ``silence_peak``), or content whose format is not
the one its file extension says. Only the first ``max_seconds`` of a file are decoded.
"""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import soundfile as sf
import soxr

from data_prep.records import (AUDIO_EXTENSION_MISMATCH, AUDIO_NOT_FINITE, AUDIO_TOO_SHORT, EMPTY_AUDIO,
                               MISSING_FILE, SILENT_AUDIO, UNREADABLE_AUDIO, AudioSource, SkipSample)

RESAMPLE_QUALITY = "HQ"  # soxr's default quality recipe
# File extension -> the soundfile (libsndfile) formats its content may have.
EXTENSION_FORMATS = {
    ".wav": {"WAV", "WAVEX", "RF64"}, ".flac": {"FLAC"}, ".ogg": {"OGG"}, ".oga": {"OGG"}, ".opus": {"OGG"},
    ".mp3": {"MP3"}, ".aiff": {"AIFF"}, ".aif": {"AIFF"}, ".au": {"AU"}, ".caf": {"CAF"}, ".w64": {"W64"},
}
AUDIO_EXTENSIONS = tuple(EXTENSION_FORMATS)


@dataclasses.dataclass(frozen=True)
class AudioOptions:
    """How every clip is turned into the output FLAC."""

    sample_rate: int = 16000  # output rate in Hz
    max_seconds: float = 30.0  # longer clips keep their first max_seconds
    min_seconds: float = 0.1  # shorter clips (before cropping) are skipped as audio_too_short
    silence_peak: float = 1e-4  # stored clips whose peak |sample| (full scale 1.0) is below are silent_audio

    def __post_init__(self):
        if self.sample_rate < 1000 or self.max_seconds <= 0 or self.min_seconds < 0 or self.silence_peak < 0:
            raise ValueError(f"bad audio options: {self} (need sample_rate >= 1000, max_seconds > 0, "
                             f"min_seconds >= 0, silence_peak >= 0)")
        if self.min_seconds > self.max_seconds:
            raise ValueError(f"--min-seconds {self.min_seconds} is above --max-seconds {self.max_seconds}")


def _check_extension(path: str, file_format: str) -> None:
    expected = EXTENSION_FORMATS.get(os.path.splitext(path)[1].lower())
    if expected is not None and file_format not in expected:
        raise SkipSample(AUDIO_EXTENSION_MISMATCH, f"content is {file_format}, extension says "
                                                   f"{'/'.join(sorted(expected))}")


@dataclasses.dataclass(frozen=True)
class Decoded:
    samples: np.ndarray  # float32 [frames, channels]: the first max_seconds of the clip
    rate: int
    frames: int  # of the whole clip


def _read(f: sf.SoundFile, max_seconds: float) -> Decoded:
    wanted = min(f.frames, int(np.ceil(max_seconds * f.samplerate)))
    samples = f.read(wanted, dtype="float32", always_2d=True)
    frames = len(samples) if len(samples) < wanted else f.frames  # a truncated file holds less than it says
    return Decoded(samples, f.samplerate, frames)


def decode_audio(source: AudioSource, max_seconds: float) -> Decoded:
    """The first `max_seconds` of a path / bytes / renderable source, or SkipSample."""
    if hasattr(source, "render"):
        samples, rate = source.render()
        samples = np.asarray(samples, dtype=np.float32).reshape(len(samples), -1)
        return Decoded(samples[: int(np.ceil(max_seconds * rate))], rate, len(samples))
    if isinstance(source, str):
        if not os.path.isfile(source):
            raise SkipSample(MISSING_FILE, "no such file")
        empty = os.path.getsize(source) == 0
    else:
        empty = len(source) == 0
        source = io.BytesIO(bytes(source))
    if empty:
        raise SkipSample(EMPTY_AUDIO, "0-byte file")
    try:
        with sf.SoundFile(source) as f:
            if isinstance(source, str):
                _check_extension(source, f.format)
            return _read(f, max_seconds)
    except sf.LibsndfileError as exc:  # its str() may name a BytesIO object (an address): not reproducible
        raise SkipSample(UNREADABLE_AUDIO, exc.error_string) from None
    except (RuntimeError, ValueError, TypeError) as exc:
        raise SkipSample(UNREADABLE_AUDIO, str(exc).strip() or type(exc).__name__) from None


def to_mono_clip(clip: Decoded, opts: AudioOptions) -> np.ndarray:
    """Checked, mono, cropped, resampled float32 clip at opts.sample_rate (raises SkipSample)."""
    if clip.frames == 0:
        raise SkipSample(EMPTY_AUDIO, "no audio frames")
    if clip.frames < opts.min_seconds * clip.rate:
        raise SkipSample(AUDIO_TOO_SHORT, f"{clip.frames / clip.rate:.3f} s < --min-seconds {opts.min_seconds}")
    mono = clip.samples.mean(axis=1, dtype=np.float32)
    if not np.isfinite(mono).all():  # a NaN/inf in any channel makes the mean non-finite
        raise SkipSample(AUDIO_NOT_FINITE, "NaN or infinite samples")
    if clip.rate != opts.sample_rate:
        mono = soxr.resample(mono, clip.rate, opts.sample_rate, quality=RESAMPLE_QUALITY)
    mono = mono[: int(round(opts.max_seconds * opts.sample_rate))]
    peak = float(np.abs(mono).max()) if mono.size else 0.0
    if peak < opts.silence_peak:
        raise SkipSample(SILENT_AUDIO, f"peak {peak:.2g} < {opts.silence_peak}")
    return mono


def encode_flac(mono: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(mono, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def process_audio(source: AudioSource, opts: AudioOptions) -> tuple[bytes, dict]:
    """Source -> (FLAC bytes, facts for the sample's json) (deterministic for the same input)."""
    clip = decode_audio(source, opts.max_seconds)
    mono = to_mono_clip(clip, opts)
    info = {"sample_rate": opts.sample_rate, "seconds": round(len(mono) / opts.sample_rate, 6),
            "source_sample_rate": clip.rate, "source_channels": int(clip.samples.shape[1]),
            "source_seconds": round(clip.frames / clip.rate, 6)}
    return encode_flac(mono, opts.sample_rate), info
