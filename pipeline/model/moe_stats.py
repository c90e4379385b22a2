"""What the MoE FFNs of a model did since the last reset: the load-balancing aux loss and, per MoE FFN
(``"layer{L}/{ffn key}"``), the tokens routed to each expert and the routes kept within capacity.

    stats = model.moe_stats          # one per VLMoE; every MoE call of every pass records into it
    stats.reset()                    # the trainer: before each micro-batch
    out = task(batch)                # any number of model passes (ITC, ITM, MLM, ...)
    loss = out.loss + coef * stats.aux_loss()   # summed over every call, with its graph
    stats.routed, stats.kept         # {"layer1/image": [E] counts, ...}, summed over the calls, detached

Routed counts are the router's choices (before capacity), kept counts the routes the dispatch keeps; both
count the same tokens (the real ones with top-1, every token with top-2: DeepSpeed's top-2 gate has no
padding mask). Sums, not lists: a long evaluation without reset holds one tensor per FFN.
"""
from __future__ import annotations

import torch


class MoEStats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._aux: torch.Tensor | None = None
        self.calls = 0
        self.routed: dict[str, torch.Tensor] = {}
        self.kept: dict[str, torch.Tensor] = {}

    def record(self, key: str, l_aux: torch.Tensor, routed_e: torch.Tensor, kept_e: torch.Tensor) -> None:
        """One MoE FFN call: its aux loss (keeps the graph) and [E] routed / kept counts (detached)."""
        l_aux = l_aux.float()
        self._aux = l_aux if self._aux is None else self._aux + l_aux
        self.calls += 1
        for store, count in ((self.routed, routed_e), (self.kept, kept_e)):
            count = count.detach().long()
            store[key] = store[key] + count if key in store else count

    def aux_loss(self, device: torch.device | None = None) -> torch.Tensor:
        """Sum of the aux losses recorded since the reset (a 0 scalar when no MoE call was made)."""
        if self._aux is None:
            return torch.zeros((), device=device)
        return self._aux
