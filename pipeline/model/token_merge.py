"""Token merging of image patches between blocks: ``model.token_merge`` (ToMe, Bolya et al. 2022, arXiv 2210.09461).

Shapes: B batch, N tokens of the joint sequence, D hidden, P image patch tokens before a merge, R tokens merged
away by it, A / Z the two halves of the patches (A: even positions, Z: odd), K the A tokens kept.

After each block of ``cfg.token_merge_blocks`` the image patches (never the image CLS or summary tokens, text or
audio tokens) lose R = ``cfg.token_merge`` tokens by bipartite soft matching: each A token's edge goes to its
most similar Z token (cosine of the block's output hidden states, no gradient); the R A tokens with the most
similar edges are averaged into their Z partners, weighted by size (the patches a token holds), and the other A tokens
stay. The merged sequence is: kept A tokens in their order, then the Z tokens. R depends only on the shapes
(``ModelConfig.merged_after``), never on the data, so every rank makes the same MoE calls with the same token
counts (``pipeline.model.blocks``), and the routing statistics of later blocks count the merged tokens.

Proportional attention (``cfg.token_merge_proportional``, ToMe eq. 1): a key of size s gets log s added to
its attention logits, so a merged token weighs in softmax as the s tokens it replaced: merging identical
tokens changes nothing for the tokens that attend them.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.blocks import Segment, attention_mask, valid_tokens


def bipartite_merge(x_bpd: torch.Tensor, size_bp: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` of the patches ``x_bpd`` (sizes ``size_bp``, float) away -> ([B, P-r, D], [B, P-r]).
    At most P // 2 are merged (every A token into a Z token)."""
    b, p, d = x_bpd.shape
    r = min(r, p // 2)
    if r <= 0:
        return x_bpd, size_bp
    with torch.no_grad():
        metric_bpd = F.normalize(x_bpd.float(), dim=-1)
        scores_baz = metric_bpd[:, ::2] @ metric_bpd[:, 1::2].transpose(1, 2)
        best_ba, partner_ba = scores_baz.max(dim=-1)
        order_ba = best_ba.argsort(dim=-1, descending=True, stable=True)
        src_br = order_ba[:, :r]
        keep_bk = order_ba[:, r:].sort(dim=-1).values
        dst_br = partner_ba.gather(1, src_br)
    weighted_bpd = x_bpd * size_bp[..., None].to(x_bpd.dtype)
    a_bad, z_bzd = weighted_bpd[:, ::2], weighted_bpd[:, 1::2]
    size_a, size_z = size_bp[:, ::2], size_bp[:, 1::2]
    kept_bkd = a_bad.gather(1, keep_bk[..., None].expand(b, -1, d))
    z_bzd = z_bzd.scatter_add(1, dst_br[..., None].expand(b, r, d), a_bad.gather(1, src_br[..., None].expand(b, r, d)))
    size_z = size_z.scatter_add(1, dst_br, size_a.gather(1, src_br))
    size_new = torch.cat([size_a.gather(1, keep_bk), size_z], dim=1)
    x_new = torch.cat([kept_bkd, z_bzd], dim=1) / size_new[..., None].to(x_bpd.dtype)
    return x_new, size_new


def merge_image_tokens(x_bnd: torch.Tensor, size_bn: torch.Tensor, segments: list[Segment], r: int, lead: int = 1
                       ) -> tuple[torch.Tensor, torch.Tensor, list[Segment]]:
    """Merge ``r`` image patches of the joint sequence away (the image's ``lead`` tokens before its patches,
    CLS and summary tokens, and every other segment kept): the new hidden states, token sizes [B, N'] and
    segments (later segments shifted)."""
    image = next(s for s in segments if s.modality == "image")
    if image.valid is not None:
        raise ValueError("token merging needs an image segment without padding")
    first = image.start + lead  # the image CLS and summary tokens stay
    patches_bpd, size_bp = bipartite_merge(x_bnd[:, first:image.end], size_bn[:, first:image.end], r)
    merged = image.end - first - patches_bpd.shape[1]
    x_bnd = torch.cat([x_bnd[:, :first], patches_bpd, x_bnd[:, image.end:]], dim=1)
    size_bn = torch.cat([size_bn[:, :first], size_bp, size_bn[:, image.end:]], dim=1)
    shifted = [Segment(s.modality, s.start - merged * (s.start > image.start),
                       s.end - merged * (s.end > image.start), s.valid) for s in segments]
    return x_bnd, size_bn, shifted


def merged_attention_mask(segments: list[Segment], valid_bn: torch.Tensor | None, size_bn: torch.Tensor,
                          batch: int, causal: bool, text_prefix_b: torch.Tensor | None, proportional: bool,
                          dtype: torch.dtype) -> torch.Tensor | None:
    """The attention mask of a merged sequence: ``blocks.attention_mask``'s rules; with ``proportional`` an
    additive float mask (log size of each key, -inf where not allowed; [B,1,1,N] when all is allowed)."""
    allowed_b1nn = attention_mask(segments, valid_bn, batch, causal, size_bn.device, text_prefix_b)
    if not proportional:
        return allowed_b1nn
    log_size_b11n = size_bn.log().to(dtype)[:, None, None, :]
    if allowed_b1nn is None:
        return log_size_b11n
    return torch.where(allowed_b1nn, log_size_b11n, float("-inf"))


def merge_after_block(x_bnd: torch.Tensor, size_bn: torch.Tensor | None, segments: list[Segment], r: int,
                      causal: bool, text_prefix_b: torch.Tensor | None, proportional: bool, lead: int = 1
                      ) -> tuple[torch.Tensor, torch.Tensor, list[Segment], torch.Tensor | None, torch.Tensor | None]:
    """One merge between two blocks of ``VLMoE.encode``: (hidden states, token sizes (None before the first
    merge: all 1), segments, valid mask, attention mask) of the sequence with ``r`` image patches fewer
    (``lead``: the image tokens before its patches, never merged: ``cfg.lead_tokens``)."""
    batch = x_bnd.shape[0]
    if size_bn is None:
        size_bn = torch.ones(batch, x_bnd.shape[1], device=x_bnd.device)
    x_bnd, size_bn, segments = merge_image_tokens(x_bnd, size_bn, segments, r, lead)
    valid_bn = valid_tokens(segments, batch, x_bnd.device)
    mask = merged_attention_mask(segments, valid_bn, size_bn, batch, causal, text_prefix_b, proportional, x_bnd.dtype)
    return x_bnd, size_bn, segments, valid_bn, mask


@dataclasses.dataclass
class MergedKeys:
    """The cached keys of the blocks after a merge (``DecodeCache.merged``): which a new token may attend and
    their log sizes (None: no proportional attention)."""

    valid_bm: torch.Tensor  # [B, M] bool
    log_size_bm: torch.Tensor | None  # [B, M] float

    @classmethod
    def of(cls, valid_bn: torch.Tensor | None, size_bn: torch.Tensor, proportional: bool) -> MergedKeys:
        """The keys a merged pass leaves in the cache (``valid_bn`` None: no padding)."""
        valid = valid_bn if valid_bn is not None else torch.ones_like(size_bn, dtype=torch.bool)
        return cls(valid, size_bn.log() if proportional else None)

    def extend(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """Append n new (valid, size 1) tokens; the decoding mask [B, 1, n, M+n] of their queries (bool, or
        float with proportional attention): every valid cached key, and the new tokens causally."""
        batch, cached = self.valid_bm.shape
        device = self.valid_bm.device
        self.valid_bm = torch.cat([self.valid_bm, torch.ones(batch, n, dtype=torch.bool, device=device)], dim=1)
        allowed_bnm = self.valid_bm[:, None, :].expand(batch, n, cached + n).clone()
        allowed_bnm[:, :, cached:] &= torch.ones(n, n, dtype=torch.bool, device=device).tril()
        if self.log_size_bm is None:
            return allowed_bnm[:, None]
        self.log_size_bm = torch.cat([self.log_size_bm, self.log_size_bm.new_zeros(batch, n)], dim=1)
        return torch.where(allowed_bnm, self.log_size_bm[:, None, :].to(dtype), float("-inf"))[:, None]

    def select(self, index_b: torch.Tensor) -> None:
        self.valid_bm = self.valid_bm[index_b]
        if self.log_size_bm is not None:
            self.log_size_bm = self.log_size_bm[index_b]


@contextlib.contextmanager
def merging_off(model: nn.Module) -> Iterator[None]:
    """Inside, ``model`` (a ``VLMoE``) encodes without token merging (the weights run unmerged as well): what
    maps every image token to its patch (routing pictures) uses it."""
    cfg = model.cfg
    saved = cfg.token_merge
    cfg.token_merge = 0
    try:
        yield
    finally:
        cfg.token_merge = saved
