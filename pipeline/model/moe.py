"""FFNs: the dense MLP and the sparse MoE FFN, DeepSpeed's for training or local experts for inference.

Shapes: S tokens in one call (always B*N of the caller, padding included), D hidden, F FFN width,
E experts, C capacity per expert, K routes per token (top-k).

``SparseFFN`` is the base class of both sparse FFNs, and ``SparseFFN(cfg)`` builds one of them:
- ``DeepSpeedSparseFFN`` (pipeline.model.dispatch): *is* a DeepSpeed ``MoE`` (the engine finds it, creates its
  expert-parallel groups and saves experts as ``deepspeed_moe.experts.deepspeed_experts.N``); training and
  ``pipeline.evaluate`` use it. Built unless local experts are asked for.
- ``LocalSparseFFN`` (here): the same module tree and state-dict keys, all E experts on this process and no
  ``deepspeed`` import; built inside ``with local_experts():`` or when ``deepspeed`` cannot be imported
  (exported models, ``pipeline.hf``). Its routing is DeepSpeed's eval routing at EP=1 (``route``).

Importing this module never imports ``deepspeed``; building a ``DeepSpeedSparseFFN`` does.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import importlib
import logging
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import ModelConfig

log = logging.getLogger(__name__)

_LOCAL_EXPERTS = contextvars.ContextVar("pipeline_model_local_experts", default=False)


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


@contextlib.contextmanager
def local_experts() -> Iterator[None]:
    """Every ``SparseFFN`` built inside the block (``VLMoE(cfg)`` included) is a ``LocalSparseFFN``."""
    token = _LOCAL_EXPERTS.set(True)
    try:
        yield
    finally:
        _LOCAL_EXPERTS.reset(token)


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's index in its EP group (DeepSpeed's groups are consecutive ranks); 0 when not distributed."""
    if ep_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    return torch.distributed.get_rank() % ep_size


def sparse_ffn_class() -> type[SparseFFN]:
    """What ``SparseFFN(cfg)`` builds here: local experts inside ``local_experts()`` or without DeepSpeed,
    else DeepSpeed's MoE."""
    return _local_or_deepspeed(LocalSparseFFN, "pipeline.model.dispatch", "DeepSpeedSparseFFN")


def _local_or_deepspeed(local: type, module: str, name: str) -> type:
    """``local`` inside ``local_experts()`` or when deepspeed cannot be imported, else ``module.name``."""
    if _LOCAL_EXPERTS.get():
        return local
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        log.info("deepspeed not importable (%s): MoE FFNs run their experts locally", exc)
        return local


class MoEFFN(nn.Module):
    """Any MoE FFN, of either ``moe.impl``: ``forward(x_sd, used_s) -> (y_sd, l_aux, routed_e)``, with
    ``num_experts``, ``ep_size``, ``num_local_experts`` and, after each call, ``kept_counts`` [E]."""

    num_experts: int
    ep_size: int
    num_local_experts: int


class SparseFFN(MoEFFN):
    """The GShard MoE FFN (``moe.impl: gshard``): ``forward(x_sd, used_s) -> (y_sd, l_aux, routed_e)``;
    ``deepspeed_moe.gate`` holds the router ``wg`` and its settings, ``experts`` the local experts.
    ``SparseFFN(cfg)`` builds the subclass ``sparse_ffn_class()`` names; subclasses are built directly.

    ``used_s`` (0/1 per token) keeps padding out of expert capacity with top-1; top-2 routes padding like
    any token (as DeepSpeed's top-2 gate). Every call must carry >= ``min_capacity`` tokens.
    """

    num_experts: int
    ep_size: int

    def __new__(cls, *args: object, **kwargs: object) -> SparseFFN:
        return super().__new__(sparse_ffn_class() if cls is SparseFFN else cls)

    @property
    def experts(self) -> nn.ModuleList:
        """The local experts (``num_experts // ep_size`` of them on this rank)."""
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def router(self) -> nn.Linear:
        return self.deepspeed_moe.gate.wg

    def check_tokens(self, x_sd: torch.Tensor) -> None:
        if x_sd.shape[0] == 0 or x_sd.shape[0] < self.deepspeed_moe.gate.min_capacity:
            raise ValueError(f"MoE call with {x_sd.shape[0]} tokens < moe.min_capacity="
                             f"{self.deepspeed_moe.gate.min_capacity}; use more tokens or lower min_capacity")


class LocalGate(nn.Module):
    """DeepSpeed ``TopKGate``'s parameters (``wg``) and settings; ``route`` is its eval routing at EP=1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        self.wg = nn.Linear(cfg.hidden_size, moe.num_experts, bias=False)
        self.k, self.min_capacity, self.drop_tokens = moe.top_k, moe.min_capacity, moe.drop_tokens
        self.capacity_factor, self.eval_capacity_factor = moe.capacity_factor, moe.eval_capacity_factor
        # read and set by generation.dropless as on DeepSpeed's gate; local top-2 never samples (``route``)
        self.top2_2nd_expert_sampling = False
        self.kept_counts: torch.Tensor | None = None  # [E] routes kept within capacity in the last call

    def forward(self, x_sd: torch.Tensor, used_s: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_se = F.linear(x_sd.float(), self.wg.weight.float())
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        indices_ks, gates_ks, routed_e = route(logits_se, self.k, factor, self.min_capacity, self.drop_tokens,
                                               used_s)
        self.kept_counts = torch.bincount(indices_ks[indices_ks >= 0], minlength=logits_se.shape[1])
        return indices_ks, gates_ks, routed_e


def route(logits_se: torch.Tensor, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool,
          used_s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSpeed's top1gating / top2gating (deepspeed/moe/sharded_moe.py) without noise, at EP=1:
    (expert of each route [K, S] long, -1 where dropped or unused; its gate weight [K, S] fp32, 0 there;
    routed counts [E], the router's choices before capacity).

    Top-1: the softmax probability of the argmax expert; ``used_s`` masks tokens out. Over capacity the kept
    tokens are DeepSpeed's ``topk`` pick without random token selection (with ``use_rts`` DeepSpeed picks at
    random, so only a call where no expert overflows has one answer). Top-2: the best and the second-best
    expert (DeepSpeed samples the second with Gumbel noise unless ``top2_2nd_expert_sampling`` is off), slots
    in token order with every first choice before any second one, the two weights renormalised to sum to 1
    (after dropping). Capacity: ceil(S / E * factor * k), at least ``min_capacity``; no dropping without
    ``drop_tokens``."""
    num_tokens, num_experts = logits_se.shape
    gates_se = F.softmax(logits_se, dim=1)
    first_s = torch.argmax(gates_se, dim=1)
    mask1_se = F.one_hot(first_s, num_classes=num_experts)
    if k == 1:
        if used_s is not None:
            mask1_se = mask1_se * used_s.reshape(-1, 1).to(mask1_se.dtype)
        routed_e = mask1_se.sum(0)
        if drop_tokens:
            capacity = _capacity(num_tokens, num_experts, capacity_factor, min_capacity)
            top_idx = torch.topk(mask1_se, k=min(capacity, num_tokens), dim=0)[1]
            mask1_se = mask1_se * torch.zeros_like(mask1_se).scatter_(0, top_idx, 1)
        kept_s = mask1_se.sum(1) > 0
        indices_ks = torch.where(kept_s, first_s, -1)[None]
        return indices_ks, (gates_se * mask1_se).sum(1)[None], routed_e
    second_s = torch.argmax(logits_se.masked_fill(mask1_se.bool(), float("-inf")), dim=1)
    mask2_se = F.one_hot(second_s, num_classes=num_experts)
    routed_e = (mask1_se + mask2_se).sum(0)
    if drop_tokens:
        capacity = _capacity(num_tokens, num_experts, capacity_factor * 2, min_capacity)
        locations1_se = torch.cumsum(mask1_se, dim=0) - 1
        locations2_se = torch.cumsum(mask2_se, dim=0) - 1 + mask1_se.sum(0, keepdim=True)
        mask1_se = mask1_se * (locations1_se < capacity)
        mask2_se = mask2_se * (locations2_se < capacity)
    gates1_s = (gates_se * mask1_se).sum(1)
    gates2_s = (gates_se * mask2_se).sum(1)
    denom_s = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates1_s.dtype).eps)
    indices_ks = torch.stack([torch.where(mask1_se.any(1), first_s, -1), torch.where(mask2_se.any(1), second_s, -1)])
    return indices_ks, torch.stack([gates1_s / denom_s, gates2_s / denom_s]), routed_e


def _capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's ``_capacity``, with its float32 arithmetic."""
    capacity = torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor)).to(torch.int64)
    return max(int(capacity), min_capacity)


class LocalExperts(nn.Module):
    """DeepSpeed's ``Experts`` tree: ``deepspeed_experts.N`` for every expert N."""

    def __init__(self, expert: nn.Module, num_experts: int):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList([expert] + [copy.deepcopy(expert) for _ in range(num_experts - 1)])


class LocalMoELayer(nn.Module):
    """DeepSpeed's ``MOELayer`` tree (``gate``, ``experts``): each expert runs on exactly its kept routes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = LocalGate(cfg)
        self.experts = LocalExperts(MLP(cfg.hidden_size, cfg.ffn_size, cfg.dropout), cfg.moe.num_experts)

    def forward(self, x_sd: torch.Tensor, used_s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(y [S, D], routed counts [E]): the gate-weighted sum of each token's kept experts (0 if none)."""
        indices_ks, gates_ks, routed_e = self.gate(x_sd, used_s)
        num_tokens, num_experts = x_sd.shape[0], self.gate.wg.weight.shape[0]
        experts_r = indices_ks.reshape(-1)
        order_r = torch.argsort(torch.where(experts_r >= 0, experts_r, num_experts), stable=True)
        order_r = order_r[:int((experts_r >= 0).sum())]
        sizes = torch.bincount(experts_r[order_r], minlength=num_experts).tolist()
        tokens_r = order_r % num_tokens
        chunks = x_sd.index_select(0, tokens_r).split(sizes)
        outputs = [expert(chunk) for expert, chunk in zip(self.experts.deepspeed_experts, chunks)]
        weighted_rd = torch.cat(outputs).float() * gates_ks.reshape(-1)[order_r].unsqueeze(1)
        y_sd = x_sd.new_zeros(x_sd.shape, dtype=torch.float32).index_add_(0, tokens_r, weighted_rd)
        return y_sd.to(x_sd.dtype), routed_e


class LocalSparseFFN(SparseFFN):
    """Every expert on this process, no ``deepspeed``: DeepSpeed's eval output at EP=1 (``route``), state-dict
    keys of ``DeepSpeedSparseFFN`` at EP=1 (a merged checkpoint loads as is). For inference: no router noise,
    and the aux loss it returns is 0 (no graph)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.ep_size, self.num_local_experts = cfg.moe.num_experts, 1, cfg.moe.num_experts
        self.use_residual = cfg.moe.use_residual
        self.deepspeed_moe = LocalMoELayer(cfg)
        if self.use_residual:  # PR-MoE, as DeepSpeed's MoE: a dense MLP mixed in by a learned coefficient
            self.mlp = MLP(cfg.hidden_size, cfg.ffn_size, cfg.dropout)
            self.coefficient = nn.Linear(cfg.hidden_size, 2)

    def forward(self, x_sd: torch.Tensor, used_s: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.check_tokens(x_sd)
        used_s = used_s.reshape(-1).long() if used_s is not None and self.deepspeed_moe.gate.k == 1 else None
        y_sd, routed_e = self.deepspeed_moe(x_sd, used_s)
        if self.use_residual:
            coef_s2 = F.softmax(self.coefficient(x_sd), dim=-1)
            y_sd = y_sd * coef_s2[..., 0:1] + self.mlp(x_sd) * coef_s2[..., 1:]
        return y_sd, x_sd.new_zeros((), dtype=torch.float32), routed_e


def build_ffn(cfg: ModelConfig, sparse: bool) -> nn.Module:
    """The dense MLP, or an MoE FFN of ``cfg.moe.impl``: a ``SparseFFN`` (gshard; DeepSpeed's or local:
    ``sparse_ffn_class``) or a dropless one (``dropless_ffn_class``)."""
    if not sparse:
        return MLP(cfg.hidden_size, cfg.ffn_size, cfg.dropout)
    if cfg.moe.impl == "dropless":
        return dropless_ffn_class()(cfg)
    return SparseFFN(cfg)


def dropless_ffn_class() -> type[MoEFFN]:
    """The dropless FFN class to build here: every expert local inside ``local_experts()`` or without
    DeepSpeed, else the expert-parallel one DeepSpeed's engine handles."""
    from pipeline.model.dropless import DroplessFFN
    return _local_or_deepspeed(DroplessFFN, "pipeline.model.dropless_ep", "DeepSpeedDroplessFFN")


def run_ffn(ffn: nn.Module, x_sd: torch.Tensor, used_s: torch.Tensor | None, pad_to_capacity: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Uniform call for dense and sparse FFNs: (y, l_aux, routed counts [E], kept counts [E]); the last
    three are None for a dense FFN. Routed = the router's choices, kept = those within capacity.
    ``pad_to_capacity``: a sparse call with fewer than ``min_capacity`` tokens (a decoding step of a small
    batch) gets zero rows marked unused appended, and their outputs are cut off again."""
    if isinstance(ffn, MoEFFN) and not isinstance(ffn, SparseFFN):  # dropless: any token count
        y, l_aux, counts = ffn(x_sd, used_s)
        return y, l_aux, counts, ffn.kept_counts
    if isinstance(ffn, SparseFFN):
        num_tokens, short = x_sd.shape[0], ffn.deepspeed_moe.gate.min_capacity - x_sd.shape[0]
        if pad_to_capacity and short > 0:
            used_s = torch.ones(num_tokens, dtype=torch.long, device=x_sd.device) if used_s is None else used_s
            x_sd = torch.cat([x_sd, x_sd.new_zeros(short, x_sd.shape[1])])
            used_s = torch.cat([used_s.reshape(-1).long(), used_s.new_zeros(short).long()])
        y, l_aux, counts = ffn(x_sd, used_s)
        return y[:num_tokens], l_aux, counts, ffn.deepspeed_moe.gate.kept_counts
    return ffn(x_sd), None, None, None
