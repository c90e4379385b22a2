"""Rank-side checks of the dropless MoE FFN (``moe.impl: dropless``) on 2 ranks, EP=2.

1. EP=2 == EP=1 on the same global batch with the same weights: fused hidden states, loss, routed counts
   and every gradient (a tiny VLMoE, texts of different lengths, one fully padded), for several settings.
2. Forced skew: rank 0 routes every token to rank 1's experts, rank 1 has no real token at all (sends and
   receives nothing on the way out, gets everything back on the way in); outputs equal a local run.
3. Real DeepSpeed engines under ZeRO-1 and ZeRO-2: 3 steps at EP=2 give the same expert weights as at EP=1
   (the expert-data-parallel reduction is active: an expert's gradient is not averaged with the other
   rank's different experts) and replicated weights equal on both ranks; the engine saves one file per
   expert, and an EP=1 engine loads that checkpoint; through DeepSpeed's universal checkpoint an EP=1 engine
   resumes it with its optimizer state (2 more steps equal the EP=2 run's).
Run: deepspeed --num_gpus 2 --module tests.dist.moe_dropless all <tmpdir>, then ... universal <tmpdir>
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model.moe import build_ffn
from pipeline.run.checkpoint import restore_buffers
from tests.dist.common import init_dist, setup_expert_parallel
from tests.dist.moe_ep_equivalence import check

B = 3  # per rank
VARIANTS = [dict(impl="dropless", top_k=1), dict(impl="dropless", top_k=2, balance="aux", z_loss_coef=1e-3),
            dict(impl="dropless", top_k=2, score_func="sigmoid", shared_experts=1, expert_groups=2,
                 max_groups_per_token=1, expert_ffn_size=32)]
EXPERT_TENSORS = ("experts.w1", "experts.w2", "experts.w3")


def rows(key: str, value: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of an EP=1 tensor: rows [r*E_l, (r+1)*E_l) of fused expert tensors, else all."""
    if not key.endswith(EXPERT_TENSORS):
        return value
    local = value.shape[0] // world
    return value[rank * local:(rank + 1) * local]


def check_equivalence(variant: dict, rank: int, world: int, alone) -> None:
    """tests.dist.moe_ep_equivalence's check, with this rank's rows of the fused expert tensors."""
    check(variant, rank, world, alone, reference=lambda name, tensors: rows(name, tensors[name], rank, world),
          is_expert=lambda name: name.endswith(EXPERT_TENSORS))


def small_ffn(ep_size: int) -> nn.Module:
    """A 4-expert dropless FFN, D=16, whose router sends a token to the largest of its first 4 features;
    at EP=2 this rank's rows of the EP=1 one (same weights whatever the layout)."""
    def build(ep: int) -> nn.Module:
        cfg = ModelConfig(hidden_size=16, num_heads=2, mlp_ratio=2,
                          moe=MoEConfig(impl="dropless", num_experts=4, ep_size=ep))
        return build_ffn(cfg, sparse=True)
    torch.manual_seed(0)
    full = build(1)
    with torch.no_grad():
        full.router.gate.weight.copy_(torch.eye(4, 16))
        full.experts.w3.normal_(std=0.1)
    if ep_size == 1:
        return full
    ffn = build(ep_size)
    ffn.load_state_dict({k: rows(k, v, dist.get_rank(), ep_size) for k, v in full.state_dict().items()})
    return ffn


def check_skew(rank: int, world: int) -> None:
    """Rank 0: 12 tokens, all to experts 2 and 3 (rank 1's); rank 1: 12 tokens, none real."""
    cfg_local = small_ffn(1)
    ep_ffn = small_ffn(world)
    setup_expert_parallel(ep_ffn)
    g = torch.Generator().manual_seed(7 + rank)
    x_sd = 0.1 * torch.randn(12, 16, generator=g)
    x_sd[torch.arange(12), torch.tensor([2, 3] * 6)] += 5.0
    x_sd.requires_grad_(True)
    used_s = torch.ones(12) if rank == 0 else torch.zeros(12)
    y_sd, _, counts = ep_ffn(x_sd, used_s)
    want_counts = [0, 0, 6, 6] if rank == 0 else [0, 0, 0, 0]
    assert counts.tolist() == want_counts, (rank, counts)
    (y_sd * torch.linspace(-1, 1, 16)).sum().backward()
    x_ref = x_sd.detach().clone().requires_grad_(True)
    y_ref, _, _ = cfg_local(x_ref, used_s)
    (y_ref * torch.linspace(-1, 1, 16)).sum().backward()
    torch.testing.assert_close(y_sd, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x_sd.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    if rank == 1:
        assert y_sd.abs().sum() == 0 and x_sd.grad.abs().sum() == 0  # padding: no output, no gradient
    grads = ep_ffn.experts.w1.grad.clone()
    if rank == 0:  # rank 0 owns experts 0 and 1: nobody routed to them, their gradient is zero (not None)
        assert grads.abs().sum() == 0
    else:
        assert grads.abs().sum() > 0


class OneMoE(nn.Module):
    def __init__(self, ep_size: int):
        super().__init__()
        self.head = nn.Linear(16, 1)
        self.moe = small_ffn(ep_size)

    def forward(self, x_sd):
        y_sd, l_aux, counts = self.moe(x_sd)
        return self.head(y_sd).square().mean() + 0.01 * l_aux


def engine_for(ep_size: int, stage: int, universal: bool = False):
    torch.manual_seed(0)
    module = OneMoE(ep_size)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(module.parameters()),
                                                                   "name": "all"})
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "contiguous_gradients": True, "reduce_scatter": True},
              "steps_per_print": 10 ** 9, "checkpoint": {"load_universal": universal}}
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(groups, lr=1e-2), config=config)
    return engine


def train_steps(engine, rank: int, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(10 * step + rank)
        x_sd = torch.randn(16, 16, generator=g)
        x_sd[:, rank] += 3.0 * (1 + rank)  # ranks prefer different experts
        engine.backward(engine(x_sd))
        engine.step()


def weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def check_engines(rank: int, world: int, tmp: Path) -> None:
    for stage in (1, 2):
        trained = {}
        for ep_size in (1, world):
            engine = engine_for(ep_size, stage)
            assert engine.has_moe_layers
            train_steps(engine, rank, range(3))
            if stage == 2:  # a learned expert bias (as the trainer's updates leave): resumes must restore it
                engine.module.moe.expert_bias.copy_(torch.tensor([0.3, -0.3, 0.2, -0.2]))
            trained[ep_size] = weights(engine)
            for name, param in engine.module.named_parameters():  # replicas got the same updates
                if ep_size == 1 or not name.endswith(EXPERT_TENSORS):
                    other = param.detach().clone()
                    dist.broadcast(other, src=0)
                    assert torch.equal(other, param.detach()), (stage, ep_size, name)
            if ep_size == world and stage == 2:
                engine.save_checkpoint(str(tmp), tag="ep2")
                train_steps(engine, rank, range(3, 5))
                resumed_ep2 = weights(engine)
        for key, value in trained[world].items():
            torch.testing.assert_close(value, rows(key, trained[1][key], rank, world), atol=1e-6, rtol=1e-5,
                                       msg=lambda m: f"stage {stage} {key}: {m}")
        print(f"rank {rank}: ZeRO-{stage} EP={world} == EP=1 after 3 steps", flush=True)
    dist.barrier()
    files = sorted(p.name for p in (tmp / "ep2").iterdir() if p.name.startswith("layer_"))
    assert files == [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)], files
    engine = engine_for(1, 2)
    engine.load_checkpoint(str(tmp), tag="ep2", load_optimizer_states=False, load_lr_scheduler_states=False)
    for key, value in engine.module.state_dict().items():
        torch.testing.assert_close(rows(key, value, rank, world), trained[world][key], msg=lambda m: f"{key}: {m}")
    print(f"rank {rank}: EP=2 checkpoint loads at EP=1", flush=True)
    torch.save(resumed_ep2, tmp / f"ep2_steps5_rank{rank}.pt")
    if rank == 0:  # for check_universal_resume, run in a new launch (see main)
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(tmp / "ep2"), "--output_folder", str(tmp / "ep2_universal")], check=True,
                       capture_output=True, timeout=120)
    dist.barrier()


def check_universal_resume(rank: int, world: int, tmp: Path) -> None:
    """Resume the EP=2 ZeRO-2 checkpoint at EP=1 WITH its optimizer state through DeepSpeed's universal
    checkpoint: 2 more steps equal the EP=2 run's; a weights-only load (fresh Adam moments) does not.
    A process of its own: DeepSpeed slices universal expert states by the largest EP group the process has
    ever created (``_get_universal_checkpoint_ep_info``), so this process must only know EP=1."""
    resumed_ep2 = torch.load(tmp / f"ep2_steps5_rank{rank}.pt")
    for universal, tag in ((True, "ep2_universal"), (False, "ep2")):
        engine = engine_for(1, 2, universal=universal)
        engine.load_checkpoint(str(tmp), tag=tag, load_optimizer_states=universal, load_lr_scheduler_states=False)
        if universal:  # DeepSpeed restores parameters only: pipeline.run.checkpoint.resume adds the buffers
            assert engine.module.moe.expert_bias.abs().sum() == 0
            restore_buffers(engine.module, tmp / tag)
        train_steps(engine, rank, range(3, 5))
        close = all(torch.allclose(rows(k, v, rank, world), resumed_ep2[k], atol=1e-6, rtol=1e-5)
                    for k, v in weights(engine).items())
        assert close == universal, f"universal={universal}: EP=1 resume equal to the EP=2 run: {close}"
    print(f"rank {rank}: EP=2 ZeRO-2 checkpoint resumes at EP=1 with optimizer state (universal)", flush=True)


def main() -> None:
    rank, world = init_dist()
    assert world == 2
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    tmp = Path(args[-1])
    if args[0] == "universal":
        check_universal_resume(rank, world, tmp)
        print(f"rank {rank}: DROPLESS_UNIVERSAL_OK", flush=True)
        return
    singletons = [dist.new_group([r]) for r in range(world)]
    for variant in VARIANTS:
        check_equivalence(variant, rank, world, singletons[rank])
        print(f"rank {rank}: EP={world} == EP=1 for {variant}", flush=True)
    check_skew(rank, world)
    print(f"rank {rank}: skewed routing and an all-padding rank: done, equal to a local run", flush=True)
    check_engines(rank, world, tmp)
    dist.barrier()
    print(f"rank {rank}: DROPLESS_OK", flush=True)


if __name__ == "__main__":
    from pipeline.run.distributed import shutdown_distributed

    main()
    shutdown_distributed()
