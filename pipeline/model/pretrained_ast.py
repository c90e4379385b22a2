"""Audio embedding from a Hugging Face AST folder (``transformers.ASTModel`` / ``ASTForAudioClassification``).

    problems = ast_config_problems(cfg, json.loads((folder / "config.json").read_text()))   # before launch
    init_from_ast(model, folder)    # after the from-scratch init (and init.vit / init.bert)

What is copied: the patch projection, the CLS token and the positions (CLS position, then the patch grid,
interpolated along time when AST's ``max_length`` gives another number of time patches than
``audio.max_frames``). AST's distillation token and its position are not used (our sequence is CLS +
patches); the audio modality-type embedding is zeroed (AST has none). So the audio tokens entering the
first block are AST's embeddings output without the distillation token. AST's blocks are not copied: the
attention is shared with the other modalities (``init.vit`` fills it).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.model.audio import resize_audio_positions
from pipeline.model.pretrained import PretrainedMismatch, read_state_dict

logger = logging.getLogger(__name__)

_AST_PREFIXES = ("audio_spectrogram_transformer.",)  # ASTForAudioClassification wraps the ASTModel
_AST_EMBEDDINGS = {"embeddings.patch_embeddings.projection.weight": "patch.weight",
                   "embeddings.patch_embeddings.projection.bias": "patch.bias", "embeddings.cls_token": "cls"}
_AST_POSITIONS = "embeddings.position_embeddings"


def ast_config_problems(cfg: Any, ast_cfg: dict[str, Any]) -> list[str]:
    """Fields of an AST ``config.json`` (and model settings) that do not fit model config ``cfg``."""
    audio = cfg.audio
    problems = [] if "audio" in cfg.modalities else [
        f"model.modalities={cfg.modalities}: an AST initialises the audio modality; add 'audio'"]
    expect = {"hidden_size": (cfg.hidden_size, "model.hidden_size"),
              "num_mel_bins": (audio.num_mel_bins, "model.audio.num_mel_bins"),
              "frequency_stride": (audio.stride_freq, "model.audio.stride_freq"),
              "time_stride": (audio.stride_time, "model.audio.stride_time")}
    problems += [f"{k}={ast_cfg.get(k)!r} ({field} needs {v!r})" for k, (v, field) in expect.items()
                 if ast_cfg.get(k) != v]
    patch = ast_cfg.get("patch_size")
    if patch != audio.patch_freq or patch != audio.patch_time:
        problems.append(f"patch_size={patch!r} (model.audio.patch_freq and patch_time need it: they are "
                        f"{audio.patch_freq} and {audio.patch_time})")
    length = ast_cfg.get("max_length")
    if not isinstance(length, int) or not isinstance(patch, int) or length < patch:
        problems.append(f"max_length={length!r} is not a frame count of at least one patch ({patch!r})")
    return problems


@torch.no_grad()
def init_from_ast(model: nn.Module, folder: str | Path) -> None:
    """Fill ``model.embeddings["audio"]`` from the AST folder (see the module docstring)."""
    folder = Path(folder)
    ast_cfg = json.loads((folder / "config.json").read_text())
    problems = ast_config_problems(model.cfg, ast_cfg)
    if problems:
        raise PretrainedMismatch(f"AST {folder} does not fit the model: " + "; ".join(problems))
    state = {_strip(k): v for k, v in read_state_dict(folder).items()}
    missing = [k for k in (*_AST_EMBEDDINGS, _AST_POSITIONS) if k not in state]
    if missing:
        raise PretrainedMismatch(f"AST {folder}: no {', '.join(missing)} in its weights")
    emb = model.embeddings["audio"]
    for src, dst in _AST_EMBEDDINGS.items():
        target = emb.get_parameter(dst)
        if state[src].shape != target.shape:
            raise PretrainedMismatch(f"AST {folder}: {src} {list(state[src].shape)} does not fit "
                                     f"embeddings.audio.{dst} {list(target.shape)}")
        target.copy_(state[src].to(target.dtype))
    freq, time = model.cfg.audio.grid()  # AST has the same frequency rows (same bands, patch and stride)
    positions = state[_AST_POSITIONS]  # [1, 2 + f*t, D]: CLS, distillation, grid
    grid_positions = torch.cat([positions[:, :1], positions[:, 2:]], dim=1)
    emb.position.copy_(resize_audio_positions(grid_positions, freq, time).to(emb.position.dtype))
    model.modality_type.weight[model.cfg.modalities.index("audio")] = 0
    logger.info("audio embedding from AST %s (%d x %d patches)", folder, freq, time)


def _strip(key: str) -> str:
    for prefix in _AST_PREFIXES:
        key = key.removeprefix(prefix)
    return key
