"""Index-based MoE dispatch that keeps everything else of DeepSpeed's ``MOELayer``.

Shapes: S tokens, M model dim, E experts, C capacity, K routes per token (top-k), R kept routes (<= K*S).

Kept from DeepSpeed: the gate (``TopKGate`` -> top1gating/top2gating math, capacity, aux loss, RTS,
``used_token``), the expert-parallel all-to-all (``_AllToAll``), process groups, and the module tree
(``gate.wg``, ``experts.deepspeed_experts.N``), so checkpoints and the engine's MoE handling are unchanged.

Changed, without EP (``ep_size == 1``): instead of filling an [E, C, M] buffer (capacity slots nobody
routes to are still pushed through the experts) the kept routes are sorted by expert and each expert
runs on exactly its R_e tokens; outputs are weighted by the gate and summed back with ``index_add_``.
Results equal the stock layer (tests/test_model_moe.py). With EP the fixed [E, C, M] buffer is what the
all-to-all needs, so dispatch/combine use DeepSpeed's own gather/scatter helpers unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from deepspeed.moe.sharded_moe import MOELayer, _AllToAll, _route_slots, _sparse_decode, _sparse_encode
from torch import Tensor


class IndexedMOELayer(MOELayer):
    """Drop-in ``MOELayer`` (same __init__, attributes and state-dict keys)."""

    def forward(self, *inputs: Tensor, **kwargs: Any) -> Tensor:
        x = inputs[0]
        used_token = inputs[1] if len(inputs) > 1 else None
        x_sm = x.reshape(-1, x.shape[-1])
        self.l_aux, capacity, num_experts, indices_ks, locations_ks, gates_ks, self.exp_counts = \
            self.gate(x_sm, used_token, True, False)
        # routes kept within capacity, per expert (exp_counts counts the router's choices before dropping)
        self.kept_counts = torch.bincount(indices_ks[indices_ks >= 0].long(), minlength=num_experts)
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
        outputs = []
        for expert, chunk in zip(self.experts.deepspeed_experts, routed_rm.split(sizes)):
            if chunk.shape[0]:
                out = expert(chunk)
                outputs.append(out[0] if isinstance(out, tuple) else out)
        gates_r = gates_ks.reshape(-1)[order_r]
        if outputs:
            weighted_rm = torch.cat(outputs).float() * gates_r.unsqueeze(1)
        else:  # nothing kept: keep the graph (and the experts' parameters) connected with zeros
            weighted_rm = routed_rm.float() * gates_r.unsqueeze(1)
        combined = x_sm.new_zeros(num_tokens, x_sm.shape[1], dtype=torch.float32)
        combined.index_add_(0, tokens_r, weighted_rm)
        return combined.to(x_sm.dtype)

    def _buffered(self, x_sm: Tensor, indices_ks: Tensor, locations_ks: Tensor, gates_ks: Tensor,
                  num_experts: int, capacity: int) -> Tensor:
        """Expert parallel: DeepSpeed's [E, C, M] buffers around the two all-to-alls."""
        num_tokens, d_model = x_sm.shape
        slots_ks = _route_slots(indices_ks, locations_ks, num_experts, capacity)
        dispatched_ecm = _sparse_encode(x_sm, slots_ks, num_experts, capacity)
        dispatched_ecm = _AllToAll.apply(self.ep_group, dispatched_ecm)
        dispatched = dispatched_ecm.reshape(self.ep_size, self.num_local_experts, -1, d_model)
        expert_out = self.experts(dispatched).reshape(self.ep_size * self.num_local_experts, -1, d_model)
        expert_out = _AllToAll.apply(self.ep_group, expert_out)
        return _sparse_decode(expert_out.reshape(num_experts * capacity, d_model), slots_ks, gates_ks,
                              num_tokens)
