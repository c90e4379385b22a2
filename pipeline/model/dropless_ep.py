"""The dropless MoE FFN on DeepSpeed's expert-parallel path. Imports ``deepspeed``: pipeline.model.moe
loads this module only when it builds a dropless FFN for training or ``pipeline.evaluate``.

``DeepSpeedDroplessFFN`` is a ``DroplessFFN`` that is also an ``AutoEPMoELayer``: in DeepSpeed 0.19.8 the
engine treats expert parameters as such (the expert-data-parallel gradient reduction of ZeRO-1/2, one
checkpoint file per expert, loading at any EP size) only for modules of that class or of the native
``MoE`` (engine.py ``has_moe_layers``). It does not run ``AutoEPMoELayer.__init__``, which repacks an
existing Hugging Face MoE block; it sets what the engine reads instead (``num_experts``,
``num_local_experts``, ``ep_size``, ``ep_group_name``, ``expert_placement_descriptor``, the expert tensors'
``allreduce``/``group_name`` marks and their placement metadata) and keeps ``set_deepspeed_parallelism``,
which creates or finds the ``ep_size_{N}`` groups. docs/MOE_DROPLESS.md has the line references.

Expert parallelism (``ep_size > 1``): rank r of an EP group holds experts [r*E_l, (r+1)*E_l). Routed rows,
sorted by global expert, go to their experts' ranks with one all-to-all-v (DeepSpeed's ``_AllToAllV``,
split sizes from one all-to-all of the [ep, E_l] count matrix: ``compute_split_plan``) and come back the
same way. Nothing has a shape that must agree between ranks: a rank may send or receive zero rows and an
expert may get none; every rank of the group makes the same two collectives per call.
"""
from __future__ import annotations

import torch
from deepspeed import comm as dist
from deepspeed.checkpoint.autoep_affine import (autoep_experts_for_rank, autoep_placement_to_affine_map,
                                                legacy_uniform_autoep_placement_descriptor)
from deepspeed.checkpoint.constants import (AFFINE_MAP, AUTOEP_EXPERT_PLACEMENT, AUTOEP_PARAM_EP_RANK,
                                            AUTOEP_PARAM_LOCAL_EXPERTS, AUTOEP_PARAM_LOGICAL_SHAPE,
                                            DS_AUTOEP_UC_META)
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer, _AllToAllV, compute_split_plan

from pipeline.model.config import ModelConfig
from pipeline.model.dropless import DroplessFFN


class DeepSpeedDroplessFFN(DroplessFFN, AutoEPMoELayer):
    expert_parallel = True  # rows [r*E_l, (r+1)*E_l) of the experts, E_l = E / moe.ep_size

    def __init__(self, cfg: ModelConfig):
        DroplessFFN.__init__(self, cfg)
        self.ep_group_name = f"ep_size_{self.ep_size}"
        self.ep_group = None
        self.ep_rank = 0  # set by set_deepspeed_parallelism once the groups exist
        self.folding_group_handles = None
        self.expert_placement_descriptor = legacy_uniform_autoep_placement_descriptor(
            self.num_experts, self.num_local_experts, self.ep_size)
        for param in self.experts.parameters():  # reduced over the expert-data-parallel group only
            param.allreduce = False
            param.group_name = self.ep_group_name
            param.ds_zero_placement_family = "autoep_expert"
            param.ds_zero_partition_group_name = self.ep_group_name
        for module in (self.router, self.shared):
            for param in module.parameters() if module is not None else ():
                param.allreduce = True
                param.ds_zero_placement_family = "replicated"
        self._set_placement_metadata()

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False,
                                  folding_group_handles: object = None) -> None:
        if folding_group_handles is not None:
            raise ValueError("moe.impl dropless does not support AutoEP tensor-parallel folding")
        AutoEPMoELayer.set_deepspeed_parallelism(self, use_data_before_expert_parallel_)
        self.ep_rank = dist.get_rank(group=self.ep_group) if self.ep_size > 1 else 0
        self._set_placement_metadata()

    def _set_placement_metadata(self) -> None:
        """The per-parameter placement DeepSpeed's checkpoint writer and universal-checkpoint converter read
        (as ``AutoEPMoELayer.__init__`` sets it)."""
        local = autoep_experts_for_rank(self.expert_placement_descriptor, self.ep_rank)
        for param in (self.experts.w1, self.experts.w2, self.experts.w3):
            shape = [self.num_experts, *param.shape[1:]]
            setattr(param, DS_AUTOEP_UC_META, {
                AUTOEP_EXPERT_PLACEMENT: self.expert_placement_descriptor,
                AFFINE_MAP: autoep_placement_to_affine_map(self.expert_placement_descriptor, shape).to_dict(),
                AUTOEP_PARAM_LOGICAL_SHAPE: shape, AUTOEP_PARAM_EP_RANK: self.ep_rank,
                AUTOEP_PARAM_LOCAL_EXPERTS: list(local)})

    def forward(self, x_sd: torch.Tensor, used_s: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return DroplessFFN.forward(self, x_sd, used_s)

    def run_experts(self, routed_rd: torch.Tensor, counts_e: torch.Tensor) -> torch.Tensor:
        if self.ep_size == 1:
            return self.experts(routed_rd, counts_e)
        if self.ep_group is None:
            raise RuntimeError("DeepSpeedDroplessFFN with ep_size > 1 outside a DeepSpeed engine: build the model "
                               "inside pipeline.model.moe.local_experts() to run it on one process")
        plan = compute_split_plan(None, self.num_experts, self.ep_size, self.num_local_experts, self.ep_group,
                                  num_tokens_per_expert=counts_e)
        received_rd = _AllToAllV.apply(self.ep_group, routed_rd, plan.input_splits, plan.output_splits)
        # received rows: source-major, then local expert; the experts want expert-major rows
        by_source = plan.local_counts_by_source.to(routed_rd.device).long()  # [ep, E_l]
        expert_r = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=routed_rd.device).repeat(self.ep_size), by_source.reshape(-1))
        order_r = torch.argsort(expert_r, stable=True)
        out_rd = self.experts(received_rd.index_select(0, order_r), by_source.sum(0))
        back_rd = torch.empty_like(out_rd).index_copy(0, order_r, out_rd)
        return _AllToAllV.apply(self.ep_group, back_rd, plan.output_splits, plan.input_splits)
