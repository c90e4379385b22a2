"""Rank-side check: EP=2 on 2 ranks == EP=1 on the same global batch with the same weights.

Each rank builds the EP=1 reference (all experts) from one seed and runs it on the whole global batch;
then the EP=2 model (experts 2r, 2r+1 on rank r) gets the same weights and runs on the rank's half.
Compared: fused hidden states, expert counts (summed over ranks), ITC (global negatives) + hidden-state
loss, and the gradients of every parameter (dense ones averaged over ranks, experts from their owner).
Run: deepspeed --num_gpus 2 --module tests.dist.moe_ep_equivalence
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

from pipeline.model import VLMoE
from pipeline.model.heads import ITCHead
from pipeline.objectives.pretrain import itc_loss
from tests.dist.common import batch, init_dist, setup_expert_parallel, tiny_cfg

B = 3  # per rank
VARIANTS = [dict(top_k=1, drop_tokens=False), dict(top_k=1, capacity_factor=8.0),
            dict(top_k=2, drop_tokens=False, top2_2nd_expert_sampling=False),
            dict(top_k=1, drop_tokens=False, routing="shared", dispatch="deepspeed")]


def losses(model, head, data, group):
    """(fused output, its MoE counts, per-sample-mean losses: the mean over ranks equals the reference's
    global mean)."""
    model.moe_stats.reset()
    fused = model.fuse(data["pixel_values"], data["input_ids"], data["attention_mask"])
    counts = {**model.moe_stats.routed, **{f"{key}/kept": kept for key, kept in model.moe_stats.kept.items()}}
    image, text = model.encode_image(data["pixel_values"]), model.encode_text(data["input_ids"],
                                                                             data["attention_mask"])
    itc = itc_loss(*head(image.cls, text.cls), group=group)
    hidden_loss = (fused.hidden.square() * fused.token_mask[..., None]).mean((1, 2)).mean()
    return fused, counts, itc.loss + hidden_loss


def ep_key(key: str, rank: int, local: int) -> str:
    """Reference (EP=1) key of an EP=2 parameter: local expert j on rank r is global expert r*local+j."""
    return re.sub(r"deepspeed_experts\.(\d+)\.", lambda m: f"deepspeed_experts.{rank * local + int(m.group(1))}.",
                  key)


def check(variant: dict, rank: int, world: int, alone, reference=None, is_expert=None) -> None:
    """``alone``: a process group of this rank only, so the reference ITC communicates with nobody.
    ``reference(name, tensors)``: the EP=1 counterpart of the EP=``world`` tensor ``name`` in ``tensors`` (a
    state dict or gradients by name); ``is_expert(name)``: a parameter of this rank's own experts, whose
    gradient is not averaged over ranks. Defaults: gshard's per-expert modules (local expert j on rank r is
    global expert r*local+j); tests.dist.moe_dropless passes the fused tensors' row slices."""
    if reference is None:
        local = 4 // world
        reference = lambda name, tensors: tensors[ep_key(name, rank, local)]  # noqa: E731
        is_expert = lambda name: "deepspeed_experts" in name  # noqa: E731
    torch.manual_seed(0)
    ref, ref_head = VLMoE(tiny_cfg(ep_size=1, **variant)), ITCHead(32)
    torch.manual_seed(0)
    ep, ep_head = VLMoE(tiny_cfg(ep_size=world, **variant)), ITCHead(32)
    setup_expert_parallel(ep)
    ref_state = ref.state_dict()
    for key, value in ep.state_dict().items():  # same seed -> same model whatever the EP layout
        assert torch.equal(value, reference(key, ref_state)), key
    ep.load_state_dict({k: reference(k, ref_state) for k in ep.state_dict()})
    ep_head.load_state_dict(ref_head.state_dict())
    lengths = [8, 5, 1, 0, 3, 8]  # rank 1's texts: one fully padded, different real-token counts
    global_batch = batch(B * world, seed=1, real_lengths=lengths)
    mine = {k: v[rank * B:(rank + 1) * B] for k, v in global_batch.items()}

    ref_fused, ref_counts, ref_loss = losses(ref, ref_head, global_batch, alone)
    ref_loss.backward()
    ep_fused, ep_counts, ep_loss = losses(ep, ep_head, mine, None)
    (ep_loss / world).backward()

    torch.testing.assert_close(ep_fused.hidden, ref_fused.hidden[rank * B:(rank + 1) * B], atol=1e-5, rtol=1e-4)
    total_loss = ep_loss.detach().clone()
    dist.all_reduce(total_loss)
    torch.testing.assert_close(total_loss / world, ref_loss.detach(), atol=1e-5, rtol=1e-5)
    assert set(ep_counts) == set(ref_counts) and ep_counts
    for key, count in ep_counts.items():
        summed = count.clone()
        dist.all_reduce(summed)
        assert torch.equal(summed, ref_counts[key]), (key, summed, ref_counts[key])
    ref_grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in ref.named_parameters()}
    for name, param in ep.named_parameters():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        if not is_expert(name):
            grad = grad.clone()
            dist.all_reduce(grad)
        torch.testing.assert_close(grad, reference(name, ref_grads), atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{variant} {name}: {m}")
    for name, param in ep_head.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, dict(ref_head.named_parameters())[name].grad, atol=1e-5, rtol=1e-4)


def main() -> None:
    rank, world = init_dist()
    assert world == 2
    singletons = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    for variant in VARIANTS:
        check(variant, rank, world, singletons[rank])
        print(f"rank {rank}: EP={world} == EP=1 for {variant}", flush=True)
    dist.barrier()
    print(f"rank {rank}: EP_EQUIVALENCE_OK", flush=True)


if __name__ == "__main__":
    from pipeline.run.distributed import shutdown_distributed

    main()
    shutdown_distributed()  # as pipeline.train does: no gloo abort (exit 250) at teardown
