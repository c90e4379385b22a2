"""Log-mel features of a waveform, as the audio embedding reads them: pure numpy, run in loader workers.

    features_tf, length = log_mel(waveform_s, sample_rate, cfg.audio)   # [max_frames, num_mel_bins], int

The computation is AST's (``transformers.ASTFeatureExtractor`` without torchaudio, its numpy path): Kaldi-style
frames of 25 ms every 10 ms (Hann window, DC offset removed, pre-emphasis 0.97, power spectrum), a Kaldi mel
filterbank from 20 Hz to Nyquist (``transformers.audio_utils.mel_filter_bank``), natural log, then frames
padded with zeros (or cut) to ``max_frames`` and normalised as ``(x - mean) / (2 std)``. At 16 kHz the output
equals ``ASTFeatureExtractor(num_mel_bins=F, max_length=T, mean=.., std=..)(waveform)`` (tests check it);
other rates keep the 25 / 10 ms frames. ``length`` counts the frames computed from the clip (the rest is
padding, which the embedding masks).
"""
from __future__ import annotations

import functools

import numpy as np
from transformers.audio_utils import mel_filter_bank, optimal_fft_length, spectrogram, window_function

from pipeline.model.config import AudioConfig

FRAME_SECONDS = 0.025
HOP_SECONDS = 0.010
MIN_FREQUENCY_HZ = 20.0
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07  # float32 epsilon, Kaldi's floor


@functools.lru_cache(maxsize=8)
def _frame_setup(sample_rate: int, num_mel_bins: int) -> tuple[int, int, int, np.ndarray, np.ndarray]:
    """(frame length, hop, FFT length, window, mel filters [FFT/2+1, F]) for one rate and band count."""
    frame, hop = round(FRAME_SECONDS * sample_rate), round(HOP_SECONDS * sample_rate)
    fft = optimal_fft_length(frame)
    filters = mel_filter_bank(num_frequency_bins=fft // 2 + 1, num_mel_filters=num_mel_bins,
                              min_frequency=MIN_FREQUENCY_HZ, max_frequency=sample_rate // 2,
                              sampling_rate=sample_rate, norm=None, mel_scale="kaldi",
                              triangularize_in_mel_space=True)
    return frame, hop, fft, window_function(frame, "hann", periodic=False), filters


def num_frames(num_samples: int, sample_rate: int) -> int:
    """Frames a clip of ``num_samples`` yields (no centring: only whole windows)."""
    frame = round(FRAME_SECONDS * sample_rate)
    hop = round(HOP_SECONDS * sample_rate)
    return 0 if num_samples < frame else 1 + (num_samples - frame) // hop


def log_mel(waveform: np.ndarray, sample_rate: int, cfg: AudioConfig) -> tuple[np.ndarray, int]:
    """Mono ``waveform`` [S] (float, ``cfg.sample_rate`` Hz) -> (normalised log-mel [max_frames, F] float32,
    number of real frames). ValueError for a wrong rate, shape, non-finite samples or a clip under one frame."""
    if sample_rate != cfg.sample_rate:
        raise ValueError(f"audio at {sample_rate} Hz; model.audio.sample_rate is {cfg.sample_rate} "
                         "(resample in data_prep or set model.audio.sample_rate)")
    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be mono [samples], got shape {list(waveform.shape)}")
    frame, hop, fft, window, filters = _frame_setup(sample_rate, cfg.num_mel_bins)
    frames = min(num_frames(len(waveform), sample_rate), cfg.max_frames)
    if frames == 0:
        raise ValueError(f"clip of {len(waveform)} samples is shorter than one {frame}-sample frame")
    clip = waveform[: frame + (frames - 1) * hop].astype(np.float32)
    if not np.isfinite(clip).all():
        raise ValueError("waveform has NaN or infinite samples")
    fbank_tf = spectrogram(clip, window, frame_length=frame, hop_length=hop, fft_length=fft, power=2.0,
                           center=False, preemphasis=PREEMPHASIS, mel_filters=filters, log_mel="log",
                           mel_floor=MEL_FLOOR, remove_dc_offset=True).T
    out = np.zeros((cfg.max_frames, cfg.num_mel_bins), dtype=np.float32)
    out[:frames] = fbank_tf
    return (out - cfg.mean) / (2 * cfg.std), frames
