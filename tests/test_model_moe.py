"""MoE FFN oracles: 1 expert == dense MLP, upcycled identical top-2 experts == dense, indexed dispatch ==
DeepSpeed's stock MOELayer, gradients reach experts, routers learn."""

import pytest
import torch

from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model import VLMoE
from pipeline.model.moe import MLP, SparseFFN, run_ffn
from pipeline.run.tb_logging import expert_load_scalars

D = 16


def sparse(**moe) -> SparseFFN:
    moe = {"min_capacity": 1, **moe}
    return SparseFFN(ModelConfig(hidden_size=D, num_heads=2, mlp_ratio=2, moe=MoEConfig(**moe)))


def load_dense_into_experts(moe: SparseFFN, dense: MLP) -> None:
    for expert in moe.experts:
        expert.load_state_dict(dense.state_dict())


@pytest.mark.parametrize("dispatch", ["deepspeed", "indexed"])
def test_one_expert_equals_dense_mlp(dispatch):
    torch.manual_seed(0)
    dense = MLP(D, 2 * D)
    moe = sparse(num_experts=1, drop_tokens=False, dispatch=dispatch)
    load_dense_into_experts(moe, dense)
    x = torch.randn(40, D)
    out, l_aux, counts = moe(x)
    torch.testing.assert_close(out, dense(x))
    assert counts.tolist() == [40]


@pytest.mark.parametrize("dispatch", ["deepspeed", "indexed"])
def test_upcycled_top2_identical_experts_equals_dense(dispatch):
    torch.manual_seed(0)
    dense = MLP(D, 2 * D)
    moe = sparse(num_experts=4, top_k=2, drop_tokens=False, dispatch=dispatch)
    load_dense_into_experts(moe, dense)
    x = torch.randn(64, D)
    out, _, counts = moe(x)
    torch.testing.assert_close(out, dense(x))  # the two gate weights of every token sum to 1
    assert int(counts.sum()) == 2 * 64


def twin_layers(**moe):
    torch.manual_seed(0)
    stock = sparse(dispatch="deepspeed", **moe)
    ours = sparse(dispatch="indexed", **moe)
    ours.load_state_dict(stock.state_dict())
    return stock, ours


CASES = [dict(num_experts=4, top_k=1), dict(num_experts=4, top_k=1, use_rts=False, capacity_factor=0.5),
         dict(num_experts=8, top_k=2), dict(num_experts=8, top_k=2, drop_tokens=False),
         dict(num_experts=4, top_k=1, drop_tokens=False), dict(num_experts=4, top_k=1, use_residual=True),
         dict(num_experts=4, top_k=2, capacity_factor=0.25)]


@pytest.mark.parametrize("moe", CASES, ids=[str(c) for c in CASES])
def test_indexed_dispatch_equals_stock(moe):
    stock, ours = twin_layers(**moe)
    x = torch.randn(96, D)
    used = (torch.rand(96) > 0.3).long()
    results = []
    for layer in (stock, ours):
        torch.manual_seed(1)  # RTS / gumbel sampling draw the same numbers
        xg = x.clone().requires_grad_()
        out, l_aux, counts = layer(xg, used)
        (out.square().sum() + l_aux).backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        results.append((out, l_aux, counts, xg.grad, grads))
    (o1, a1, c1, g1, p1), (o2, a2, c2, g2, p2) = results
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(a2, a1)
    assert torch.equal(c1, c2)
    torch.testing.assert_close(g2, g1)
    for name, grad in p1.items():  # stock also "computes" empty slots: zero grads where we have None
        torch.testing.assert_close(p2.get(name, torch.zeros_like(grad)), grad, msg=name)


def test_state_dict_names_are_deepspeeds():
    names = set(sparse(num_experts=2, dispatch="indexed").state_dict())
    assert "deepspeed_moe.gate.wg.weight" in names
    assert "deepspeed_moe.experts.deepspeed_experts.1.fc2.bias" in names


def test_gradients_reach_every_used_expert_and_router_learns():
    torch.manual_seed(0)
    moe = sparse(num_experts=4, top_k=2, dispatch="indexed")
    for expert in moe.experts:  # independent experts, as from-scratch init gives
        for p in expert.parameters():
            torch.nn.init.normal_(p, std=0.1)
    router_before = moe.router.weight.detach().clone()
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    x = torch.randn(128, D)
    out, l_aux, counts = moe(x)
    (out.square().mean() + 0.01 * l_aux).backward()
    for e, expert in enumerate(moe.experts):
        if counts[e] > 0:
            assert expert.fc1.weight.grad is not None and expert.fc1.weight.grad.abs().sum() > 0, e
    assert moe.router.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(moe.router.weight, router_before)


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="min_capacity"):
        SparseFFN(ModelConfig(hidden_size=D, num_heads=2, moe=MoEConfig(min_capacity=8)))(torch.randn(4, D))



@pytest.mark.parametrize("dispatch", ["deepspeed", "indexed"])
@pytest.mark.parametrize("capacity_factor,dropped", [(2.0, 0.0), (1.0, 0.5)])
def test_measured_drops_over_real_tokens(dispatch, capacity_factor, dropped):
    """32 tokens, 16 of them padding, the 16 real ones all routed to expert 0; capacity ceil(32/4 * cf)
    is 16 (nothing dropped) or 8 (half dropped). The old estimate, from the routed counts alone, said
    50% and 75%."""
    moe = sparse(num_experts=4, dispatch=dispatch, capacity_factor=capacity_factor)
    torch.nn.init.zeros_(moe.router.weight)  # equal logits: argmax picks expert 0
    used = torch.arange(32) % 2
    _, _, routed, kept = run_ffn(moe, torch.randn(32, D), used)
    assert routed.tolist() == [16, 0, 0, 0]
    assert kept.tolist() == [int(16 * (1 - dropped)), 0, 0, 0]
    scalars = expert_load_scalars({"layer1/text": routed}, {"layer1/text": kept})
    assert scalars["moe/layer1/text/routed"] == 16
    assert scalars["moe/layer1/text/dropped_frac"] == pytest.approx(dropped)
    assert not any("est" in key or key.startswith("moe/layer1/text/kept/") for key in scalars)


def test_model_counts_carry_kept_counts_to_the_logged_drop_fraction():
    """Padding-heavy text through the whole model: every layer's counts travel with their kept counts
    (as the trainer sums them), and a capacity that cannot overflow logs 0 dropped."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=D, num_layers=2, num_heads=2, vocab_size=50, max_text_len=16,
                      num_fusion_layers=0, moe=MoEConfig(num_experts=4, every=1, min_capacity=1,
                                                         capacity_factor=4.0))
    model = VLMoE(cfg)
    mask = torch.zeros(4, 16, dtype=torch.long)
    mask[:, :3] = 1
    model.encode_text(torch.randint(5, 50, (4, 16)), mask)
    scalars = expert_load_scalars(model.moe_stats.routed, model.moe_stats.kept)
    for layer in (0, 1):
        assert scalars[f"moe/layer{layer}/text/routed"] == 12
        assert scalars[f"moe/layer{layer}/text/dropped_frac"] == 0.0
