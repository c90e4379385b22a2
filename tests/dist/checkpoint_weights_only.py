"""Rank-side check: real DeepSpeed MoE checkpoints (ZeRO-2, bf16, EP=2) saved by pipeline.run.checkpoint load
weights-only: ``resume`` restores module + ZeRO optimizer state exactly, ``load_weights`` (init_from) takes
another task's checkpoint (only heads differ) and refuses a model whose body tensors differ; a crafted
``mp_rank_00_model_states.pt`` is refused by both, naming the file, and never runs.
Run: deepspeed --num_gpus 2 --module tests.dist.checkpoint_weights_only FOLDER
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from pipeline.run.checkpoint import load_weights, resume, save_checkpoint
from pipeline.config_utils import ConfigError
from pipeline.run.distributed import Dist, barrier
from tests.dist.common import init_dist
from tests.dist.moe_zero_tokens import OneMoE

D = 16


class Tasked(nn.Module):
    """Model + heads, named as a Task (pipeline.tasks.base) names them."""

    def __init__(self, head: str, extra_body: bool = False):
        super().__init__()
        self.model = OneMoE("indexed", ep_size=2)
        if extra_body:
            self.model.extra = nn.Linear(D, D)
        self.heads = nn.ModuleDict({head: nn.Linear(D, 1)})

    def forward(self, x_sd):
        loss, _ = self.model(x_sd)
        return loss + next(iter(self.heads.values()))(x_sd).mean()


def engine_for(seed: int, head: str = "a", extra_body: bool = False):
    torch.manual_seed(seed)
    module = Tasked(head, extra_body)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(module.parameters()), "name": "all"})
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True},
              "bf16": {"enabled": True}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(groups, lr=1e-2), config=config)
    return engine


def train_step(engine, rank: int, step: int) -> None:
    x_sd = torch.randn(16, D, generator=torch.Generator().manual_seed(10 * step + rank))
    engine.backward(engine(x_sd.to(torch.bfloat16)))
    engine.step()


def params(engine, prefix: str = "") -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters() if n.startswith(prefix)}


def expect_refusal(call, what: str) -> None:
    try:
        call()
    except ConfigError as exc:
        assert "mp_rank_00_model_states.pt: refused to load" in str(exc), (what, exc)
        return
    raise AssertionError(f"{what}: a crafted checkpoint loaded")


def main() -> None:
    rank, world = init_dist()
    dist = Dist(rank, world, rank, torch.device("cpu"))
    run = Path([a for a in sys.argv[1:] if not a.startswith("--")][0])
    source = engine_for(0)
    train_step(source, rank, 0)
    save_checkpoint(source, run, 1, {"step": 1}, keep_last=2, dist=dist)

    resumed = engine_for(1)
    assert resume(resumed, run, dist) == {"step": 1}
    for step in (1, 2):  # same weights and optimizer state: the same next steps (same RTS draws)
        for engine in (source, resumed):
            torch.manual_seed(step)
            train_step(engine, rank, step)
    for (name, a), b in zip(params(source).items(), params(resumed).values()):
        assert torch.equal(a, b), name

    other_task = engine_for(2, head="b")
    load_weights(other_task, run)
    saved_body = engine_for(0)
    resume(saved_body, run, dist)
    for (name, a), b in zip(params(saved_body, "model.").items(), params(other_task, "model.").values()):
        assert torch.equal(a, b), name
    try:
        load_weights(engine_for(3, extra_body=True), run)
        raise AssertionError("init_from into a model with an extra body tensor loaded")
    except ConfigError as exc:
        assert "model.extra.weight" in str(exc), exc

    marker = run / f"pwned_{rank}"
    barrier()  # every rank has finished reading the real checkpoint before rank 0 overwrites it
    if rank == 0:
        class RunsShell:
            def __reduce__(self):
                return os.system, (f"touch {run}/pwned_0 {run}/pwned_1",)
        torch.save({"module": RunsShell()}, run / "checkpoints" / "step_000001" / "mp_rank_00_model_states.pt")
    barrier()
    expect_refusal(lambda: resume(engine_for(4), run, dist), "resume")
    expect_refusal(lambda: load_weights(engine_for(5), run), "init_from")
    assert not marker.exists()
    barrier()
    print(f"rank {rank}: WEIGHTS_ONLY_OK", flush=True)


if __name__ == "__main__":
    from pipeline.run.distributed import shutdown_distributed

    main()
    shutdown_distributed()
