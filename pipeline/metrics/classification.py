"""Top-k classification accuracy and accuracy per class.

A label outside ``[0, C)`` (an eval sample whose class name is not in the training classes) is never
indexed: it counts as wrong at every K.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.metrics.vqa import mean_by_type


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """logits [N, C], labels [N] -> ``{"top1": .., "top5": ..}``; K larger than C counts every class.
    Ties are broken against the label (a wrong class scoring equal to the label ranks above it)."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {labels.shape[0]} labels")
    logits = logits.float()
    labels = labels.long()
    known = (labels >= 0) & (labels < logits.shape[1])
    safe = torch.where(known, labels, torch.zeros_like(labels)).unsqueeze(1)
    label_score = logits.gather(1, safe)
    wrong = torch.ones_like(logits, dtype=torch.bool).scatter_(1, safe, False)
    rank = ((logits >= label_score) & wrong).sum(dim=1)  # [N]
    return {f"top{k}": ((rank < k) & known).float().mean().item() if len(labels) else 0.0 for k in ks}


def class_accuracy(predictions: Sequence[int], labels: Sequence[int],
                   class_names: Sequence[str]) -> dict[str, float]:
    """``{"acc", "acc/<class name>", "num_scored"}`` over predicted vs true class indices; a label
    outside ``class_names`` counts as wrong (and gets no per-class key)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    names = [class_names[y] if 0 <= y < len(class_names) else "" for y in labels]
    return mean_by_type([float(p == y) for p, y in zip(predictions, labels)], names)
