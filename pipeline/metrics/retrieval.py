"""Media-text retrieval metrics with the K-captions-per-item protocol: images (COCO/Flickr30k Karpathy,
metric names ``i2t_*`` / ``t2i_*``) and audio clips (Clotho, ``a2t_*`` / ``t2a_*``, plus ``t2a_map10``).
"Image" below stands for the media item.

- image -> text: an image counts as retrieved at K when its best-ranked ground-truth caption is in the
  top K of all captions.
- text -> image: a caption counts when its image is in the top K of all images.
- mAP@10 (text -> media, DCASE 2022 task 6B): ``mean_average_precision``.
Ties are broken **against** the ground truth: a wrong candidate with a score equal to the ground truth's
ranks above it, so a model that scores everything the same gets 0, not 100 (R@K and mAP@10 alike).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DEFAULT_KS = (1, 5, 10)
IMAGE_DIRECTIONS = ("i2t", "t2i")  # metric name prefixes: media -> text, text -> media
AUDIO_DIRECTIONS = ("a2t", "t2a")


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


def retrieval_recall(sim: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                     directions: tuple[str, str] = IMAGE_DIRECTIONS) -> dict[str, float]:
    """R@K both ways and their mean (``r_mean``), as fractions. ``sim`` [N_img, N_txt]; names
    ``{directions[0]}_r{K}`` (media -> text) and ``{directions[1]}_r{K}`` (text -> media)."""
    sim = sim.float()
    text_image = torch.as_tensor(text_image).long()
    if sim.shape[1] != text_image.shape[0]:
        raise ValueError(f"sim has {sim.shape[1]} captions, text_image has {text_image.shape[0]}")
    ri = i2t_ranks(sim, text_image)
    rt = t2i_ranks(sim, text_image)
    out: dict[str, float] = {}
    for k in ks:
        out[f"{directions[0]}_r{k}"] = (ri < k).float().mean().item()
    for k in ks:
        out[f"{directions[1]}_r{k}"] = (rt < k).float().mean().item()
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def chance_recall(num_images: int, captions_per_image: int = 5, ks: Sequence[int] = DEFAULT_KS,
                  directions: tuple[str, str] = IMAGE_DIRECTIONS) -> dict[str, float]:
    """Expected R@K of random scores: t2i K/N; i2t 1 - C(cN-c, K)/C(cN, K) (none of the c true
    captions among K drawn from cN)."""
    n_txt = num_images * captions_per_image
    out: dict[str, float] = {}
    for k in ks:
        k_t = min(k, n_txt)
        out[f"{directions[0]}_r{k}"] = 1.0 - math.comb(n_txt - captions_per_image, k_t) / math.comb(n_txt, k_t)
    for k in ks:
        out[f"{directions[1]}_r{k}"] = min(1.0, k / num_images)
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def average_precision_at_k(sim: torch.Tensor, text_image: torch.Tensor, k: int = 10) -> torch.Tensor:
    """[N_txt] AP@k of each caption query over the media items, one relevant item per caption:
    1 / rank (1-based, ``t2i_ranks`` + 1, ties against the ground truth) when rank <= k, else 0."""
    ranks = t2i_ranks(sim.float(), torch.as_tensor(text_image).long()) + 1
    return torch.where(ranks <= k, 1.0 / ranks.float(), torch.zeros(ranks.shape))


def mean_average_precision(sim: torch.Tensor, text_image: torch.Tensor, k: int = 10) -> float:
    """Text -> media mAP@k as in the DCASE 2022 task 6B (language-based audio retrieval) evaluation:
    ``eval_script.py`` of the official baseline, github.com/xieh97/dcase2022-audio-retrieval, commit
    4fa9f1108a1856d1b98fe58f4f1e3393d0cdb6ae (its last change; unchanged at f6fad50, 2024). For each caption
    query it takes the system's top-10 clips, finds the positions p_1 < p_2 < ... of the ground-truth clip
    among them and sums j / p_j (not divided by the number of relevant clips); the score is the mean over all
    caption queries. Each Clotho caption has exactly one relevant clip, so the sum is 1 / rank when the clip
    is in the top 10, else 0: ``average_precision_at_k``. The official script ranks the list the system
    submits; here ties rank against the ground truth, as R@K does."""
    return average_precision_at_k(sim, text_image, k).mean().item()


def chance_map(num_items: int, k: int = 10) -> float:
    """Expected mAP@k of random scores: the true item's rank is uniform over 1..N, so (1/N) sum_{r<=min(k,N)} 1/r."""
    return sum(1.0 / r for r in range(1, min(k, num_items) + 1)) / num_items
