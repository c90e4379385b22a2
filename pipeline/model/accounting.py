"""Model size accounting for the planner and MFU: parameters (total, active per token) and forward FLOPs
per sample for given model passes. Nothing here allocates real weights.

Shapes: N tokens in one pass, P image patches, L text length, T log-mel frames, D hidden, F FFN width,
E experts, k top-k.

    acc = count_parameters(cfg, image_size=224, text_len=40, passes={"image": 1, "text": 1, "fuse": 4})
    acc = count_parameters(cfg, passes={"audio": 1, "text": 1, "audio+text": 2})   # with audio in modalities
    acc.total_params, acc.active_params_per_token, acc.forward_flops_per_sample   # meta-device model, instant

Definitions
- total_params: every parameter of the model with all E experts of every MoE FFN (global, not per rank).
- expert_params: the part of it inside experts (sharded by ep_size across an EP group).
- active_params_per_token: parameters a token of one modality touches in its own pass (that modality's
  embedding, shared attention and norms, its FFN per block: dense MLP, or router + k experts (+ the
  residual MLP)), averaged over modalities. Heads are not part of the model and not counted.
- forward_flops_per_sample: forward matmul FLOPs (2 per multiply-add) of the passes of one sample
  (``passes``: {kind: count}, what the task runs per sample; a kind is one modality, "+"-joined modalities
  fused in one sequence (e.g. "audio+text"), or "fuse" = every modality of the model); MoE FFNs cost k
  expert MLPs per token (capacity padding and dropping ignored). Audio tokens: CLS + the patches of
  ``audio_frames`` log-mel frames (default ``cfg.audio.max_frames``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator

import torch
from torch import nn

from pipeline.model.audio import audio_patch_flops
from pipeline.model.config import ModelConfig
from pipeline.model.embeddings import patch_embed_flops
from pipeline.model.sparse_attention import attention_pairs

ONE_FUSED_PASS = {"fuse": 1}


@dataclasses.dataclass
class ModelSize:
    total_params: int
    expert_params: int
    active_params_per_token: int
    forward_flops_per_sample: float
    active_params_by_modality: dict[str, int]


def build_meta_model(cfg: ModelConfig) -> nn.Module:
    """The model with every expert (ep_size forced to 1) on the meta device: no memory, no init time."""
    from accelerate import init_empty_weights

    from pipeline.model.vlmoe import VLMoE
    global_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, ep_size=1))
    with init_empty_weights(include_buffers=True), skip_weight_init():
        return VLMoE(global_cfg)


INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                  "sparse_")


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """``torch.nn.init``'s fill functions return their tensor untouched inside, as in
    ``transformers.initialization.no_init_weights`` (which is not used: it imports ``transformers.modeling_utils``).
    Meta tensors hold no values to fill, and filling one runs a dynamo-disabled decomposition whose first call
    imports ``torch._dynamo``: seconds per process for nothing (the plan check runs once per launch)."""
    saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    try:
        for name in saved:
            setattr(torch.nn.init, name, _keep)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _ffn_active(ffn: nn.Module) -> int:
    """Parameters one token uses in this FFN (dense: all; MoE: router + k experts + residual branch)."""
    from pipeline.model.moe import MoEFFN, SparseFFN
    if not isinstance(ffn, MoEFFN):
        return _numel(ffn)
    if not isinstance(ffn, SparseFFN):  # dropless: router + k of the fused experts + shared experts
        shared = _numel(ffn.shared) if ffn.shared is not None else 0
        return _numel(ffn.router) + ffn.top_k * _numel(ffn.experts) // ffn.num_local_experts + shared
    gate = ffn.deepspeed_moe.gate
    per_expert = _numel(ffn.experts[0])
    residual = _numel(ffn.mlp) + _numel(ffn.coefficient) if ffn.use_residual else 0
    return _numel(gate) + gate.k * per_expert + residual


def _active_by_modality(model: nn.Module) -> dict[str, int]:
    result = {}
    for modality in model.cfg.modalities:
        count = _numel(model.embeddings[modality]) + model.cfg.hidden_size + _numel(model.norm)
        if model.summary is not None and modality in model.summary:
            count += model.summary[modality].numel()
        for block in model.blocks:
            count += _numel(block.norm1) + _numel(block.attn) + _numel(block.norm2)
            key = modality if modality in block.ffn else "shared"
            count += _ffn_active(block.ffn[key])
        result[modality] = count
    return result


def _pass_flops(model: nn.Module, segments: dict[str, int], audio_frames: int) -> float:
    """Forward FLOPs of one pass over one sample; ``segments``: modality -> tokens entering the first block
    (``cfg.block_tokens``: later blocks count the image tokens token merging leaves)."""
    cfg = model.cfg
    d = cfg.hidden_size
    flops = 0.0
    if "image" in segments:
        flops += patch_embed_flops(cfg, math.isqrt(segments["image"] - cfg.lead_tokens) * cfg.patch_size)
    if "audio" in segments:
        flops += audio_patch_flops(cfg, audio_frames)
    merged_after = cfg.merged_after(segments["image"] - cfg.lead_tokens) if "image" in segments \
        else [0] * cfg.num_layers
    for block, tokens in zip(model.blocks, cfg.block_tokens(segments)):
        n = sum(tokens.values())
        flops += 2 * n * d * 4 * d + 4 * attention_pairs(cfg, block.index, tokens) * d  # qkv + proj, QK^T + AV
        if "shared" in block.ffn:
            spans = [("shared", n)]
        elif "vl" in block.ffn and len(tokens) > 1:
            spans = [("vl", n)]
        else:
            spans = list(tokens.items())
        for key, count in spans:
            flops += 2 * count * _ffn_active_matmul(block.ffn[key])
        if merged_after[block.index]:  # token merging after this block: the matching's similarities
            patches = tokens["image"] - cfg.lead_tokens
            flops += 2 * ((patches + 1) // 2) * (patches // 2) * d
    return flops


def _ffn_active_matmul(ffn: nn.Module) -> int:
    """Multiply-adds per token in this FFN's weight matrices (biases and norms ignored)."""
    return sum(p.numel() for p in _ffn_weight_params(ffn))


def _ffn_weight_params(ffn: nn.Module) -> list[torch.Tensor]:
    from pipeline.model.moe import MoEFFN, SparseFFN
    if not isinstance(ffn, MoEFFN):
        return [p for p in ffn.parameters() if p.dim() == 2]
    if not isinstance(ffn, SparseFFN):
        shared = [p for p in ffn.shared.parameters() if p.dim() == 2] if ffn.shared is not None else []
        return [ffn.router.gate.weight] + [ffn.experts.w1[0], ffn.experts.w2[0]] * ffn.top_k + shared
    gate = ffn.deepspeed_moe.gate
    weights = [gate.wg.weight] + [p for p in ffn.experts[0].parameters() if p.dim() == 2] * gate.k
    if ffn.use_residual:
        weights += [p for p in ffn.mlp.parameters() if p.dim() == 2] + [ffn.coefficient.weight]
    return weights


def pass_modalities(cfg: ModelConfig, kinds: list[str]) -> dict[str, list[str]]:
    """Pass kind -> its modalities in sequence order; ValueError naming the unknown kinds and the valid ones."""
    names = {kind: list(cfg.modalities) if kind == "fuse" else kind.split("+") for kind in kinds}
    unknown = sorted(kind for kind, mods in names.items()
                     if any(m not in cfg.modalities for m in mods) or len(set(mods)) != len(mods))
    if unknown:
        raise ValueError(f"passes: unknown pass kind(s) {unknown}; valid kinds are 'fuse', one of "
                         f"{cfg.modalities} or several joined by '+' (e.g. {'+'.join(cfg.modalities[-2:])!r})")
    return {kind: [m for m in cfg.modalities if m in mods] for kind, mods in names.items()}


def count_parameters(cfg: ModelConfig, image_size: int | None = None, text_len: int | None = None,
                     passes: dict[str, int] | None = None, model: nn.Module | None = None,
                     audio_frames: int | None = None) -> ModelSize:
    """Sizes of ``cfg`` (built on the meta device unless ``model`` is given) for samples of ``image_size`` x
    ``image_size`` images (positions interpolated when it differs from cfg.image_size), ``text_len`` tokens
    and ``audio_frames`` log-mel frames (defaults: cfg.image_size, cfg.max_text_len, cfg.audio.max_frames)
    run through ``passes`` ({kind: count}; default one fused pass)."""
    passes = ONE_FUSED_PASS if passes is None else passes
    kinds = pass_modalities(cfg, list(passes))
    image_size = image_size or cfg.image_size
    if image_size % cfg.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {cfg.patch_size}")
    audio_frames = audio_frames or cfg.audio.max_frames
    if audio_frames < cfg.audio.patch_time:
        raise ValueError(f"audio_frames {audio_frames} is shorter than one patch (audio.patch_time "
                         f"{cfg.audio.patch_time})")
    model = model or build_meta_model(cfg)
    from pipeline.model.moe import MoEFFN
    total = _numel(model)
    experts = sum(_numel(m.experts) for m in model.modules() if isinstance(m, MoEFFN))
    active = _active_by_modality(model)
    freq, time = cfg.audio.grid(audio_frames)
    tokens = {"image": cfg.lead_tokens + (image_size // cfg.patch_size) ** 2, "text": text_len or cfg.max_text_len,
              "audio": cfg.lead_tokens + freq * time}
    forward = 0.0
    for kind, count in passes.items():
        forward += count * _pass_flops(model, {m: tokens[m] for m in kinds[kind]}, audio_frames)
    return ModelSize(total_params=total, expert_params=experts,
                     active_params_per_token=round(sum(active.values()) / len(active)),
                     forward_flops_per_sample=forward, active_params_by_modality=active)
