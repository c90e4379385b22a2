"""``VLMoEModel``: a ``transformers`` ``PreTrainedModel`` holding the VL-MoE body (experts local) and the
task's heads, with the parameter names of the training checkpoints (``model.*``, ``heads.*``), so
``save_pretrained`` / ``from_pretrained`` (safetensors, sharded) work. No ``deepspeed`` import.

Shapes: B batch, N joint tokens, D hidden, L text length, A outputs of a classifier head.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from pipeline.hf.configuration import VLMoEConfig
from pipeline.hf.heads import build_head, input_size
from pipeline.model.moe import local_experts


@dataclasses.dataclass
class VLMoEOutput(ModelOutput):
    """``last_hidden_state`` [B, N, D] (normed), ``cls`` [B, D] (first token), ``pooled`` [B, D] (what the heads
    read), ``token_mask`` [B, N] (False = padding), ``logits``: classifier head name -> [B, A] fp32 (the heads
    that read ``pooled``; their labels are ``config.label_maps[name]``)."""

    last_hidden_state: torch.Tensor | None = None
    cls: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    logits: dict[str, torch.Tensor] | None = None


class VLMoEModel(PreTrainedModel):
    config_class = VLMoEConfig
    base_model_prefix = "vlmoe"
    main_input_name = "pixel_values"

    def __init__(self, config: VLMoEConfig):
        super().__init__(config)
        from pipeline.model.vlmoe import VLMoE

        with local_experts():
            self.model = VLMoE(config.model_config())
        self.heads = nn.ModuleDict({name: build_head(spec, self.model) for name, spec in (config.heads or {}).items()})
        # the MLM decoder IS the token embedding (MLMHead): one tensor in the files
        self._tied_weights_keys = {f"heads.{name}.token_embedding.weight": "model.embeddings.text.token.weight"
                                   for name, spec in (config.heads or {}).items() if spec["type"] == "mlm"}
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: VLMoE and the heads initialise themselves; ``from_pretrained`` then loads every tensor."""

    def classifier_heads(self) -> list[str]:
        """Heads that map ``pooled`` [B, D] to logits (VQA, classification, SNLI-VE, ...)."""
        hidden = self.model.cfg.hidden_size
        return [name for name, spec in (self.config.heads or {}).items() if input_size(spec) == hidden]

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, audio_values: torch.Tensor | None = None,
                audio_lengths: torch.Tensor | None = None, causal: bool = False, **_: Any) -> VLMoEOutput:
        """One pass over what is given (image [B, 3, H, W] normalised, text ids/mask [B, L], log-mel
        [B, T, F] with real frames [B]), as the training code's ``VLMoE.forward``; then every classifier head
        on ``pooled``."""
        out = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                         causal=causal, audio_features=audio_values, audio_lengths=audio_lengths)
        logits = {name: self.heads[name](out.pooled).float() for name in self.classifier_heads()}
        return VLMoEOutput(last_hidden_state=out.hidden, cls=out.cls, pooled=out.pooled, token_mask=out.token_mask,
                           logits=logits)


def register_auto_classes() -> None:
    """``AutoConfig`` / ``AutoModel`` know ``model_type: vlmoe`` (safe to call twice)."""
    try:
        AutoConfig.register(VLMoEConfig.model_type, VLMoEConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModel.register(VLMoEConfig, VLMoEModel)
    except ValueError:
        pass


def load_export(folder: str | Path, eval_capacity_factor: float | None = None, device: str = "cpu"
                ) -> tuple[VLMoEModel, Any]:
    """(model in eval mode, tokenizer or None without text) of an export folder. ``eval_capacity_factor``
    replaces the config's ``moe.eval_capacity_factor`` before the model is built (e.g. num_experts / top_k: no
    token dropped): the mechanism export's own option uses, not a patch of built gates."""
    from transformers import AutoTokenizer

    config = VLMoEConfig.from_pretrained(folder)
    if eval_capacity_factor is not None:
        vlmoe = dict(config.vlmoe or {})
        vlmoe["moe"] = {**(vlmoe.get("moe") or {}), "eval_capacity_factor": eval_capacity_factor}
        config.vlmoe = vlmoe
    model = VLMoEModel.from_pretrained(folder, config=config).eval().to(device)
    if "text" not in model.model.cfg.modalities:  # nothing to tokenize (an export may then have no tokenizer)
        return model, None
    return model, AutoTokenizer.from_pretrained(folder, config=config)  # config: no model-type warning
