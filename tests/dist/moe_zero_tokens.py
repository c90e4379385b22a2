"""Rank-side check: ranks whose tokens go to different numbers of experts (rank 0: all to expert 0;
rank 1: half to expert 1, half to expert 2; expert 3 gets none) train through a real DeepSpeed engine (bf16)
under ZeRO-1 and ZeRO-2, both dispatch settings, EP=1 and EP=2, and their replicated weights stay equal.
Run: deepspeed --num_gpus 2 --module tests.dist.moe_zero_tokens
"""
from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model.moe import SparseFFN
from tests.dist.common import init_dist

D, E, TOKENS, STEPS = 16, 4, 16, 4
ROUTES = {0: [0] * TOKENS, 1: [1, 2] * (TOKENS // 2)}  # rank -> expert of each token
VARIANTS = [dict(dispatch="indexed", stage=1), dict(dispatch="indexed", stage=2),
            dict(dispatch="deepspeed", stage=1), dict(dispatch="deepspeed", stage=2),
            dict(dispatch="indexed", stage=2, ep_size=2)]


class OneMoE(nn.Module):
    def __init__(self, dispatch: str, ep_size: int):
        super().__init__()
        self.moe = SparseFFN(ModelConfig(hidden_size=D, num_heads=2, mlp_ratio=2, moe=MoEConfig(
            num_experts=E, ep_size=ep_size, min_capacity=1, dispatch=dispatch)))
        with torch.no_grad():  # logits = the first E input features: a token goes to its largest one
            self.moe.router.weight.copy_(torch.eye(E, D))
        self.head = nn.Linear(D, 1)

    def forward(self, x_sd):
        y_sd, l_aux, counts = self.moe(x_sd)
        return self.head(y_sd).square().mean() + 0.01 * l_aux, counts


def engine_for(dispatch: str, stage: int, ep_size: int = 1):
    torch.manual_seed(0)
    module = OneMoE(dispatch, ep_size)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(module.parameters()), "name": "all"})
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "contiguous_gradients": True, "reduce_scatter": True},
              "bf16": {"enabled": True}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(groups, lr=1e-3), config=config)
    return engine


def main() -> None:
    rank, world = init_dist()
    assert world == 2
    for variant in VARIANTS:
        engine = engine_for(**variant)
        for step in range(STEPS):
            g = torch.Generator().manual_seed(10 * step + rank)
            x_sd = 0.1 * torch.randn(TOKENS, D, generator=g)
            x_sd[torch.arange(TOKENS), ROUTES[rank]] += 5.0
            loss, counts = engine(x_sd.to(torch.bfloat16))
            assert counts.tolist() == torch.bincount(torch.tensor(ROUTES[rank]), minlength=E).tolist(), \
                (variant, counts)
            engine.backward(loss)
            engine.step()
            assert torch.isfinite(loss), (variant, step)
        for name, param in engine.module.named_parameters():  # replicas got the same updates
            if variant.get("ep_size", 1) == 1 or "deepspeed_experts" not in name:
                other = param.detach().clone()
                dist.broadcast(other, src=0)
                assert torch.equal(other, param.detach()), (variant, name)
        dist.barrier()
        print(f"rank {rank}: trained {STEPS} steps with ranks routing to different experts for {variant}", flush=True)
    print(f"rank {rank}: ZERO_TOKENS_OK", flush=True)


if __name__ == "__main__":
    from pipeline.run.distributed import shutdown_distributed

    main()
    shutdown_distributed()  # as pipeline.train does: no gloo abort (exit 250) at teardown
