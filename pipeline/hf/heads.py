"""Task heads as plain JSON specs and back, so an exported model rebuilds them without its task class or
training data: ``head_spec(module) -> dict`` at export, ``build_head(spec, model)`` at load.

Covered: ``ITCHead``, ``ITMHead``, ``MLMHead`` (tied to the model's token embedding) and ``nn.Sequential`` of
Linear / LayerNorm / GELU / Tanh / Dropout (the VQA, GQA, SNLI-VE, NLVR2 and classification heads).
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from pipeline.model.heads import ITCHead, ITMHead, MLMHead


def head_spec(name: str, head: nn.Module) -> dict[str, Any]:
    """JSON-able description of ``head``; ValueError naming the head for a module kind not covered."""
    if isinstance(head, ITCHead):
        return {"type": "itc", "proj_dim": head.image_proj.out_features,
                "max_logit_scale": math.exp(head.max_log_scale)}
    if isinstance(head, ITMHead):
        return {"type": "itm"}
    if isinstance(head, MLMHead):
        return {"type": "mlm", "layer_norm_eps": head.norm.eps}
    if isinstance(head, nn.Sequential):
        return {"type": "sequential", "layers": [_layer_spec(name, layer) for layer in head]}
    raise ValueError(f"head {name!r}: cannot export a {type(head).__name__} (pipeline.hf.heads covers ITC, ITM, "
                     "MLM heads and nn.Sequential of Linear/LayerNorm/GELU/Tanh/Dropout)")


def _layer_spec(name: str, layer: nn.Module) -> list[Any]:
    if isinstance(layer, nn.Linear):
        return ["linear", layer.in_features, layer.out_features, layer.bias is not None]
    if isinstance(layer, nn.LayerNorm):
        return ["layer_norm", list(layer.normalized_shape), layer.eps]
    if isinstance(layer, nn.GELU):
        return ["gelu", layer.approximate]
    if isinstance(layer, nn.Tanh):
        return ["tanh"]
    if isinstance(layer, nn.Dropout):
        return ["dropout", layer.p]
    raise ValueError(f"head {name!r}: cannot export a {type(layer).__name__} layer")


def build_head(spec: dict[str, Any], model: nn.Module) -> nn.Module:
    """The module ``spec`` describes (``model``: the VLMoE, for its hidden size and token embedding)."""
    hidden = model.cfg.hidden_size
    kind = spec.get("type")
    if kind == "itc":
        return ITCHead(hidden, spec["proj_dim"], max_logit_scale=spec["max_logit_scale"])
    if kind == "itm":
        return ITMHead(hidden)
    if kind == "mlm":
        return MLMHead(model.token_embedding, spec["layer_norm_eps"])
    if kind == "sequential":
        return nn.Sequential(*(_layer(item) for item in spec["layers"]))
    raise ValueError(f"unknown head type {kind!r} in {spec}")


def _layer(item: list[Any]) -> nn.Module:
    kind, *args = item
    if kind == "linear":
        return nn.Linear(args[0], args[1], bias=args[2])
    if kind == "layer_norm":
        return nn.LayerNorm(args[0], eps=args[1])
    if kind == "gelu":
        return nn.GELU(approximate=args[0])
    if kind == "tanh":
        return nn.Tanh()
    if kind == "dropout":
        return nn.Dropout(args[0])
    raise ValueError(f"unknown head layer {kind!r}")


def output_size(spec: dict[str, Any]) -> int | None:
    """Outputs of a classifier head (a sequential's last linear), None for other heads."""
    linears = [item for item in spec.get("layers", []) if item[0] == "linear"]
    return linears[-1][2] if spec.get("type") == "sequential" and linears else None


def input_size(spec: dict[str, Any]) -> int | None:
    """Inputs of a classifier head (its first layer's width), None for other heads."""
    layers = spec.get("layers") or []
    if spec.get("type") != "sequential" or not layers:
        return None
    first = layers[0]
    return first[1] if first[0] == "linear" else first[1][0] if first[0] == "layer_norm" else None
