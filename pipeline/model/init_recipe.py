"""The recipe's ``init:`` section: pretrained weights for a stage's fresh model.

    init:
      vit: /models/vit-base-patch16-224   # transformers ViT folder: image tower, attention, FFNs
      bert: /models/bert-base-uncased     # BERT folder: text token/position embeddings (same vocabulary)
      upcycle: true                       # MoE experts start as copies of the ViT FFN (routers fresh)
      ast: /models/ast-finetuned-audioset # transformers AST folder: audio patches, CLS, positions

    problems = check_init(recipe)   # before launch (pipeline.run.preflight): folders, types, sizes
    apply_init(model, recipe.init)             # at build (pipeline.run.build.build_model), every rank

Only reads files: the same weights on every rank, and each EP rank fills its own local experts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from torch import nn

from pipeline.config_utils import ConfigError
from pipeline.model.pretrained import (PretrainedMismatch, init_from_vit, init_text_embeddings,
                                       vit_config_problems, vit_model_problems)
from pipeline.model.pretrained_ast import ast_config_problems, init_from_ast

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
VIT_TYPES = ("vit",)
BERT_TYPES = ("bert",)  # RoBERTa-likes offset their positions by padding_idx + 1: not mapped
AST_TYPES = ("audio-spectrogram-transformer",)


def apply_init(model: nn.Module, init: Any) -> None:
    """Initialise ``model`` (fresh from-scratch init) from ``init`` (a recipe InitConfig): ViT first, then
    BERT, then AST; ConfigError naming the field when the weights do not fit."""
    if init.vit is not None:
        _named(f"init.vit={init.vit}", lambda: init_from_vit(model, init.vit, upcycle=init.upcycle))
    if init.bert is not None:
        _named(f"init.bert={init.bert}", lambda: init_text_embeddings(model, init.bert, model.cfg.vocab_size))
    if init.ast is not None:
        _named(f"init.ast={init.ast}", lambda: init_from_ast(model, init.ast))


def _named(where: str, load: Callable[[], Any]) -> None:
    try:
        load()
    except (PretrainedMismatch, FileNotFoundError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def check_init(recipe: Any) -> list[str]:
    """Every problem of ``recipe.init`` against ``recipe.model``, one line each naming the field (no weights read)."""
    init, problems, model_cfg = recipe.init, [], recipe.model
    if init.vit is not None:
        problems += vit_problems(init.vit, model_cfg)
    if init.bert is not None:
        problems += bert_problems(init.bert, model_cfg)
    if init.ast is not None:
        problems += ast_problems(init.ast, model_cfg)
    return problems


def vit_problems(folder: str, model_cfg: Any) -> list[str]:
    where = f"init.vit={folder}"
    config, problems = _read_config(where, folder, VIT_TYPES)
    if config is None:
        return problems
    problems += [f"{where}: {p}" for p in vit_config_problems(model_cfg, config) + vit_model_problems(model_cfg)]
    side, patch = config.get("image_size"), config.get("patch_size")
    if isinstance(side, int) and isinstance(patch, int) and side % patch:
        problems.append(f"{where}: image_size={side} is not a multiple of patch_size={patch}")
    return problems


def ast_problems(folder: str, model_cfg: Any) -> list[str]:
    where = f"init.ast={folder}"
    config, problems = _read_config(where, folder, AST_TYPES)
    if config is None:
        return problems
    return problems + [f"{where}: {p}" for p in ast_config_problems(model_cfg, config)]


def bert_problems(folder: str, model_cfg: Any) -> list[str]:
    where = f"init.bert={folder}"
    config, problems = _read_config(where, folder, BERT_TYPES)
    if config is None:
        return problems
    if "text" not in model_cfg.modalities:
        problems.append(f"{where}: model.modalities={model_cfg.modalities} has no 'text' to initialise")
    if config.get("hidden_size") != model_cfg.hidden_size:
        problems.append(f"{where}: hidden_size={config.get('hidden_size')!r} (model.hidden_size needs "
                        f"{model_cfg.hidden_size})")
    if config.get("vocab_size") != model_cfg.vocab_size:
        problems.append(f"{where}: vocab_size={config.get('vocab_size')!r} (model.vocab_size needs "
                        f"{model_cfg.vocab_size}; its vocabulary must be the one of data.tokenizer)")
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int) or positions < model_cfg.max_text_len:
        problems.append(f"{where}: max_position_embeddings={positions!r} < model.max_text_len="
                        f"{model_cfg.max_text_len}; lower model.max_text_len (and data.text_len)")
    return problems


def _read_config(where: str, folder: str, model_types: tuple[str, ...]) -> tuple[dict[str, Any] | None, list[str]]:
    """(config.json as a dict, []) or (None, [the problem]) for a pretrained folder of ``model_types``."""
    path = Path(folder)
    if not path.is_dir():
        return None, [f"{where}: not a folder (give a Hugging Face model folder: config.json + weights)"]
    if not (path / "config.json").is_file():
        return None, [f"{where}: no config.json (save the model with save_pretrained)"]
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        return None, [f"{where}: config.json is not valid JSON ({exc})"]
    if config.get("model_type") not in model_types:
        return None, [f"{where}: config.json model_type={config.get('model_type')!r}; this field takes a "
                      f"{' / '.join(model_types)} folder"]
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        return None, [f"{where}: no weights ({', '.join(WEIGHT_FILES)})"]
    return config, []
