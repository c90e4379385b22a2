"""The dropless MoE FFN (``moe.impl: dropless``): token-choice top-k, no capacity, nothing dropped, padding
never routed, the experts of one FFN as one fused weight set run by a grouped GEMM.

Shapes: S tokens of one call (B*n, padding included), T of them real, D hidden, F expert width, E experts
(E_l on this rank), K routes per token, R routed rows (T*K here, or what a rank receives under EP).

Module tree and state-dict keys (EP=1 names; under EP each rank holds rows [r*E_l, (r+1)*E_l) of the
expert tensors, and DeepSpeed saves them one file per global expert):
- ``router.gate.weight`` [E, D]: DeepSpeed's ``TokenChoiceTopKRouter`` layout (``deepspeed/moe/ep_router.py``).
- ``experts.w1`` [E, F, D] (fc1 weights), ``experts.w2`` [E, D, F] (fc2 weights), ``experts.w3`` [E, 1, F+D]
  (fc1 bias then fc2 bias): the names DeepSpeed's engine saves and loads for an ``AutoEPMoELayer``, which
  requires exactly w1/w2/w3 (its ``GroupedExperts`` is SwiGLU without biases; ours is the exact-GELU MLP of
  ``pipeline.model.moe.MLP``, so an expert equals a dense FFN and a dense checkpoint can seed it).
- ``expert_bias`` [E] buffer: the aux-loss-free balancing bias (arXiv 2408.15664), added to the scores for
  the choice only; ``shared``: optional always-on MLP (DeepSeekMoE shared experts).

Our router rather than DeepSpeed's: it must skip padding, return the logits and scores the switch aux loss
and z-loss need, and run where deepspeed is not importable (exports); its choice equals
``TokenChoiceTopKRouter``'s (tests/test_moe_dropless.py compares them). The dispatch is an argsort by
expert (no alignment padding: DeepSpeed's CPU permute pads each expert to 8 rows in a Python loop).
``DroplessFFN`` runs every expert on this process; ``pipeline.model.dropless_ep.DeepSpeedDroplessFFN`` is the
same module with DeepSpeed's all-to-all-v between ranks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.moe import MLP, MoEFFN, expert_parallel_rank


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


class DroplessRouter(nn.Module):
    """Token-choice top-k: ``forward(x [T, D], bias [E] | None) -> (weights [T, K] fp32, experts [T, K] long,
    logits [T, E] fp32, scores [T, E] fp32)``. Scores are softmax or sigmoid of the logits; the bias and the
    group limit shape the choice only, the weights are the chosen experts' unbiased scores (divided by their
    sum with ``route_norm``). Group-limited routing: the E experts form ``num_groups`` contiguous groups
    (one per node when groups follow the EP placement) and each token picks its experts inside the
    ``max_groups`` groups whose best two scores sum highest (DeepSeek-V3)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, score_func: str, route_norm: bool,
                 num_groups: int | None = None, max_groups: int | None = None):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.num_experts, self.top_k, self.score_func, self.route_norm = num_experts, top_k, score_func, route_norm
        self.num_groups, self.max_groups = num_groups, max_groups

    def forward(self, x_td: torch.Tensor, bias_e: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_te = F.linear(x_td.float(), self.gate.weight.float())
        scores_te = torch.sigmoid(logits_te) if self.score_func == "sigmoid" else F.softmax(logits_te, dim=1)
        choice_te = scores_te if bias_e is None else scores_te + bias_e
        if self.num_groups is not None and self.max_groups is not None and self.max_groups < self.num_groups:
            per_group = self.num_experts // self.num_groups
            grouped_tgp = choice_te.view(-1, self.num_groups, per_group)
            group_tg = grouped_tgp.topk(min(2, per_group), dim=-1).values.sum(-1)
            chosen_tg = torch.zeros_like(group_tg, dtype=torch.bool)
            chosen_tg.scatter_(1, group_tg.topk(self.max_groups, dim=-1).indices, True)
            choice_te = grouped_tgp.masked_fill(~chosen_tg[..., None], float("-inf")).view(-1, self.num_experts)
        experts_tk = choice_te.topk(self.top_k, dim=-1).indices
        weights_tk = scores_te.gather(1, experts_tk)
        if self.route_norm:
            weights_tk = weights_tk / (weights_tk.sum(-1, keepdim=True) + 1e-20)
        return weights_tk, experts_tk, logits_te, scores_te


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``torch._grouped_mm``'s backward
    rejects expanded gradients (e.g. of a ``.sum()``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


class GroupedMLP(nn.Module):
    """E_l exact-GELU MLP experts in three tensors (see the module doc): ``forward(x [R, D], counts [E_l])``
    runs expert e on its ``counts[e]`` consecutive rows. ``grouped`` picks ``torch._grouped_mm`` (one kernel for
    all experts) over a loop of per-expert matmuls; both give the same result (tested)."""

    def __init__(self, num_local: int, hidden_size: int, ffn_size: int, dropout: float, grouped: bool):
        super().__init__()
        self.ffn_size, self.grouped = ffn_size, grouped
        self.w1 = nn.Parameter(torch.empty(num_local, ffn_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_local, hidden_size, ffn_size))
        self.w3 = nn.Parameter(torch.zeros(num_local, 1, ffn_size + hidden_size))
        self.drop = nn.Dropout(dropout)

    def biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fc1 biases [E_l, F], fc2 biases [E_l, D]): views of ``w3``."""
        return self.w3[:, 0, :self.ffn_size], self.w3[:, 0, self.ffn_size:]

    def forward(self, x_rd: torch.Tensor, counts_e: torch.Tensor) -> torch.Tensor:
        b1_ef, b2_ed = self.biases()
        if self.grouped and x_rd.dtype != torch.float64:
            offs = torch.cumsum(counts_e, 0).to(torch.int32)
            expert_r = torch.repeat_interleave(torch.arange(len(counts_e), device=x_rd.device), counts_e)
            h_rf = torch._grouped_mm(x_rd.contiguous(), self.w1.transpose(-2, -1), offs=offs)
            h_rf = F.gelu(_ContiguousGrad.apply(h_rf) + b1_ef[expert_r])
            y_rd = torch._grouped_mm(h_rf.contiguous(), self.w2.transpose(-2, -1), offs=offs)
            y_rd = _ContiguousGrad.apply(y_rd) + b2_ed[expert_r]
        else:
            y_rd = _LoopExperts.apply(x_rd, self.w1, self.w2, self.w3, counts_e.tolist())
        return self.drop(y_rd)


class _LoopExperts(torch.autograd.Function):
    """The experts as a loop of per-expert matmuls, with a hand-written backward that writes each expert's
    weight gradient into its rows of one [E_l, ...] buffer. Autograd through ``w1[e]`` indexing would instead
    zero-fill and add a whole [E_l, F, D] gradient per expert (a backward quadratic in E_l: 5 s per step at 64
    experts, BENCHMARKS). Equal to the grouped GEMM path (tests/test_moe_dropless.py)."""

    @staticmethod
    def forward(ctx, x_rd, w1, w2, w3, sizes):  # type: ignore[override]
        ffn = w1.shape[1]
        pre_rf = x_rd.new_empty(x_rd.shape[0], ffn)
        y_rd = x_rd.new_empty(x_rd.shape[0], w2.shape[1])
        for e, (x_e, pre_e, y_e) in enumerate(zip(x_rd.split(sizes), pre_rf.split(sizes), y_rd.split(sizes))):
            torch.addmm(w3[e, 0, :ffn], x_e, w1[e].t(), out=pre_e)
            torch.addmm(w3[e, 0, ffn:], F.gelu(pre_e), w2[e].t(), out=y_e)
        ctx.save_for_backward(x_rd, w1, w2, pre_rf)
        ctx.sizes = sizes
        return y_rd

    @staticmethod
    def backward(ctx, grad_rd):  # type: ignore[override]
        x_rd, w1, w2, pre_rf = ctx.saved_tensors
        sizes, ffn = ctx.sizes, w1.shape[1]
        grad_rd = grad_rd.contiguous()
        gx_rd = torch.empty_like(x_rd)
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
        gw3 = w1.new_empty(w1.shape[0], 1, ffn + w2.shape[1])
        for e, (g_e, x_e, pre_e, gx_e) in enumerate(zip(grad_rd.split(sizes), x_rd.split(sizes),
                                                         pre_rf.split(sizes), gx_rd.split(sizes))):
            torch.mm(g_e.t(), F.gelu(pre_e), out=gw2[e])
            torch.sum(g_e, 0, out=gw3[e, 0, ffn:])
            gpre_e = torch.ops.aten.gelu_backward(g_e @ w2[e], pre_e)
            torch.mm(gpre_e.t(), x_e, out=gw1[e])
            torch.sum(gpre_e, 0, out=gw3[e, 0, :ffn])
            torch.mm(gpre_e, w1[e], out=gx_e)
        return gx_rd, gw1, gw2, gw3, None


def draw_experts(experts: GroupedMLP, num_experts: int, ep_rank: int,
                 draw: Callable[[torch.Tensor], object]) -> None:
    """Fill the experts as if every one of the ``num_experts`` were drawn in global order (fc1 weights, then
    fc2 weights, by ``draw(tensor)``), keeping this rank's rows and zero biases: the random stream, and so
    the model a seed gives, do not depend on the EP layout (as ``VLMoE.reset_parameters`` does for gshard)."""
    local = experts.w1.shape[0]
    with torch.no_grad():
        experts.w3.zero_()
        for global_id in range(num_experts):
            w1, w2 = torch.empty_like(experts.w1[0]), torch.empty_like(experts.w2[0])
            draw(w1)
            draw(w2)
            if global_id // local == ep_rank:
                experts.w1[global_id % local].copy_(w1)
                experts.w2[global_id % local].copy_(w2)


def _linear_init(weight: torch.Tensor) -> None:
    """``nn.Linear``'s default weight init: U(+-1/sqrt(fan_in))."""
    bound = weight.shape[1] ** -0.5
    nn.init.uniform_(weight, -bound, bound)


def resolve_route_norm(moe: object) -> bool:
    """``moe.route_norm`` or its default: softmax top-1 keeps the probability as the weight (Switch; a
    normalised single weight is 1 and the router would get no gradient from the task), softmax top-k>1 and
    sigmoid divide by the chosen scores' sum (GShard top-2, DeepSeek-V3)."""
    if moe.route_norm is not None:
        return bool(moe.route_norm)
    return not (moe.score_func == "softmax" and moe.top_k == 1)


class DroplessFFN(MoEFFN):
    """``forward(x [S, D], used [S] | None) -> (y [S, D], l_aux, routed counts [E])`` with every expert on this
    process (``DeepSpeedDroplessFFN`` adds expert parallelism). Padding (``used == 0``) gets 0 from the
    experts (and from ``shared``) and is counted nowhere. ``l_aux``: the switch aux loss (with
    ``balance: aux``) plus ``z_loss_coef / aux_loss_coef`` times the router z-loss, so that the trainer's
    ``aux_loss_coef`` scaling gives each its own coefficient."""

    expert_parallel = False  # this class holds all E experts whatever moe.ep_size says

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)  # not super(): DeepSpeedDroplessFFN's next base needs other arguments
        moe = cfg.moe
        # every expert on this process (exports, local_experts()), unless this is DeepSpeedDroplessFFN
        self.num_experts, self.ep_size = moe.num_experts, moe.ep_size if self.expert_parallel else 1
        self.num_local_experts = moe.num_experts // self.ep_size
        self.top_k, self.balance = moe.top_k, moe.balance
        self.aux_scale = moe.aux_loss_coef
        self.z_scale = moe.z_loss_coef / moe.aux_loss_coef if moe.z_loss_coef else 0.0
        self.bias_update_rate = moe.bias_update_rate
        groups = moe.expert_groups
        self.router = DroplessRouter(cfg.hidden_size, moe.num_experts, moe.top_k, moe.score_func,
                                     resolve_route_norm(moe), groups, moe.max_groups_per_token if groups else None)
        grouped = {"on": True, "off": False}.get(moe.grouped_mm, None)
        if grouped is None:  # auto: the fused kernel on accelerators; on CPU the loop is faster (BENCHMARKS)
            grouped = has_grouped_mm() and torch.cuda.is_available()
        if grouped and not has_grouped_mm():
            raise ValueError("moe.grouped_mm: on, but this torch has no torch._grouped_mm (torch >= 2.8)")
        expert_ffn = moe.expert_ffn_size or cfg.ffn_size
        self.experts = GroupedMLP(self.num_local_experts, cfg.hidden_size, expert_ffn, cfg.dropout, grouped)
        draw_experts(self.experts, self.num_experts, expert_parallel_rank(self.ep_size), _linear_init)
        self.shared = MLP(cfg.hidden_size, moe.shared_experts * expert_ffn, cfg.dropout) \
            if moe.shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts), persistent=True)  # fp32 (_apply)
        # routes per expert since the last bias update (training passes only); not saved
        self.register_buffer("tokens_per_expert", torch.zeros(moe.num_experts, dtype=torch.long), persistent=False)
        self.kept_counts: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Moves and casts as any module, but ``expert_bias`` stays fp32: a bf16 engine casts the module, and
        bf16's 8-bit mantissa would swallow bias steps of 1e-3 (as DeepSpeed keeps AutoEP's bias fp32)."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32:
            self._buffers["expert_bias"] = bias.to(self.expert_bias.device)
        return self

    def forward(self, x_sd: torch.Tensor, used_s: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        real_t = None if used_s is None else used_s.reshape(-1).nonzero().squeeze(1)
        x_td = x_sd if real_t is None else x_sd.index_select(0, real_t)
        bias_e = self.expert_bias if self.balance == "bias" else None
        weights_tk, experts_tk, logits_te, scores_te = self.router(x_td, bias_e)
        counts_e = torch.bincount(experts_tk.reshape(-1), minlength=self.num_experts)
        order_r = torch.argsort(experts_tk.reshape(-1), stable=True)
        token_r = order_r // self.top_k
        out_rd = self.run_experts(x_td.index_select(0, token_r), counts_e)
        weighted_rd = out_rd.float() * weights_tk.reshape(-1)[order_r, None]
        y_td = x_td.new_zeros(x_td.shape, dtype=torch.float32).index_add_(0, token_r, weighted_rd).to(x_sd.dtype)
        if self.shared is not None:
            y_td = y_td + self.shared(x_td)
        y_sd = y_td if real_t is None else x_sd.new_zeros(x_sd.shape).index_copy(0, real_t, y_td)
        if self.training and torch.is_grad_enabled() and self.balance == "bias":
            self.tokens_per_expert += counts_e
        self.kept_counts = counts_e  # dropless: every routed token is kept
        return y_sd, self._aux_loss(logits_te, scores_te, counts_e), counts_e

    def run_experts(self, routed_rd: torch.Tensor, counts_e: torch.Tensor) -> torch.Tensor:
        """Expert outputs of the routed rows, sorted by (global) expert with ``counts_e`` rows each."""
        return self.experts(routed_rd, counts_e)

    def _aux_loss(self, logits_te: torch.Tensor, scores_te: torch.Tensor, counts_e: torch.Tensor) -> torch.Tensor:
        """Switch aux loss E * sum_e f_e P_e (f: share of routes, P: mean score, normalised per token for
        sigmoid) over this call's real tokens, and the z-loss mean(logsumexp(logits)^2) (ST-MoE)."""
        loss = logits_te.sum() * 0.0  # keeps the graph (and a zero) when this rank has no real token
        tokens = logits_te.shape[0]
        if tokens == 0:
            return loss
        if self.balance == "aux":
            probs_te = scores_te if self.router.score_func == "softmax" else \
                scores_te / scores_te.sum(-1, keepdim=True)
            share_e = counts_e.float() / (tokens * self.top_k)
            loss = loss + self.num_experts * (share_e * probs_te.mean(0)).sum()
        if self.z_scale:
            loss = loss + self.z_scale * torch.logsumexp(logits_te, dim=-1).square().mean()
        return loss

    @torch.no_grad()
    def apply_bias_update(self, total_counts_e: torch.Tensor) -> None:
        """One aux-loss-free balancing step from the routes every rank made since the last one (summed over
        the data-parallel world by the caller, so every rank applies the same update):
        bias += rate * sign(mean load - load) (arXiv 2408.15664); the counts restart."""
        if total_counts_e.sum() > 0:
            load_e = total_counts_e.float()
            self.expert_bias += self.bias_update_rate * torch.sign(load_e.mean() - load_e)
        self.tokens_per_expert.zero_()

    def load_cv(self, counts_e: torch.Tensor) -> float:
        """Coefficient of variation of an expert load (std / mean): 0 = perfectly balanced."""
        counts_e = counts_e.float()
        return float(counts_e.std(unbiased=False) / counts_e.mean().clamp(min=1e-9))
