"""Per-modality embeddings: each turns raw inputs into tokens [B, N, D] plus a validity mask.

Shapes: B batch, C channels, H/W image side, P patches, L text length, N tokens, D hidden, V vocab.
A modality adds one class with the same ``forward(...) -> (tokens, mask)`` contract and one entry in
``EMBEDDINGS``; nothing else in the model counts modalities (audio: ``pipeline.model.audio``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.audio import AudioEmbedding
from pipeline.model.config import ModelConfig

PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)


def resize_positions(position_1nd: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1+g*g, D] CLS + square-grid positions -> [1, 1+grid*grid, D] (bicubic over the grid)."""
    old = math.isqrt(position_1nd.shape[1] - 1)
    if old * old != position_1nd.shape[1] - 1:
        raise ValueError(f"positions {list(position_1nd.shape)} are not CLS + a square grid")
    if old == grid:
        return position_1nd
    cls_11d, grid_1nd = position_1nd[:, :1], position_1nd[:, 1:]
    grid_1dgg = grid_1nd.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(grid_1dgg, size=(grid, grid), mode="bicubic", align_corners=False)
    resized_1nd = resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(position_1nd.dtype)
    return torch.cat([cls_11d, resized_1nd], dim=1)


def stem_channels(cfg: ModelConfig) -> list[int]:
    """Channels of the conv stem: input, then one entry per 3x3 stride-2 conv (32, 64, ... capped at D)."""
    return [cfg.patch_in_channels] + [min(cfg.hidden_size, 32 * 2**i) for i in range(cfg.patch_size.bit_length() - 1)]


class FP32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalises in float32 whatever the input and parameter dtype (as torch.autocast does).

    DeepSpeed's bf16/fp16 engines cast parameters but keep buffers in fp32, and the CPU kernel rejects
    bf16 weights with fp32 running statistics. Same parameters, buffers and state-dict keys as
    ``nn.BatchNorm2d``; the running statistics are kept (and updated) in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and (
                self.running_mean is None or self.running_mean.dtype == torch.float32):
            return super().forward(x)
        self._check_input_dim(x)
        for name in ("running_mean", "running_var"):
            buffer = getattr(self, name)
            if buffer is not None and buffer.dtype != torch.float32:
                buffer.data = buffer.data.float()
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        out = F.batch_norm(x.float(), self.running_mean if track else None, self.running_var if track else None,
                           self.weight.float() if self.weight is not None else None,
                           self.bias.float() if self.bias is not None else None,
                           use_batch_stats, factor, self.eps)
        return out.to(x.dtype)


def conv_stem(cfg: ModelConfig) -> nn.Sequential:
    """"Early convolutions help transformers see better" (Xiao et al. 2021): log2(patch_size) blocks of
    3x3 stride-2 conv + BatchNorm + ReLU, then a 1x1 conv to D. Replaces the single patch_size x
    patch_size projection with the same output grid (its FLOPs: ``patch_embed_flops``; what it learns
    faster: BENCHMARKS.md, VQA learning speed)."""
    chans = stem_channels(cfg)
    layers: list[nn.Module] = []
    for c_in, c_out in zip(chans[:-1], chans[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), FP32BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(chans[-1], cfg.hidden_size, 1))


def with_coordinates(pixels_bchw: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C+2, H, W]: x then y of each pixel centre, -1 (left/top) .. 1 (right/bottom)."""
    b, _, h, w = pixels_bchw.shape
    ys = torch.linspace(-1, 1, h, device=pixels_bchw.device, dtype=pixels_bchw.dtype)
    xs = torch.linspace(-1, 1, w, device=pixels_bchw.device, dtype=pixels_bchw.dtype)
    return torch.cat([pixels_bchw, xs.view(1, 1, 1, w).expand(b, 1, h, w),
                      ys.view(1, 1, h, 1).expand(b, 1, h, w)], dim=1)


def patch_embed_flops(cfg: ModelConfig, side: int) -> float:
    """Forward matmul FLOPs of the patch embedding for one ``side`` x ``side`` image."""
    grid = side // cfg.patch_size
    if cfg.patch_embed == "linear":
        return 2.0 * grid * grid * cfg.patch_in_channels * cfg.patch_size ** 2 * cfg.hidden_size
    chans, flops, out = stem_channels(cfg), 0.0, side
    for c_in, c_out in zip(chans[:-1], chans[1:]):
        out = (out + 1) // 2
        flops += 2.0 * out * out * c_in * c_out * 9
    return flops + 2.0 * grid * grid * chans[-1] * cfg.hidden_size


class ImageEmbedding(nn.Module):
    """Patchify (one conv, or a conv stem) + CLS + learned positions (ViT layout): [B,C,H,W] -> [B, 1+P, D],
    mask None. With ``coord_channels`` the patchify sees two coordinate planes next to the pixels.

    Positions are learned for ``image_size``; square images of another size (a multiple of the patch)
    interpolate them (bicubic), as when fine-tuning at a higher resolution."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.coord_channels = cfg.coord_channels
        self.patch = conv_stem(cfg) if cfg.patch_embed == "conv_stem" else \
            nn.Conv2d(cfg.patch_in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, None]:
        side = pixel_values.shape[-1]
        if pixel_values.dim() != 4 or pixel_values.shape[-2] != side or side % self.patch_size:
            raise ValueError(f"pixel_values must be [B, C, S, S] with S a multiple of patch_size="
                             f"{self.patch_size}, got {list(pixel_values.shape)}")
        dtype = next(self.patch.parameters()).dtype
        pixels = pixel_values.to(dtype)
        if self.coord_channels:
            pixels = with_coordinates(pixels)
        patches_bpd = self.patch(pixels).flatten(2).transpose(1, 2)
        cls_b1d = self.cls.expand(patches_bpd.shape[0], -1, -1)
        position = resize_positions(self.position, side // self.patch_size)
        return torch.cat([cls_b1d, patches_bpd], dim=1) + position, None


class TextEmbedding(nn.Module):
    """Token + learned position embeddings: ids [B,L] (+ mask [B,L]) -> [B, L, D], mask bool [B,L]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.token = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_text_len, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions_bl: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions_bl``: explicit position of every token (decoding a token after its prefix); default
        0..L-1 for every row."""
        length = input_ids.shape[1]
        if positions_bl is None:
            if length > self.position.num_embeddings:
                raise ValueError(f"text length {length} exceeds max_text_len={self.position.num_embeddings}")
            tokens_bld = self.token(input_ids) + self.position(torch.arange(length, device=input_ids.device))[None]
        else:
            if int(positions_bl.max()) >= self.position.num_embeddings:
                raise ValueError(f"text position {int(positions_bl.max())} >= max_text_len="
                                 f"{self.position.num_embeddings}")
            tokens_bld = self.token(input_ids) + self.position(positions_bl)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return tokens_bld, attention_mask.bool()


EMBEDDINGS: dict[str, type[nn.Module]] = {"image": ImageEmbedding, "text": TextEmbedding, "audio": AudioEmbedding}
