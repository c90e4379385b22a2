"""FFNs: the dense MLP and the sparse MoE FFN built on ``deepspeed.moe.layer.MoE``.

Shapes: S tokens in one call (always B*N of the caller, padding included), D hidden, F FFN width,
E experts, C capacity per expert.

``SparseFFN`` *is* a DeepSpeed ``MoE`` (so the engine finds it, creates its expert-parallel groups and
saves experts as ``deepspeed_moe.experts.deepspeed_experts.N``); with ``dispatch: indexed`` its inner
``MOELayer`` is replaced by ``IndexedMOELayer`` (pipeline.model.dispatch), which keeps DeepSpeed's gate,
all-to-all and parameter names and only changes how tokens are moved into and out of expert buffers.
"""
from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.dispatch import IndexedMOELayer


class MLP(nn.Module):
    """fc1 -> GELU (exact, as ViT/BERT) -> fc2: [..., D] -> [..., D]."""

    def __init__(self, hidden_size: int, ffn_size: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn_size, hidden_size)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class CountingGate(TopKGate):
    """DeepSpeed's ``TopKGate`` that also records ``kept_counts`` [E]: routes each expert keeps within
    capacity in the last call (the gate's ``exp_counts`` are its choices before dropping). Both count
    the same tokens: the real ones for top-1 (``used_token``), every token for top-k > 1 (DeepSpeed's
    top-2 gate has no padding mask, so padding takes capacity there like any token)."""

    def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False):
        output = super().forward(input, used_token, sparse_routes, use_tutel)
        num_experts = self.wg.weight.shape[0]
        if sparse_routes:  # (l_aux, capacity, E, indices [K, S] with -1 for dropped routes, ...)
            indices = output[3]
            self.kept_counts = torch.bincount(indices[indices >= 0].long(), minlength=num_experts)
        else:  # (l_aux, combine_weights [S, E, C], dispatch_mask, exp_counts)
            self.kept_counts = output[2].sum((0, 2)).long()
        return output


class SparseFFN(MoE):
    """DeepSpeed MoE FFN configured from ``cfg.moe``; ``forward(x_sd, used_s) -> (y_sd, l_aux, counts_e)``.

    ``used_s`` (0/1 per token) keeps padding out of expert capacity; DeepSpeed's top-1 gate honours it,
    its top-2 gate routes padding like any token. Every call must carry >= ``min_capacity`` tokens.
    """

    def __init__(self, cfg: ModelConfig):
        moe = cfg.moe
        super().__init__(
            hidden_size=cfg.hidden_size, expert=MLP(cfg.hidden_size, cfg.ffn_size, cfg.dropout),
            num_experts=moe.num_experts, ep_size=moe.ep_size, k=moe.top_k,
            capacity_factor=moe.capacity_factor, eval_capacity_factor=moe.eval_capacity_factor,
            min_capacity=moe.min_capacity, use_residual=moe.use_residual,
            noisy_gate_policy=moe.noisy_gate_policy, drop_tokens=moe.drop_tokens, use_rts=moe.use_rts,
            top2_2nd_expert_sampling=moe.top2_2nd_expert_sampling)
        # same attributes, submodules and state-dict keys; only forward differs
        self.deepspeed_moe.gate.__class__ = CountingGate
        if moe.dispatch == "indexed":
            self.deepspeed_moe.__class__ = IndexedMOELayer

    @property
    def experts(self) -> nn.ModuleList:
        """The local experts (``num_experts // ep_size`` of them on this rank)."""
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def router(self) -> nn.Linear:
        return self.deepspeed_moe.gate.wg

    def forward(self, x_sd: torch.Tensor, used_s: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x_sd.shape[0] == 0 or x_sd.shape[0] < self.deepspeed_moe.gate.min_capacity:
            raise ValueError(f"MoE call with {x_sd.shape[0]} tokens < moe.min_capacity="
                             f"{self.deepspeed_moe.gate.min_capacity}; use more tokens or lower min_capacity")
        if used_s is not None:
            used_s = used_s.reshape(-1).long() if self.deepspeed_moe.gate.k == 1 else None
        out, l_aux, counts = super().forward(x_sd, used_s)
        return out, l_aux, counts


def build_ffn(cfg: ModelConfig, sparse: bool) -> nn.Module:
    return SparseFFN(cfg) if sparse else MLP(cfg.hidden_size, cfg.ffn_size, cfg.dropout)


def run_ffn(ffn: nn.Module, x_sd: torch.Tensor, used_s: torch.Tensor | None, pad_to_capacity: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Uniform call for dense and sparse FFNs: (y, l_aux, routed counts [E], kept counts [E]); the last
    three are None for a dense FFN. Routed = the router's choices, kept = those within capacity.
    ``pad_to_capacity``: a sparse call with fewer than ``min_capacity`` tokens (a decoding step of a small
    batch) gets zero rows marked unused appended, and their outputs are cut off again."""
    if isinstance(ffn, SparseFFN):
        num_tokens, short = x_sd.shape[0], ffn.deepspeed_moe.gate.min_capacity - x_sd.shape[0]
        if pad_to_capacity and short > 0:
            used_s = torch.ones(num_tokens, dtype=torch.long, device=x_sd.device) if used_s is None else used_s
            x_sd = torch.cat([x_sd, x_sd.new_zeros(short, x_sd.shape[1])])
            used_s = torch.cat([used_s.reshape(-1).long(), used_s.new_zeros(short).long()])
        y, l_aux, counts = ffn(x_sd, used_s)
        return y[:num_tokens], l_aux, counts, ffn.deepspeed_moe.gate.kept_counts
    return ffn(x_sd), None, None, None
