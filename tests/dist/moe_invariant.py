"""Rank-side check: ranks whose batches differ (a rank whose texts are all padding, different numbers of
real tokens and of MLM-masked tokens) train and evaluate through a real DeepSpeed engine (ZeRO-2, bf16,
EP=2) without crashing or hanging, for several MoE settings.
With a folder argument, also saves a DeepSpeed checkpoint there and reloads it (MoE file layout).
Run: deepspeed --num_gpus 2 --module tests.dist.moe_invariant [CHECKPOINT_DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from pipeline.model import VLMoE
from pipeline.model.heads import ITCHead, ITMHead, MLMHead
from pipeline.objectives.pretrain import mask_tokens, vl_pretrain_losses
from tests.dist.common import batch, init_dist, tiny_cfg

B = 4
VARIANTS = [dict(), dict(top_k=2), dict(drop_tokens=False), dict(routing="shared", dispatch="deepspeed"),
            dict(use_residual=True, noisy_gate_policy="RSample")]
# per step: (rank 0 real text lengths, rank 1 real text lengths)
STEPS = [([8, 8, 8, 8], [0, 0, 0, 0]), ([1, 2, 3, 8], [8, 0, 5, 1]), ([0, 0, 0, 0], [2, 2, 2, 2]),
         ([0, 0, 0, 0], [0, 0, 0, 0])]  # last: no real text token anywhere (capacity 0 without dropping)
WEIGHTS = {"itc": 1.0, "itm": 1.0, "mlm": 1.0}


class Pretrainer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.model = VLMoE(cfg)
        self.heads = nn.ModuleDict({"itc": ITCHead(32), "itm": ITMHead(32),
                                    "mlm": MLMHead(self.model.token_embedding)})
        self.aux_coef = cfg.moe.aux_loss_coef

    def forward(self, data):
        self.model.moe_stats.reset()
        out = vl_pretrain_losses(self.model, self.heads, data, WEIGHTS)
        return out["loss"] + self.aux_coef * self.model.moe_stats.aux_loss(), out


def engine_for(variant: dict):
    torch.manual_seed(0)
    module = Pretrainer(tiny_cfg(ep_size=2, **variant))
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": [p for p in module.parameters()], "name": "all"})
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True},
              "bf16": {"enabled": True}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    return engine


def rank_batch(rank: int, step: int, lengths: list[int]) -> dict[str, torch.Tensor]:
    data = batch(B, seed=100 * step + rank, real_lengths=lengths)
    g = torch.Generator().manual_seed(7 + rank + step)
    data["mlm_input_ids"], data["mlm_labels"] = mask_tokens(
        data["input_ids"], data["attention_mask"], [0, 1, 2, 3, 4], 4, 60, prob=0.3 + 0.3 * rank, generator=g)
    return data


def check_checkpoint(engine, variant: dict, folder: Path, rank: int) -> None:
    """DeepSpeed's MoE checkpoint layout works with our modules: per-expert files, exact reload."""
    engine.save_checkpoint(str(folder), tag="t")
    dist.barrier()  # each rank writes its own experts' files
    names = {p.name for p in (folder / "t").iterdir()}
    assert "layer_0_expert_3_mp_rank_00_model_states.pt" in names, sorted(names)
    fresh = engine_for(variant)
    torch.manual_seed(123)
    fresh.load_checkpoint(str(folder), tag="t", load_optimizer_states=True)
    for (name, a), b in zip(engine.module.named_parameters(), fresh.module.parameters()):
        assert torch.equal(a, b), name


def main() -> None:
    rank, world = init_dist()
    assert world == 2
    folders = [a for a in sys.argv[1:] if not a.startswith("--")]  # the launcher adds --local_rank=N
    checkpoint_dir = Path(folders[0]) if folders else None
    for index, variant in enumerate(VARIANTS):
        engine = engine_for(variant)
        for step, lengths in enumerate(STEPS):
            loss, out = engine(rank_batch(rank, step, lengths[rank]))
            engine.backward(loss)
            engine.step()
            assert torch.isfinite(loss), (variant, step, out["terms"])
        engine.eval()
        with torch.no_grad():
            data = rank_batch(rank, 9, STEPS[0][rank])
            text = engine.module.model.encode_text(data["input_ids"], data["attention_mask"])
            fused = engine.module.model.fuse(data["pixel_values"], data["input_ids"], data["attention_mask"])
            assert torch.isfinite(text.hidden.float()).all() and torch.isfinite(fused.hidden.float()).all()
        if index == 0 and checkpoint_dir is not None:
            check_checkpoint(engine, variant, checkpoint_dir, rank)
        dist.barrier()
        print(f"rank {rank}: no crash, no hang for {variant or 'defaults'}", flush=True)
    print(f"rank {rank}: INVARIANT_OK", flush=True)


if __name__ == "__main__":
    from pipeline.run.distributed import shutdown_distributed

    main()
    shutdown_distributed()  # as pipeline.train does: no gloo abort (exit 250) at teardown
