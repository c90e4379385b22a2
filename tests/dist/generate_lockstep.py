"""Rank-side check: generation under expert parallelism (EP=2, a DeepSpeed ZeRO-2 engine, eval mode) steps in
lockstep, so a rank whose batch is finished keeps stepping on padding instead of leaving the other rank's MoE
all-to-alls unanswered.

Per MoE variant (top-1, top-2) and search (greedy, beam 2), each rank decodes its own 3 prompts three times:
  A  both ranks decode long (EOS suppressed): every sample runs to max_new_tokens;
  B  rank 0's sequences end at the first step EOS is allowed (EOS pushed up), rank 1 decodes long as in A;
  C  rank 0's longest prompt leaves one text position (max_new_tokens capped to 1), rank 1 as in A.
Asserted: B and C finish (a hang fails the test by its timeout, with every rank's stack), both ranks report the
same ``steps`` (rank 1's count), rank 0 returns its 1-token outputs, rank 1's tokens in B and C are those of A,
and every rank's outputs equal those of an EP=1 copy of the model (same weights) decoding the rank's batch alone.
Run: deepspeed --num_gpus 2 --module tests.dist.generate_lockstep
"""
from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from pipeline.model import ModelConfig, MoEConfig, VLMoE
from pipeline.model.generation import DecodeOptions, Generated, generate
from pipeline.model.heads import MLMHead
from tests.dist.common import TINY, init_dist
from tests.dist.moe_ep_equivalence import ep_key

B, MAX_LEN, MAX_NEW = 3, 16, 10  # prompts per rank, model.max_text_len, tokens generated at most
PAD, BOS, EOS = 0, 2, 3
VARIANTS = [dict(top_k=1), dict(top_k=2)]


class Captioner(nn.Module):
    def __init__(self, ep_size: int, moe: dict):
        super().__init__()
        cfg = ModelConfig(**{**TINY, "max_text_len": MAX_LEN},
                          moe=MoEConfig(num_experts=4, min_capacity=1, ep_size=ep_size, **moe))
        self.model = VLMoE(cfg)
        self.heads = nn.ModuleDict({"mlm": MLMHead(self.model.token_embedding)})


class EosBias(nn.Module):
    """The LM head with ``bias`` added to the EOS logit: -1e4 never ends, +1e4 ends as soon as allowed."""

    def __init__(self, head: nn.Module, bias: float):
        super().__init__()
        self.head, self.bias = head, bias

    def forward(self, hidden_md: torch.Tensor) -> torch.Tensor:
        logits_mv = self.head(hidden_md).clone()
        logits_mv[..., EOS] += self.bias
        return logits_mv


def engine_for(moe: dict):
    torch.manual_seed(0)
    module = Captioner(2, moe)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(module.parameters()), "name": "all"})
    config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(groups, lr=1e-3), config=config)
    engine.eval()
    return engine


def reference_for(moe: dict, engine, rank: int) -> Captioner:
    """EP=1 copy of the engine's model: same seed -> same weights (experts drawn in global order), checked."""
    torch.manual_seed(0)
    ref = Captioner(1, moe).eval()
    ref_state = ref.state_dict()
    for key, value in engine.module.state_dict().items():
        assert torch.equal(value, ref_state[ep_key(key, rank, 2)]), key
    return ref


def prompts(rank: int, seed: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels, ids, mask): right-padded prompts of ``lengths`` real tokens, BOS first."""
    g = torch.Generator().manual_seed(100 * seed + rank)
    width = max(lengths)
    ids = torch.randint(5, TINY["vocab_size"], (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.where(mask.bool(), ids, PAD)
    ids[:, 0] = BOS
    return torch.randn(len(lengths), 3, TINY["image_size"], TINY["image_size"], generator=g), ids, mask


def decode(model: Captioner, data, eos_bias: float, beams: int) -> Generated:
    pixels, ids, mask = data
    return generate(model.model, EosBias(model.heads["mlm"], eos_bias), {"image": (pixels,)}, ids, mask,
                    eos_token_id=EOS, pad_token_id=PAD,
                    options=DecodeOptions(num_beams=beams, max_new_tokens=MAX_NEW, min_new_tokens=1))


def same(a: Generated, b: Generated, what: str) -> None:
    assert torch.equal(a.tokens, b.tokens), (what, a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths), (what, a.lengths, b.lengths)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-3, msg=lambda m: f"{what}: {m}")


def check(moe: dict, beams: int, engine, ref: Captioner, rank: int) -> None:
    long_data = prompts(rank, 1, [1, 3, 2])
    room_data = prompts(rank, 2, [MAX_LEN - 1, 4, 1]) if rank == 0 else long_data  # rank 0: 1 position left
    runs = {"A": (long_data, -1e4), "B": (long_data, 1e4 if rank == 0 else -1e4), "C": (room_data, -1e4)}
    outs = {}
    for name, (data, bias) in runs.items():
        what = f"{moe} beams={beams} run {name} rank {rank}"
        outs[name] = out = decode(engine.module, data, bias, beams)
        steps = [None, None]
        dist.all_gather_object(steps, out.steps)
        assert steps[0] == steps[1] == MAX_NEW, (what, steps)  # rank 1 (long) sets the pace for both
        alone = decode(ref, data, bias, beams)  # EP=1, no collective: what this batch decodes to by itself
        same(out, alone, what)
        if rank == 0 and name in "BC":
            assert out.lengths.eq(1).all() and out.tokens.shape == (B, 1), (what, out.lengths, out.tokens)
        else:
            assert out.lengths.eq(MAX_NEW).all(), (what, out.lengths)
    if rank == 1:  # stepping in lockstep with a finished rank 0 changed nothing here
        same(outs["B"], outs["A"], f"{moe} beams={beams} rank 1 B vs A")
        same(outs["C"], outs["A"], f"{moe} beams={beams} rank 1 C vs A")


def main() -> None:
    rank, world = init_dist()
    assert world == 2
    for moe in VARIANTS:
        engine = engine_for(moe)
        ref = reference_for(moe, engine, rank)
        for beams in (1, 2):
            check(moe, beams, engine, ref, rank)
            print(f"rank {rank}: lockstep decoding ok for {moe}, beams={beams}", flush=True)
    dist.barrier()
    print(f"rank {rank}: LOCKSTEP_OK", flush=True)


if __name__ == "__main__":
    from pipeline.run.distributed import shutdown_distributed

    main()
    shutdown_distributed()  # as pipeline.train does: no gloo abort (exit 250) at teardown
