"""VL-MoE model package: configs, the multiway MoE transformer, heads, init and size accounting.

    from pipeline.model import ModelConfig, MoEConfig, AudioConfig, VLMoE, EncoderOutput, PIXEL_MEAN, PIXEL_STD

Names are imported on first use, so ``pipeline.model.config`` (the recipe's typed model section) loads
without torch or DeepSpeed.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"ModelConfig": "config", "MoEConfig": "config", "AudioConfig": "config",
          "PIXEL_MEAN": "embeddings", "PIXEL_STD": "embeddings",
          "VLMoE": "vlmoe", "EncoderOutput": "vlmoe"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.model.{_WHERE[name]}"), name)
