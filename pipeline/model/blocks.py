"""Multiway transformer block: pre-LN shared self-attention, then an FFN chosen by modality.

Shapes: B batch, N tokens (all modalities, concatenated in ``Segment`` order), D hidden, H heads,
K head dim, S = B*n tokens of one FFN call.

FFN routing per block (``ModelConfig.ffn_keys``):
- MoE layer, ``routing: shared``: every token through the single pool ``shared``.
- fusion layer with >1 modality present: every token through the shared VL-FFN ``vl``.
- otherwise: each modality's tokens through its own FFN (dense or MoE, own router).
Each FFN call gets all B*n tokens of its span, padding included (``used`` masks it out of capacity), so
the calls and token counts depend only on the mode and batch shape, never on the data.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.moe import build_ffn, run_ffn
from pipeline.model.moe_stats import MoEStats
from pipeline.model.sparse_attention import LocalLayout, attention_rows, local_attention


@dataclasses.dataclass
class Segment:
    """A contiguous span [start, end) of the joint sequence holding one modality's tokens."""

    modality: str
    start: int
    end: int
    valid: torch.Tensor | None  # [B, end-start] bool, None = all valid


class LayerKV:
    """One block's attention keys and values of the tokens seen so far ([B, H, M, K] each), for decoding."""

    def __init__(self) -> None:
        self.k_bhmk: torch.Tensor | None = None
        self.v_bhmk: torch.Tensor | None = None

    def append(self, k_bhnk: torch.Tensor, v_bhnk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_bhmk is None:
            self.k_bhmk, self.v_bhmk = k_bhnk, v_bhnk
        else:
            self.k_bhmk = torch.cat([self.k_bhmk, k_bhnk], dim=2)
            self.v_bhmk = torch.cat([self.v_bhmk, v_bhnk], dim=2)
        return self.k_bhmk, self.v_bhmk

    def select(self, index_b: torch.Tensor) -> None:
        """Keep rows ``index_b`` of the batch (beam search reorders and repeats beams)."""
        if self.k_bhmk is not None:
            self.k_bhmk, self.v_bhmk = self.k_bhmk[index_b], self.v_bhmk[index_b]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_dropout = cfg.attn_dropout
        if cfg.qk_norm:  # per head dim K, shared by the heads (ViT-22B)
            head_dim = cfg.hidden_size // cfg.num_heads
            self.q_norm = nn.LayerNorm(head_dim, eps=cfg.layer_norm_eps)
            self.k_norm = nn.LayerNorm(head_dim, eps=cfg.layer_norm_eps)

    def forward(self, x_bnd: torch.Tensor, mask_b1nm: torch.Tensor | None, cache: LayerKV | None = None,
                layout: LocalLayout | None = None) -> torch.Tensor:
        """``mask_b1nm``: True = query n may attend key m. With ``cache`` the keys and values of these n tokens
        are appended to it and the queries attend to every cached key (M = cached + n). ``layout``: local
        attention (``pipeline.model.sparse_attention``) instead of ``mask_b1nm``, for a pass with no cached
        keys."""
        b, n, d = x_bnd.shape
        qkv_bn3hk = self.qkv(x_bnd).view(b, n, 3, self.num_heads, d // self.num_heads)
        dropout_p = self.attn_dropout if self.training else 0.0
        if layout is not None:
            if hasattr(self, "q_norm"):
                qkv_bn3hk = torch.stack([self.q_norm(qkv_bn3hk[:, :, 0]), self.k_norm(qkv_bn3hk[:, :, 1]),
                                         qkv_bn3hk[:, :, 2]], dim=2)
            if cache is not None:
                cache.append(qkv_bn3hk[:, :, 1].transpose(1, 2), qkv_bn3hk[:, :, 2].transpose(1, 2))
            return self.proj(local_attention(qkv_bn3hk, layout, dropout_p))
        q_bhnk, k_bhnk, v_bhnk = qkv_bn3hk.permute(2, 0, 3, 1, 4).unbind(0)  # unbind: no zero-filled grads
        if hasattr(self, "q_norm"):
            q_bhnk, k_bhnk = self.q_norm(q_bhnk), self.k_norm(k_bhnk)
        if cache is not None:
            k_bhnk, v_bhnk = cache.append(k_bhnk, v_bhnk)
        out_bhnk = F.scaled_dot_product_attention(q_bhnk, k_bhnk, v_bhnk, attn_mask=mask_b1nm, dropout_p=dropout_p)
        return self.proj(out_bhnk.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        sparse = index in cfg.moe_layers
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = nn.ModuleDict({key: build_ffn(cfg, sparse and (key != "vl" or cfg.moe.sparse_vl_ffn))
                                  for key in cfg.ffn_keys(index)})
        self.drop = nn.Dropout(cfg.dropout)

    def _spans(self, segments: list[Segment], fused: bool | None) -> list[tuple[str, list[Segment]]]:
        """(ffn key, segments it processes) in call order. ``fused`` (default: more than one segment) picks
        the shared VL-FFN of a fusion block: a decoded text token of an image/audio-prefixed sequence goes
        where the text of the whole sequence would."""
        if "shared" in self.ffn:
            return [("shared", segments)]
        if "vl" in self.ffn and (len(segments) > 1 if fused is None else fused):
            return [("vl", segments)]
        return [(seg.modality, [seg]) for seg in segments]

    def forward(self, x_bnd: torch.Tensor, segments: list[Segment], valid_bn: torch.Tensor | None,
                mask_b1nm: torch.Tensor | None, stats: MoEStats, cache: LayerKV | None = None,
                fused: bool | None = None, layout: LocalLayout | None = None) -> torch.Tensor:
        """``valid_bn``: [B, N] False for padding (None: no padding); each MoE call records its aux loss
        and routed / kept counts in ``stats`` as "layer{i}/{ffn key}". ``cache``/``fused``: decoding
        (``pipeline.model.generation``); an MoE call then may carry fewer tokens than ``min_capacity``.
        ``layout``: this block's local attention (``model.attention: local``), used instead of ``mask_b1nm``."""
        x_bnd = x_bnd + self.drop(self.attn(self.norm1(x_bnd), mask_b1nm, cache, layout))
        h_bnd = self.norm2(x_bnd)
        b, _, d = h_bnd.shape
        outs = []
        for key, segs in self._spans(segments, fused):
            start, end = segs[0].start, segs[-1].end
            used_s = None if valid_bn is None else valid_bn[:, start:end].reshape(-1)
            y_sd, l_aux, count_e, kept_e = run_ffn(self.ffn[key], h_bnd[:, start:end].reshape(-1, d), used_s,
                                                   pad_to_capacity=cache is not None)
            outs.append(y_sd.view(b, end - start, d))
            if l_aux is not None:
                stats.record(f"layer{self.index}/{key}", l_aux, count_e, kept_e)
        y_bnd = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        return x_bnd + self.drop(y_bnd)


def valid_tokens(segments: list[Segment], batch: int, device: torch.device) -> torch.Tensor | None:
    """[B, N] bool, False for padding, over the joint sequence; None when no segment has padding."""
    if all(s.valid is None for s in segments):
        return None
    return torch.cat([s.valid if s.valid is not None else
                      torch.ones(batch, s.end - s.start, dtype=torch.bool, device=device)
                      for s in segments], dim=1)


def attention_mask(segments: list[Segment], valid_bn: torch.Tensor | None, batch: int, causal: bool,
                   device: torch.device, text_prefix_b: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean SDPA mask [B,1,N,N] (True = may attend) or None when every token sees every token.

    Keys that are padding are hidden; with ``causal`` text tokens see earlier text tokens (and all
    non-text tokens) and non-text tokens do not see text. ``text_prefix_b`` [B] (with ``causal``): the
    first P_b text tokens of row b are a bidirectional prefix (they and the media tokens see each other,
    never a later token; every later token sees all of them): the prefix-LM mask of UniLM / BEiT-3, with
    e.g. a question as the prefix and its answer generated after it. Every query always sees itself, so a
    fully padded text never yields an all-masked row (NaN).
    """
    if not causal and valid_bn is None:
        return None
    return attention_rows(segments, valid_bn, batch, causal, device, text_prefix_b)[:, None]
