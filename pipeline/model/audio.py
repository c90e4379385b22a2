"""Audio embedding: AST-style time x frequency patches of a log-mel + CLS + learned positions, padding masked.

Shapes: B batch, T frames, F mel bands, f / t patches along frequency / time, P = f*t patches, D hidden.

Patches follow AST (Gong et al. 2021; ``transformers.ASTPatchEmbeddings``): the log-mel [B, T, F] is read as
a one-channel [B, 1, F, T] image, one Conv2d with kernel (patch_freq, patch_time) and stride (stride_freq,
stride_time) cuts it, and tokens come frequency-major (token f*t_count + t), as AST's positions are laid
out. AST's distillation token is not kept: the sequence is CLS + patches, like the image's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import ModelConfig


def resize_audio_positions(position_1nd: torch.Tensor, freq: int, time: int) -> torch.Tensor:
    """[1, 1+f*t0, D] CLS + frequency-major grid positions -> [1, 1+freq*time, D] (bilinear over the grid);
    the frequency count must stay (it is fixed by the mel bands)."""
    old_time = (position_1nd.shape[1] - 1) // freq
    if old_time * freq != position_1nd.shape[1] - 1:
        raise ValueError(f"positions {list(position_1nd.shape)} are not CLS + a grid of {freq} frequency rows")
    if old_time == time:
        return position_1nd
    grid_1dft = position_1nd[:, 1:].reshape(1, freq, old_time, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(grid_1dft, size=(freq, time), mode="bilinear", align_corners=False)
    resized_1pd = resized.permute(0, 2, 3, 1).reshape(1, freq * time, -1).to(position_1nd.dtype)
    return torch.cat([position_1nd[:, :1], resized_1pd], dim=1)


def audio_patch_flops(cfg: ModelConfig, frames: int) -> float:
    """Forward matmul FLOPs of the audio patch embedding for one [frames, num_mel_bins] log-mel."""
    freq, time = cfg.audio.grid(frames)
    return 2.0 * freq * time * cfg.audio.patch_freq * cfg.audio.patch_time * cfg.hidden_size


class AudioEmbedding(nn.Module):
    """Log-mel [B, T, F] (+ real frame counts [B]) -> tokens [B, 1+P, D], valid [B, 1+P] bool (None without
    lengths). A patch is padding when it starts at or past its clip's length; frames past the length are set
    to 0 before patching, so a real patch that straddles the end never sees what lies beyond it.

    Positions are learned for ``audio.max_frames``; other frame counts interpolate them along time."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        audio = cfg.audio
        self.audio = audio
        self.patch = nn.Conv2d(1, cfg.hidden_size, kernel_size=(audio.patch_freq, audio.patch_time),
                               stride=(audio.stride_freq, audio.stride_time))
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position = nn.Parameter(torch.zeros(1, 1 + audio.num_patches, cfg.hidden_size))

    def forward(self, features_btf: torch.Tensor, lengths_b: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        audio = self.audio
        if features_btf.dim() != 3 or features_btf.shape[2] != audio.num_mel_bins \
                or features_btf.shape[1] < audio.patch_time:
            raise ValueError(f"audio features must be [B, T, F] with F = audio.num_mel_bins={audio.num_mel_bins} "
                             f"and T >= audio.patch_time={audio.patch_time}, got {list(features_btf.shape)}")
        b, frames, _ = features_btf.shape
        x_btf = features_btf.to(self.patch.weight.dtype)
        if lengths_b is not None:
            real_bt = torch.arange(frames, device=x_btf.device)[None] < lengths_b.to(x_btf.device)[:, None]
            x_btf = torch.where(real_bt[..., None], x_btf, torch.zeros((), dtype=x_btf.dtype, device=x_btf.device))
        patches_bpd = self.patch(x_btf.transpose(1, 2)[:, None]).flatten(2).transpose(1, 2)
        freq, time = audio.grid(frames)
        position = resize_audio_positions(self.position, freq, time)
        tokens = torch.cat([self.cls.expand(b, -1, -1), patches_bpd], dim=1) + position
        if lengths_b is None:
            return tokens, None
        starts_t = torch.arange(time, device=x_btf.device) * audio.stride_time
        real_bt = starts_t[None] < lengths_b.to(x_btf.device)[:, None]
        valid_bp = real_bt[:, None, :].expand(b, freq, time).reshape(b, freq * time)
        return tokens, torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x_btf.device), valid_bp], dim=1)
