"""Image-text retrieval recall (R@K) with the K-captions-per-image protocol (COCO/Flickr30k Karpathy).

- image -> text: an image counts as retrieved at K when its best-ranked ground-truth caption is in the
  top K of all captions.
- text -> image: a caption counts when its image is in the top K of all images.
Ties are broken **against** the ground truth: a wrong candidate with a score equal to the ground truth's
ranks above it, so a model that scores everything the same gets 0, not 100.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DEFAULT_KS = (1, 5, 10)


def i2t_ranks(sim: torch.Tensor, text_image: torch.Tensor) -> torch.Tensor:
    """sim [N_img, N_txt], text_image [N_txt] (image index of each caption) -> [N_img] 0-based rank of
    each image's best ground-truth caption (number of wrong captions scoring >= it)."""
    n_img = sim.shape[0]
    positive = text_image.unsqueeze(0) == torch.arange(n_img).unsqueeze(1)  # [N_img, N_txt]
    if not bool(positive.any(dim=1).all()):
        raise ValueError("every image needs at least one caption for image->text recall")
    best_pos = sim.masked_fill(~positive, float("-inf")).max(dim=1).values  # [N_img]
    return ((sim >= best_pos.unsqueeze(1)) & ~positive).sum(dim=1)


def t2i_ranks(sim: torch.Tensor, text_image: torch.Tensor) -> torch.Tensor:
    """sim [N_img, N_txt] -> [N_txt] 0-based rank of each caption's image (wrong images scoring >= it)."""
    sim_t = sim.t()  # [N_txt, N_img]
    pos_score = sim_t.gather(1, text_image.long().unsqueeze(1))  # [N_txt, 1]
    wrong = torch.ones_like(sim_t, dtype=torch.bool).scatter_(1, text_image.long().unsqueeze(1), False)
    return ((sim_t >= pos_score) & wrong).sum(dim=1)


def retrieval_recall(sim: torch.Tensor, text_image: torch.Tensor,
                     ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """R@K both ways and their mean (``r_mean``), as fractions. ``sim`` [N_img, N_txt]."""
    sim = sim.float()
    text_image = torch.as_tensor(text_image).long()
    if sim.shape[1] != text_image.shape[0]:
        raise ValueError(f"sim has {sim.shape[1]} captions, text_image has {text_image.shape[0]}")
    ri = i2t_ranks(sim, text_image)
    rt = t2i_ranks(sim, text_image)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = (ri < k).float().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = (rt < k).float().mean().item()
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def chance_recall(num_images: int, captions_per_image: int = 5,
                  ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Expected R@K of random scores: t2i K/N; i2t 1 - C(cN-c, K)/C(cN, K) (none of the c true
    captions among K drawn from cN)."""
    n_txt = num_images * captions_per_image
    out: dict[str, float] = {}
    for k in ks:
        k_t = min(k, n_txt)
        out[f"i2t_r{k}"] = 1.0 - math.comb(n_txt - captions_per_image, k_t) / math.comb(n_txt, k_t)
    for k in ks:
        out[f"t2i_r{k}"] = min(1.0, k / num_images)
    out["r_mean"] = sum(out.values()) / len(out)
    return out
