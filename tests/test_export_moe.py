"""Local experts (``LocalSparseFFN``, no DeepSpeed) give DeepSpeed's eval outputs at EP=1: same state-dict
keys, same top-k choice, gate weights, padding mask and capacity dropping; a whole VLMoE agrees too."""
import subprocess
import sys

import pytest
import torch

from pipeline.model import VLMoE
from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model.dispatch import DeepSpeedSparseFFN
from pipeline.model.moe import LocalSparseFFN, SparseFFN, local_experts, run_ffn
from tests.launcher import REPO, launcher_env

D = 16


def twins(**moe) -> tuple[SparseFFN, SparseFFN]:
    """(DeepSpeed's FFN in eval, local FFN with its weights); top-2 without Gumbel sampling."""
    cfg = ModelConfig(hidden_size=D, num_heads=2, mlp_ratio=2,
                      moe=MoEConfig(**{"min_capacity": 1, "top2_2nd_expert_sampling": False, **moe}))
    torch.manual_seed(0)
    deepspeed_ffn = SparseFFN(cfg).eval()
    for param in deepspeed_ffn.experts.parameters():  # DeepSpeed deep-copies one expert: make them differ
        torch.nn.init.normal_(param, std=0.3)
    with local_experts():
        local = SparseFFN(cfg).eval()
    assert isinstance(deepspeed_ffn, DeepSpeedSparseFFN) and isinstance(local, LocalSparseFFN)
    local.load_state_dict(deepspeed_ffn.state_dict(), strict=True)  # the same keys, nothing missing
    return deepspeed_ffn, local


CASES = [dict(num_experts=4, top_k=1, eval_capacity_factor=4.0), dict(num_experts=4, top_k=1, drop_tokens=False),
         dict(num_experts=4, top_k=1, use_rts=False, eval_capacity_factor=0.5),
         dict(num_experts=8, top_k=2), dict(num_experts=4, top_k=2, eval_capacity_factor=0.25),
         dict(num_experts=8, top_k=2, drop_tokens=False), dict(num_experts=4, top_k=1, use_residual=True,
                                                                  eval_capacity_factor=4.0),
         dict(num_experts=4, top_k=1, dispatch="deepspeed", use_rts=False, eval_capacity_factor=0.5)]


@pytest.mark.parametrize("moe", CASES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_local_experts_equal_deepspeed_eval(moe):
    deepspeed_ffn, local = twins(**moe)
    torch.manual_seed(1)
    x = torch.randn(96, D) * 3
    used = (torch.rand(96) > 0.3).long()
    with torch.no_grad():
        want, _, want_counts, want_kept = run_ffn(deepspeed_ffn, x, used)
        got, aux, counts, kept = run_ffn(local, x, used)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == want_counts.tolist() and kept.tolist() == want_kept.tolist()
    assert float(aux) == 0.0 and not aux.requires_grad
    assert (counts > 0).sum() >= 2  # tokens really went to several experts
    if moe.get("eval_capacity_factor", 1.0) < 1 and moe.get("drop_tokens", True):
        assert int(kept.sum()) < int(counts.sum())  # some routes were dropped, in DeepSpeed's order
        assert (got.abs().sum(1) == 0).any()


def test_expert_order_matters():
    """The comparison above would catch a wrong expert mapping: swapping two experts changes the output."""
    deepspeed_ffn, local = twins(num_experts=4, top_k=1, eval_capacity_factor=4.0)
    state = {k: v.clone() for k, v in local.state_dict().items()}
    prefix = "deepspeed_moe.experts.deepspeed_experts"
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        first, second = f"{prefix}.0.{name}", f"{prefix}.1.{name}"
        state[first], state[second] = state[second], state[first]
    local.load_state_dict(state)
    x = torch.randn(64, D) * 3
    with torch.no_grad():
        assert not torch.allclose(local(x)[0], deepspeed_ffn(x)[0], atol=1e-4)


def test_vlmoe_with_local_experts_equals_deepspeed_model():
    cfg = ModelConfig(hidden_size=32, num_heads=2, num_layers=2, num_fusion_layers=1, image_size=32, patch_size=8,
                      vocab_size=64, max_text_len=8,
                      moe=MoEConfig(num_experts=4, top_k=2, min_capacity=1, top2_2nd_expert_sampling=False))
    torch.manual_seed(0)
    reference = VLMoE(cfg).eval()
    with local_experts():
        local = VLMoE(cfg).eval()
    local.load_state_dict(reference.state_dict(), strict=True)
    pixels, ids = torch.randn(4, 3, 32, 32), torch.randint(0, 64, (4, 8))
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[:, 5:] = 0
    with torch.no_grad():
        want, got = reference.fuse(pixels, ids, mask), local.fuse(pixels, ids, mask)
    torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-5, atol=1e-5)
    assert {k: v.tolist() for k, v in local.moe_stats.kept.items()} == \
        {k: v.tolist() for k, v in reference.moe_stats.kept.items()}


def test_model_package_imports_without_deepspeed():
    """``import pipeline.model`` / VLMoE never import deepspeed; without it, MoE FFNs are local."""
    code = ("import sys; sys.modules['deepspeed'] = None\n"
            "from pipeline.model import VLMoE, ModelConfig\n"
            "from pipeline.model.config import MoEConfig\n"
            "m = VLMoE(ModelConfig(hidden_size=32, num_heads=2, num_layers=2, moe=MoEConfig(min_capacity=1)))\n"
            "print(type(m.blocks[1].ffn['image']).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=launcher_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "LocalSparseFFN"
