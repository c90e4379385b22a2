"""Non-finite training guard: no update from a non-finite loss, no checkpoint of non-finite weights, and a
run that stops (exit 3) instead of training on NaN.

Every decision is collective (all-reduced), so all ranks skip or stop at the same micro-batch and the
MoE all-to-all / ZeRO collectives stay in lockstep.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

from pipeline.run.distributed import Dist, all_reduce_max, all_reduce_sum

log = logging.getLogger(__name__)


class NonFiniteTraining(RuntimeError):
    """The loss or the weights stopped being finite beyond ``train.nonfinite_budget``: the run stops
    without saving, and ``pipeline.train`` exits 3 so a stage chain does not go on."""


class StepGuard:
    """Counts consecutive bad steps (a micro-batch skipped for a non-finite loss, or an applied update
    with a non-finite gradient norm) and raises ``NonFiniteTraining`` past ``budget``."""

    def __init__(self, engine: Any, dist: Dist, budget: int, ep_size: int, precision: str, zero_stage: int):
        self.engine, self.dist, self.budget, self.ep_size = engine, dist, budget, ep_size
        self.own_grad_norm = zero_stage == 0 and precision == "fp32"  # DeepSpeed reports no norm there
        # fp16's dynamic loss scaler skips overflowing steps by design (DeepSpeed owns that budget); in
        # bf16/fp32 a step DeepSpeed skipped for non-finite gradients is a bad step
        self.count_skipped = precision != "fp16"
        self.bad_steps = 0

    def all_finite(self, value: float) -> bool:
        """Collective: True when ``value`` is finite on every rank."""
        return all_reduce_max(0.0 if math.isfinite(value) else 1.0, self.dist.device) == 0.0

    def loss_ok(self, loss: torch.Tensor, step: int) -> bool:
        """Collective: False (and counted) when the loss of this micro-batch is not finite on some rank."""
        value = float(loss.detach())
        if self.all_finite(value):
            return True
        self._bad(f"loss {value} at step {step}")
        return False

    def after_step(self, norm: float | None, step: int) -> None:
        """After ``engine.step()``: an applied update with a non-finite gradient norm is a bad step; if it
        left non-finite weights, stop now (they cannot be un-applied)."""
        applied = self.engine.was_step_applied()
        if applied and (norm is None or math.isfinite(norm)):
            self.bad_steps = 0
            return
        if not applied:
            if self.count_skipped:
                self._bad(f"gradient (DeepSpeed skipped the update) at step {step}")
            return
        self._bad(f"gradient norm {norm} at step {step}")
        if not self.weights_finite():
            raise NonFiniteTraining(f"step {step}: the weights are no longer finite after an update with "
                                    f"gradient norm {norm}; lower optim.lr or raise optim.grad_clip, then "
                                    "resume from the last checkpoint")

    def weights_finite(self) -> bool:
        """Collective: every trainable weight on every rank is finite (experts differ by rank)."""
        finite = all(bool(torch.isfinite(p).all()) for p in self.engine.module.parameters() if p.requires_grad)
        return self.all_finite(0.0 if finite else math.inf)

    def grad_norm(self) -> float | None:
        """Collective when ``own_grad_norm``: the global gradient norm after the boundary backward, whose
        all-reduce has averaged dense gradients over ranks and expert gradients over their
        expert-data-parallel replicas. None where DeepSpeed reports the norm itself."""
        if not self.own_grad_norm:
            return None
        from deepspeed.moe.utils import is_moe_param

        dense, experts = 0.0, 0.0
        for param in self.engine.module.parameters():
            if param.grad is not None:
                sq = float(param.grad.detach().float().pow(2).sum())
                if is_moe_param(param):
                    experts += sq
                else:
                    dense += sq
        # each expert lives on world/ep ranks: the sum over all ranks counts it world/ep times
        replicas = self.dist.world_size / self.ep_size
        experts = float(all_reduce_sum(torch.tensor([experts]), self.dist.device)[0]) / replicas
        return math.sqrt(dense + experts)

    def _bad(self, what: str) -> None:
        self.bad_steps += 1
        log.warning("non-finite %s (%d bad steps in a row; train.nonfinite_budget %d)", what, self.bad_steps,
                    self.budget)
        if self.bad_steps > self.budget:
            raise NonFiniteTraining(f"{self.bad_steps} steps in a row with a non-finite loss or gradient "
                                    f"(last: {what}; train.nonfinite_budget={self.budget}); lower optim.lr "
                                    "or raise optim.grad_clip, then resume from the last checkpoint")
