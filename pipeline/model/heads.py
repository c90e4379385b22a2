"""Pretraining heads: ITC (projections + learnable temperature), ITM (pooled joint CLS), MLM (tied).

Shapes: B batch, D hidden, P projection dim, M masked tokens, V vocab.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ITCHead(nn.Module):
    """Image/text CLS -> L2-normalised projections and the logit scale exp(t) (CLIP init 1/0.07)."""

    def __init__(self, hidden_size: int, proj_dim: int | None = None, init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0):
        super().__init__()
        proj_dim = proj_dim or hidden_size
        self.image_proj = nn.Linear(hidden_size, proj_dim, bias=False)
        self.text_proj = nn.Linear(hidden_size, proj_dim, bias=False)
        # shape [1], not []: DeepSpeed's bf16 broadcast of parameters cannot view a 0-dim tensor as bytes
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)
        for lin in (self.image_proj, self.text_proj):
            nn.init.trunc_normal_(lin.weight, std=0.02)

    def embed_image(self, image_cls_bd: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(image_cls_bd).float(), dim=-1)

    def embed_text(self, text_cls_bd: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_cls_bd).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.float().clamp(max=self.max_log_scale).exp().squeeze(0)

    def forward(self, image_cls_bd: torch.Tensor, text_cls_bd: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image_bp, text_bp, logit_scale) with unit-norm fp32 features."""
        return self.embed_image(image_cls_bd), self.embed_text(text_cls_bd), self.scale()


class ITMHead(nn.Module):
    """Joint CLS -> tanh pooler -> 2 logits (0 = not matching, 1 = matching)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.classifier = nn.Linear(hidden_size, 2)
        for lin in (self.pooler, self.classifier):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, cls_bd: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(cls_bd)))


class MLMHead(nn.Module):
    """BERT-style transform + decoder tied to the token embedding: [..., D] -> [..., V]."""

    def __init__(self, token_embedding: nn.Embedding, layer_norm_eps: float = 1e-6):
        super().__init__()
        hidden = token_embedding.embedding_dim
        self.transform = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.token_embedding = token_embedding  # shared module: the decoder weight IS the embedding
        self.bias = nn.Parameter(torch.zeros(token_embedding.num_embeddings))
        nn.init.trunc_normal_(self.transform.weight, std=0.02)
        nn.init.zeros_(self.transform.bias)

    def forward(self, hidden_md: torch.Tensor) -> torch.Tensor:
        h_md = self.norm(F.gelu(self.transform(hidden_md)))
        return F.linear(h_md, self.token_embedding.weight, self.bias)
