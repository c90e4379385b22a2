"""Pure helpers shared by the downstream tasks: fixed-shape image, audio (log-mel) and text tensors,
answer/class files, the single-label cross-entropy.

Shape letters: N texts, L text length, H=W image size, T log-mel frames, F mel bands.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config_utils import ConfigError
from pipeline.model import PIXEL_MEAN, PIXEL_STD
from pipeline.model.audio_features import FRAME_SECONDS, log_mel
from pipeline.tasks.base import LossOutput, SkipSample

log = logging.getLogger(__name__)


def image_tensor(image: Any, size: int) -> torch.Tensor:
    """PIL image -> [3, size, size] float, ``(x/255 - mean) / std``."""
    if not isinstance(image, Image.Image):
        raise SkipSample("image_not_decoded")
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    mean = torch.as_tensor(PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(PIXEL_STD, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean) / std


def blank_image(size: int) -> torch.Tensor:
    return torch.zeros(3, size, size)


AUDIO_FIELD = "flac"  # data_prep writes every clip as 16-bit FLAC
AUDIO_MANIFESTS = ("audio_retrieval", "audio_pairs")  # data_prep folders of clips with captions


def audio_tensor(audio: Any, cfg: Any) -> dict[str, torch.Tensor]:
    """Decoded audio (waveform [S], rate) -> {"audio_values": log-mel [T, F] float (``cfg.max_frames`` frames,
    padding included), "audio_lengths": real frames, long scalar}, with ``cfg`` the model's AudioConfig. A clip
    that cannot give features (wrong rate, under one frame, non-finite) is a SkipSample naming why."""
    if not (isinstance(audio, tuple) and len(audio) == 2):
        raise SkipSample("audio_not_decoded")
    waveform, rate = audio
    if rate != cfg.sample_rate:
        raise SkipSample(f"audio_rate_{rate}_not_{cfg.sample_rate}")
    if len(waveform) < num_frames_samples(cfg):
        raise SkipSample("audio_shorter_than_one_frame")
    if not np.isfinite(waveform).all():
        raise SkipSample("audio_not_finite")
    features, frames = log_mel(waveform, rate, cfg)
    return {"audio_values": torch.from_numpy(features), "audio_lengths": torch.tensor(frames, dtype=torch.long)}


def num_frames_samples(cfg: Any) -> int:
    """Samples in one log-mel frame at ``cfg.sample_rate`` (a shorter clip has no features)."""
    return round(FRAME_SECONDS * cfg.sample_rate)


def blank_audio(cfg: Any) -> dict[str, torch.Tensor]:
    """Padding audio: one real (zero) frame so the embedding never sees a fully masked clip."""
    return {"audio_values": torch.zeros(cfg.max_frames, cfg.num_mel_bins),
            "audio_lengths": torch.tensor(1, dtype=torch.long)}


def tokenize(tokenizer: Any, texts: list[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """texts -> input_ids [N, L] long, attention_mask [N, L] long, padded/truncated to exactly L."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=text_len, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def blank_text(text_len: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding text: a single non-masked token so attention never sees an all-masked row."""
    shape = (text_len,) if n is None else (n, text_len)
    ids = torch.zeros(shape, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    mask[..., 0] = 1
    return ids, mask


def read_json_file(data_dir: Path | None, name: str, key: str, task: str) -> list:
    """``data_dir/name`` -> its ``key`` list, with a clear error naming the file."""
    if data_dir is None:
        raise ConfigError(f"task {task}: needs data.train[0].path (a folder with {name})")
    path = Path(data_dir) / name
    if not path.is_file():
        raise ConfigError(f"task {task}: {path} not found (written by data_prep next to manifest.json)")
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not isinstance(data.get(key), list) or not data[key]:
        raise ConfigError(f"task {task}: {path} must hold a non-empty list under {key!r}")
    return data[key]


def warn_if_unscored(metrics: dict[str, float], task: str) -> dict[str, float]:
    """Say so when no eval sample had a ground truth (``num_scored`` 0, no ``acc``): a test split."""
    if metrics.get("num_scored") == 0:
        log.warning("%s: no eval sample has a ground-truth answer (a test split?): no accuracy; the "
                    "predictions file is what a benchmark server scores", task)
    return metrics


def sample_json(sample: dict[str, Any]) -> dict[str, Any]:
    meta = sample.get("json")
    if not isinstance(meta, dict):
        raise SkipSample("missing_json")
    return meta


def cross_entropy_loss(logits: torch.Tensor, label: torch.Tensor, name: str) -> LossOutput:
    """Cross-entropy of [B, C] logits against [B] labels, logged as ``{name}_ce`` and ``{name}_acc`` (the
    single-label classifier tasks share it)."""
    label = label.long()
    loss = F.cross_entropy(logits, label)
    acc = (logits.argmax(dim=1) == label).float().mean()
    return LossOutput(loss, {f"{name}_ce": loss.detach(), f"{name}_acc": acc.detach()})
