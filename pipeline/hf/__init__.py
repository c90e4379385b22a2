"""``transformers`` classes for an exported VL-MoE (``python -m pipeline.export``): no DeepSpeed needed.

    from pipeline.hf import VLMoEModel, register_auto_classes
    model = VLMoEModel.from_pretrained("exports/vqa").eval()     # local experts, heads, label maps
    out = model(pixel_values=px_bchw, input_ids=ids_bl, attention_mask=mask_bl)
    out.pooled, out.logits["vqa"], model.config.label_maps["vqa"]   # [B, D], [B, A], the A answers
    register_auto_classes()                                      # then AutoModel.from_pretrained works too

Importing this package, its classes and loading a model never import ``deepspeed``.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"VLMoEConfig": "configuration", "VLMoEModel": "modeling", "VLMoEOutput": "modeling",
          "register_auto_classes": "modeling"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline.hf' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.hf.{_WHERE[name]}"), name)
