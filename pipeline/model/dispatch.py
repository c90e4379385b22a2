"""The DeepSpeed-backed sparse FFN (``DeepSpeedSparseFFN``) and its index-based dispatch, which keeps
everything else of DeepSpeed's ``MOELayer``. Imports ``deepspeed``: pipeline.model.moe loads this module
only when it builds a DeepSpeed MoE.

Shapes: S tokens, M model dim, E experts, C capacity, K routes per token (top-k), R kept routes (<= K*S).

Kept from DeepSpeed: the gate (``TopKGate`` -> top1gating/top2gating math, capacity, aux loss, RTS,
``used_token``), the expert-parallel all-to-all (``_AllToAll``), process groups, and the module tree
(``gate.wg``, ``experts.deepspeed_experts.N``), so checkpoints and the engine's MoE handling are unchanged.

Changed, without EP (``ep_size == 1``): instead of filling an [E, C, M] buffer (capacity slots nobody
routes to are still pushed through the experts) the kept routes are sorted by expert and each expert
runs on exactly its R_e tokens; outputs are weighted by the gate and summed back with ``index_add_``.
Results equal the stock layer (tests/test_model_moe.py). With EP the fixed [E, C, M] buffer is what the
all-to-all needs, so it is built with DeepSpeed's own gather/scatter helpers; one extra all-to-all of
E counts tells each rank how many slots of every received block are filled, and the experts run on
those rows only (padding-heavy text and ``drop_tokens: false`` leave most slots empty). EP == no-EP is
tested in tests/dist/moe_ep_equivalence.py.
"""
from __future__ import annotations

from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer, TopKGate, _AllToAll, _route_slots, _sparse_decode, _sparse_encode
from torch import Tensor, nn

from pipeline.model.config import ModelConfig
from pipeline.model.moe import MLP, SparseFFN


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


class DeepSpeedSparseFFN(MoE, SparseFFN):
    """DeepSpeed MoE FFN configured from ``cfg.moe`` (``SparseFFN``'s contract); with ``dispatch: indexed``
    its inner ``MOELayer`` is an ``IndexedMOELayer``."""

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

    def forward(self, x_sd: torch.Tensor, used_s: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.check_tokens(x_sd)
        if used_s is not None:
            used_s = used_s.reshape(-1).long() if self.deepspeed_moe.gate.k == 1 else None
        out, l_aux, counts = super().forward(x_sd, used_s)
        return out, l_aux, counts


class IndexedMOELayer(MOELayer):
    """Drop-in ``MOELayer`` (same __init__, attributes and state-dict keys)."""

    def forward(self, *inputs: Tensor, **kwargs: Any) -> Tensor:
        x = inputs[0]
        used_token = inputs[1] if len(inputs) > 1 else None
        x_sm = x.reshape(-1, x.shape[-1])
        self.l_aux, capacity, num_experts, indices_ks, locations_ks, gates_ks, self.exp_counts = \
            self.gate(x_sm, used_token, True, False)
        if self.ep_size == 1:
            out_sm = self._compact(x_sm, indices_ks, gates_ks, num_experts)
        else:
            out_sm = self._buffered(x_sm, indices_ks, locations_ks, gates_ks, num_experts, int(capacity))
        return out_sm.reshape(x.shape)

    def _compact(self, x_sm: Tensor, indices_ks: Tensor, gates_ks: Tensor, num_experts: int) -> Tensor:
        """Local experts only: each runs on the tokens routed (and kept) to it, nothing else."""
        num_tokens = x_sm.shape[0]
        experts_flat = indices_ks.reshape(-1).long()
        kept = experts_flat >= 0
        # stable sort by expert keeps token order within an expert (as the capacity locations do)
        order = torch.argsort(torch.where(kept, experts_flat, num_experts), stable=True)
        num_kept = int(kept.sum())
        order_r = order[:num_kept]
        tokens_r = order_r % num_tokens
        sizes = torch.bincount(experts_flat[order_r], minlength=num_experts).tolist()
        routed_rm = x_sm.index_select(0, tokens_r)
        # every expert runs, on an empty [0, M] chunk if it got no token: its parameters then get a zero
        # gradient instead of none, so ZeRO's gradient buckets have the same layout on every rank
        outputs = [_expert_out(expert, chunk)
                   for expert, chunk in zip(self.experts.deepspeed_experts, routed_rm.split(sizes))]
        weighted_rm = torch.cat(outputs).float() * gates_ks.reshape(-1)[order_r].unsqueeze(1)
        combined = x_sm.new_zeros(num_tokens, x_sm.shape[1], dtype=torch.float32)
        combined.index_add_(0, tokens_r, weighted_rm)
        return combined.to(x_sm.dtype)

    def _buffered(self, x_sm: Tensor, indices_ks: Tensor, locations_ks: Tensor, gates_ks: Tensor,
                  num_experts: int, capacity: int) -> Tensor:
        """Expert parallel: DeepSpeed's [E, C, M] buffers around the two all-to-alls; the receiving rank
        runs each local expert only on the filled prefix of every capacity block."""
        num_tokens, d_model = x_sm.shape
        slots_ks = _route_slots(indices_ks, locations_ks, num_experts, capacity)
        dispatched_ecm = _sparse_encode(x_sm, slots_ks, num_experts, capacity)
        dispatched_ecm = _AllToAll.apply(self.ep_group, dispatched_ecm)
        kept_e = torch.bincount(indices_ks[indices_ks >= 0].long(), minlength=num_experts)
        filled = torch.empty_like(kept_e)  # [ep * L]: rows each source filled per local expert
        dist.all_to_all_single(filled, kept_e, group=self.ep_group)
        expert_out = self._run_filled(dispatched_ecm.reshape(-1, d_model), filled, capacity)
        expert_out = _AllToAll.apply(self.ep_group, expert_out.view(num_experts, capacity, d_model))
        return _sparse_decode(expert_out.reshape(num_experts * capacity, d_model), slots_ks, gates_ks,
                              num_tokens)

    def _run_filled(self, rows_m: Tensor, filled: Tensor, capacity: int) -> Tensor:
        """rows_m: [ep*L*C, M] received buffer (source-major, then local expert, then slot); kept routes
        sit at the start of each capacity block (DeepSpeed's locations are 0..kept-1)."""
        local = self.num_local_experts
        filled_sl = filled.view(self.ep_size, local)
        starts = [(src * local + j) * capacity for j in range(local) for src in range(self.ep_size)]
        sizes = filled_sl.sum(0).tolist()  # rows per local expert, all sources together
        counts = filled_sl.t().reshape(-1)  # [L * ep] in (expert, source) order, like ``starts``
        base = torch.tensor(starts, dtype=torch.long, device=rows_m.device).repeat_interleave(counts)
        offsets = torch.arange(len(base), device=rows_m.device) - \
            (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
        index_r = base + offsets
        routed_rm = rows_m.index_select(0, index_r)
        outputs = [_expert_out(expert, chunk)  # every local expert, even on 0 rows (see _compact)
                   for expert, chunk in zip(self.experts.deepspeed_experts, routed_rm.split(sizes))]
        result = rows_m.new_zeros(rows_m.shape)
        return result.index_copy(0, index_r, torch.cat(outputs).to(rows_m.dtype))


def _expert_out(expert: nn.Module, chunk_rm: Tensor) -> Tensor:
    out = expert(chunk_rm)
    return out[0] if isinstance(out, tuple) else out
