"""The dropless MoE FFN (``moe.impl: dropless``, pipeline/model/dropless.py): oracles, padding, balancing,
group-limited routing, and the 2-rank run through the real launcher (tests/dist/moe_dropless.py)."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model.dropless import DroplessFFN, has_grouped_mm
from pipeline.model.moe import MLP
from tests.launcher import run_deepspeed

D = 16


def ffn_of(**moe) -> DroplessFFN:
    cfg = ModelConfig(hidden_size=D, num_heads=2, mlp_ratio=2, moe=MoEConfig(impl="dropless", **moe))
    return DroplessFFN(cfg)


def dense_like(ffn: DroplessFFN, expert: int = 0) -> MLP:
    """The dense MLP holding expert ``expert``'s weights."""
    mlp = MLP(D, ffn.experts.ffn_size)
    b1, b2 = ffn.experts.biases()
    with torch.no_grad():
        mlp.fc1.weight.copy_(ffn.experts.w1[expert])
        mlp.fc1.bias.copy_(b1[expert])
        mlp.fc2.weight.copy_(ffn.experts.w2[expert])
        mlp.fc2.bias.copy_(b2[expert])
    return mlp


def randomize_biases(ffn: DroplessFFN) -> None:
    with torch.no_grad():
        ffn.experts.w3.normal_(std=0.1)


def test_one_expert_top1_is_the_dense_mlp():
    torch.manual_seed(0)
    ffn = ffn_of(num_experts=1, top_k=1)
    randomize_biases(ffn)
    x = torch.randn(40, D)
    y, _, counts = ffn(x)
    torch.testing.assert_close(y, dense_like(ffn)(x), atol=1e-6, rtol=1e-6)
    assert counts.tolist() == [40]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_top_k_over_identical_experts_is_the_dense_ffn(score_func):
    """Normalised weights sum to 1, so k copies of one expert give that expert's output, whatever the router."""
    torch.manual_seed(0)
    ffn = ffn_of(num_experts=4, top_k=2, score_func=score_func)
    randomize_biases(ffn)
    with torch.no_grad():
        ffn.experts.w1.copy_(ffn.experts.w1[:1].expand_as(ffn.experts.w1))
        ffn.experts.w2.copy_(ffn.experts.w2[:1].expand_as(ffn.experts.w2))
        ffn.experts.w3.copy_(ffn.experts.w3[:1].expand_as(ffn.experts.w3))
        ffn.router.gate.weight.normal_()
    x = torch.randn(64, D)
    y, _, counts = ffn(x)
    torch.testing.assert_close(y, dense_like(ffn)(x), atol=1e-5, rtol=1e-5)
    assert int(counts.sum()) == 64 * 2 and (counts > 0).sum() > 1  # really spread over experts


def test_softmax_top1_weight_is_the_probability_so_the_router_learns():
    """route_norm defaults off for softmax top-1 (Switch): a normalised single weight would be 1 and the router
    would get no gradient from the output."""
    torch.manual_seed(0)
    ffn = ffn_of(num_experts=4, top_k=1)
    assert not ffn.router.route_norm
    y, _, _ = ffn(torch.randn(32, D))
    y.square().sum().backward()
    assert ffn.router.gate.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not has_grouped_mm(), reason="this torch has no torch._grouped_mm")
def test_grouped_mm_equals_the_loop_forward_and_backward_with_idle_experts():
    outs = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        ffn = ffn_of(num_experts=8, top_k=2, grouped_mm=mode)
        randomize_biases(ffn)
        ffn.expert_bias[5:] = -10.0  # experts 5..7 never chosen: zero rows in the grouped GEMM
        x = torch.randn(48, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y, _, counts = ffn(x)
        (y * torch.linspace(-1, 1, D)).sum().backward()
        assert counts[5:].sum() == 0 and ffn.experts.w1.grad[5:].abs().sum() == 0
        outs[mode] = (y.detach(), x.grad, ffn.experts.w1.grad, ffn.experts.w3.grad, ffn.router.gate.weight.grad)
    for loop, grouped in zip(outs["off"], outs["on"]):
        torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=1e-5)


def test_padding_is_never_routed_gets_zero_and_no_gradient():
    torch.manual_seed(0)
    ffn = ffn_of(num_experts=4, top_k=2, shared_experts=1)
    randomize_biases(ffn)
    x = torch.randn(30, D, requires_grad=True)
    used = torch.ones(30, dtype=torch.long)
    used[::3] = 0
    y, aux, counts = ffn(x, used)
    assert int(counts.sum()) == int(used.sum()) * 2  # every real token exactly k times, padding never
    assert y[used == 0].abs().sum() == 0
    y.square().sum().backward()
    assert x.grad[used == 0].abs().sum() == 0 and x.grad[used == 1].abs().sum() > 0
    real = used.bool()
    y_real, _, counts_real = ffn(x.detach()[real])  # the real tokens alone give the same outputs
    torch.testing.assert_close(y.detach()[real], y_real)
    assert torch.equal(counts, counts_real)
    y_none, aux_none, counts_none = ffn(x, torch.zeros(30))  # no real token at all: fine, zero, no NaN
    assert y_none.abs().sum() == 0 and counts_none.sum() == 0 and torch.isfinite(aux_none)


def test_router_choice_equals_deepspeeds_token_choice_router():
    from deepspeed.moe.ep_router import TokenChoiceTopKRouter
    torch.manual_seed(0)
    x = torch.randn(50, D)
    for moe, groups in ((dict(top_k=2), None), (dict(top_k=1, route_norm=False), None),
                        (dict(top_k=2, score_func="sigmoid", expert_groups=4, max_groups_per_token=2), (4, 2))):
        ffn = ffn_of(num_experts=8, **moe)
        bias = torch.randn(8) * 0.05
        ours_w, ours_e, _, _ = ffn.router(x, bias)
        ds = TokenChoiceTopKRouter(D, 8, groups and groups[0], groups and groups[1], moe["top_k"],
                                   moe.get("score_func", "softmax"), ffn.router.route_norm, 1.0, False)
        ds.gate.weight.data.copy_(ffn.router.gate.weight)
        ds_w, ds_e, ds_counts = ds(x, bias)
        order_o, order_d = ours_e.sort(1), ds_e.sort(1)  # topk(sorted=False): compare as sets per token
        assert torch.equal(order_o.values, order_d.values), moe
        torch.testing.assert_close(ours_w.gather(1, order_o.indices), ds_w.gather(1, order_d.indices))
        assert torch.equal(torch.bincount(ours_e.reshape(-1), minlength=8), ds_counts.long())


def test_group_limited_routing_keeps_each_token_in_its_allowed_groups():
    torch.manual_seed(0)
    ffn = ffn_of(num_experts=16, top_k=4, expert_groups=4, max_groups_per_token=1)
    with torch.no_grad():
        ffn.router.gate.weight.normal_()
    _, experts, _, _ = ffn.router(torch.randn(200, D))
    groups_per_token = (experts // 4).unique(dim=None, sorted=False)
    assert groups_per_token.numel() > 1  # tokens do use different groups
    assert all(len(set(row)) == 1 for row in (experts // 4).tolist())
    ffn2 = ffn_of(num_experts=16, top_k=4, expert_groups=4, max_groups_per_token=2)
    ffn2.load_state_dict(ffn.state_dict())
    _, experts2, _, _ = ffn2.router(torch.randn(200, D))
    spans = [len(set(row)) for row in (experts2 // 4).tolist()]
    assert max(spans) == 2 and min(spans) >= 1


def test_expert_bias_updates_balance_a_skewed_router():
    torch.manual_seed(0)
    ffn = ffn_of(num_experts=4, top_k=1, bias_update_rate=0.02)
    with torch.no_grad():
        ffn.router.gate.weight.normal_()
        ffn.router.gate.weight[0] += 0.5  # expert 0 wins most tokens
    ffn.train()
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(1)) + 0.5
    _, _, first = ffn(x)
    cv_start = ffn.load_cv(first)
    ffn.tokens_per_expert.zero_()
    for _ in range(60):
        _, _, counts = ffn(x)
        assert torch.equal(ffn.tokens_per_expert, counts)
        ffn.apply_bias_update(ffn.tokens_per_expert.clone())
        assert ffn.tokens_per_expert.sum() == 0
    _, _, last = ffn(x)
    assert cv_start > 0.4 and ffn.load_cv(last) < 0.2 * cv_start, (cv_start, ffn.load_cv(last), last)
    with torch.no_grad():  # eval passes do not count
        ffn.eval()
        ffn.tokens_per_expert.zero_()
        ffn(x)
    assert ffn.tokens_per_expert.sum() == 0


def test_a_bf16_cast_keeps_the_expert_bias_fp32_and_counts_exact():
    ffn = ffn_of(num_experts=4, top_k=1)
    ffn.expert_bias += torch.tensor([1e-3, 2e-3, 0.5 + 1e-3, 0.0])  # bf16 would round 0.501 to 0.5
    want = ffn.expert_bias.clone()
    ffn.to(torch.bfloat16)
    assert ffn.expert_bias.dtype == torch.float32 and torch.equal(ffn.expert_bias, want)
    assert ffn.experts.w1.dtype == torch.bfloat16 and ffn.tokens_per_expert.dtype == torch.long
    ffn.train()
    ffn.tokens_per_expert += 1000  # a long run's counts: exact, where bf16 would count 1000 + 1 as 1000
    ffn(torch.randn(3, D, dtype=torch.bfloat16))
    assert int(ffn.tokens_per_expert.sum()) == 4003


def test_aux_and_z_loss_follow_their_formulas():
    torch.manual_seed(0)
    ffn = ffn_of(num_experts=4, top_k=2, balance="aux", z_loss_coef=0.002, aux_loss_coef=0.01)
    with torch.no_grad():
        ffn.router.gate.weight.normal_()
    x = torch.randn(20, D)
    _, aux, counts = ffn(x)
    logits = x @ ffn.router.gate.weight.t()
    probs = logits.softmax(-1)
    switch = 4 * ((counts.float() / 40) * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(aux, switch + 0.2 * z)  # the trainer multiplies by aux_loss_coef: 0.01 and 0.002
    _, aux_bias, _ = ffn_of(num_experts=4, top_k=2)(x)
    assert float(aux_bias.detach()) == 0.0  # balance bias without z-loss: no loss term


def test_optimizer_sees_the_same_tensors_whatever_the_expert_count():
    counts = {e: len(list(ffn_of(num_experts=e, top_k=1).parameters())) for e in (4, 64)}
    assert counts[4] == counts[64] == 4  # router, w1, w2, w3


@pytest.mark.parametrize("moe, message", [
    (dict(top_k=5, num_experts=4), "top_k"),
    (dict(expert_groups=3, max_groups_per_token=1, num_experts=4), "divide"),
    (dict(expert_groups=2), "together"),
    (dict(expert_groups=4, max_groups_per_token=1, num_experts=8, top_k=4), "exceeds"),
    (dict(z_loss_coef=0.1, aux_loss_coef=0.0), "aux_loss_coef"),
])
def test_bad_dropless_settings_are_refused_with_the_field_named(moe, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(impl="dropless", **moe)


def test_dropless_only_settings_under_gshard_are_refused_not_ignored():
    """A gshard MoE would silently ignore them (a user asking for sigmoid routing or the z-loss would not get it)."""
    with pytest.raises(ValueError, match=r"moe.score_func, moe.z_loss_coef apply to moe.impl: dropless only"):
        MoEConfig(score_func="sigmoid", z_loss_coef=0.1)
    with pytest.raises(ValueError, match=r"moe.shared_experts apply"):
        MoEConfig(impl="gshard", shared_experts=1)
    MoEConfig(impl="gshard", top_k=2, capacity_factor=2.0)  # its own settings pass


def test_dropless_ep2_equals_ep1_survives_skew_trains_under_zero_and_resumes_at_ep1(tmp_path):
    proc = run_deepspeed("tests.dist.moe_dropless", ["all", str(tmp_path)], nproc=2, timeout=240)
    assert proc.stdout.count("DROPLESS_OK") == 2, proc.stdout[-3000:]
    proc = run_deepspeed("tests.dist.moe_dropless", ["universal", str(tmp_path)], nproc=2, timeout=120)
    assert proc.stdout.count("DROPLESS_UNIVERSAL_OK") == 2, proc.stdout[-3000:]


def test_grouped_mm_on_and_off_read_from_yaml_as_written_in_the_readme():
    """YAML 1.1 reads a bare ``on``/``off`` as a boolean: ``--set model.moe.grouped_mm=on`` must still work."""
    from pipeline.recipe import load_recipe
    from tests.launcher import REPO

    for word in ("on", "off"):
        recipe = load_recipe(REPO / "launch/recipes/vl_pretrain.yaml",
                             ["model.moe.impl=dropless", f"model.moe.grouped_mm={word}"])
        assert recipe.model.moe.grouped_mm == word
