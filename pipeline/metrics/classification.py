"""Top-k classification accuracy."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """logits [N, C], labels [N] -> ``{"top1": .., "top5": ..}``; K larger than C counts every class.
    Ties are broken against the label (a wrong class scoring equal to the label ranks above it)."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {labels.shape[0]} labels")
    logits = logits.float()
    labels = labels.long()
    label_score = logits.gather(1, labels.unsqueeze(1))
    wrong = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), False)
    rank = ((logits >= label_score) & wrong).sum(dim=1)  # [N]
    return {f"top{k}": (rank < k).float().mean().item() if len(labels) else 0.0 for k in ks}
