"""Experts that receive no token still get a (zero) gradient every step, so ZeRO-1/2 gradient buckets
have the same layout on every rank: one process for the layer, and EP=1 / EP=2 on 2 ranks through the
real launcher, where ranks route to different experts (each rank's tokens all go to one expert)."""
import pytest
import torch

from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model.moe import SparseFFN
from tests.launcher import run_deepspeed

D = 16


@pytest.mark.parametrize("dispatch", ["deepspeed", "indexed"])
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_expert_without_tokens_gets_zero_grad(dispatch, drop_tokens):
    torch.manual_seed(0)
    moe = SparseFFN(ModelConfig(hidden_size=D, num_heads=2, mlp_ratio=2, moe=MoEConfig(
        num_experts=4, min_capacity=1, dispatch=dispatch, drop_tokens=drop_tokens)))
    torch.nn.init.zeros_(moe.router.weight)  # equal logits: argmax sends every token to expert 0
    out, l_aux, counts = moe(torch.randn(24, D))
    (out.square().sum() + l_aux).backward()
    assert counts.tolist() == [24, 0, 0, 0]
    assert moe.experts[0].fc1.weight.grad.abs().sum() > 0
    for e in (1, 2, 3):
        for name, param in moe.experts[e].named_parameters():
            assert param.grad is not None, f"expert {e} {name}: no gradient"
            assert not param.grad.any(), f"expert {e} {name}: non-zero gradient without tokens"


@pytest.mark.slow
def test_ranks_routing_to_different_experts_train_under_zero():
    proc = run_deepspeed("tests.dist.moe_zero_tokens", [], nproc=2, timeout=300)
    assert proc.stdout.count("ZERO_TOKENS_OK") == 2, proc.stdout[-3000:]
