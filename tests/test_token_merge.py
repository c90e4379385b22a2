"""Token merging (``model.token_merge``, ToMe): the size-weighted bipartite merge on a hand case, fixed token
counts whatever the data (shapes and MoE calls), identical patches merge without loss (proportional attention),
r = 0 is no merge, CLS / text / audio untouched, cached decoding == recomputing, config errors, FLOPs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.model import ModelConfig, VLMoE
from pipeline.model.accounting import count_parameters
from pipeline.model.generation import DecodeOptions, dropless, generate
from pipeline.model.heads import MLMHead
from pipeline.model.token_merge import bipartite_merge

TINY = dict(hidden_size=32, num_layers=4, num_heads=2, image_size=32, patch_size=8, vocab_size=50,
            max_text_len=12, num_fusion_layers=1, init_std=0.2)


def model_of(seed: int = 0, **over) -> VLMoE:
    torch.manual_seed(seed)
    moe = {"num_experts": 4, "min_capacity": 1, "drop_tokens": False, **over.pop("moe", {})}
    return VLMoE(ModelConfig(**{**TINY, **over}, moe=moe)).eval()


def text(b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (b, 6), generator=g)
    mask = torch.ones(b, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return ids, mask


def test_bipartite_merge_is_the_size_weighted_average_of_the_most_similar_pair():
    # patches in order a0 z0 a1 z1: a0 ~ z0 (cosine ~1), a1's best edge (to z0) is ~0.05
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [-1.0, 0.0]]])
    size = torch.tensor([[1.0, 2.0, 3.0, 1.0]])
    merged, new_size = bipartite_merge(x, size, 1)
    expected = torch.tensor([[[0.0, 1.0], [(1 + 2) / 3, 0.1 / 3], [-1.0, 0.0]]])  # kept a1, then z0 (+a0), z1
    torch.testing.assert_close(merged, expected)
    assert new_size.tolist() == [[3.0, 3.0, 1.0]]
    capped, capped_size = bipartite_merge(x, size, 5)  # at most half: every a token into a z token
    assert capped.shape == (1, 2, 2) and capped_size.sum() == size.sum()


def test_token_counts_and_moe_calls_are_fixed_whatever_the_data_and_routing_counts_merged_tokens():
    model = model_of(token_merge=2)  # 16 patches; merges after blocks 0, 1, 2: 16 -> 14 -> 12 -> 10
    model.train()
    calls: list[tuple[str, tuple[int, ...]]] = []
    for name, ffn in model.sparse_ffns().items():
        ffn.register_forward_pre_hook(lambda m, args, name=name: calls.append((name, tuple(args[0].shape))))
    ids, mask = text()
    shapes, routed = [], []
    for pixels in (torch.randn(2, 3, 32, 32), torch.zeros(2, 3, 32, 32)):  # random / uniform: other merges
        calls.clear()
        model.moe_stats.reset()
        out = model.fuse(pixels, ids, mask)
        shapes.append((out.hidden.shape, out.spans, out.num_image_tokens, list(calls)))
        routed.append({k: int(v.sum()) for k, v in model.moe_stats.routed.items()})
        (out.pooled.square().sum() + model.moe_stats.aux_loss()).backward()
        assert model.embeddings["image"].patch.weight.grad.abs().sum() > 0
    assert shapes[0] == shapes[1]
    assert shapes[0][1] == {"image": (0, 11), "text": (11, 17)} and shapes[0][2] == 11
    # MoE blocks 1 (after one merge: 1 + 14 image tokens) and 3 (fusion, after three: 1 + 10, with the text)
    assert routed[0] == routed[1] == {"layer1/image": 2 * 15, "layer1/text": int(mask.sum()),
                                      "layer3/vl": 2 * 11 + int(mask.sum())}
    assert dict(shapes[0][3]) == {"blocks.1.ffn.image": (30, 32), "blocks.1.ffn.text": (12, 32),
                                  "blocks.3.ffn.vl": (34, 32)}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_merging_identical_patches_loses_nothing_with_proportional_attention(pooling):
    """A uniform image without position embeddings: every patch token is the same in every block, so merged
    tokens of size s must act as s copies: CLS, text, pooled and the image tokens equal the unmerged pass."""
    outs = {}
    for r, proportional in ((0, True), (3, True), (3, False)):
        model = model_of(token_merge=r, token_merge_proportional=proportional, pooling=pooling)
        with torch.no_grad():
            model.embeddings["image"].position.zero_()
            ids, mask = text()
            outs[r, proportional] = model.fuse(torch.full((2, 3, 32, 32), 0.3), ids, mask)
    full, merged, plain = outs[0, True], outs[3, True], outs[3, False]
    assert merged.num_image_tokens == 1 + 16 - 9 and merged.token_sizes[:, :merged.num_image_tokens].sum(1).eq(17).all()
    n_img = merged.num_image_tokens
    torch.testing.assert_close(merged.hidden[:, 0], full.hidden[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.hidden[:, n_img:], full.hidden[:, 17:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.pooled, full.pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.hidden[:, 1:n_img], full.hidden[:, 1:2].expand(-1, n_img - 1, -1),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain.hidden[:, 0], full.hidden[:, 0], atol=1e-4)  # without it, merged tokens weigh less


def test_r0_is_no_merge_and_text_and_audio_passes_are_untouched():
    ids, mask = text()
    pixels = torch.randn(2, 3, 32, 32)
    base = model_of()
    off = model_of(token_merge=0, token_merge_layers=[0, 1])
    on = model_of(token_merge=4)
    with torch.no_grad():
        a, b = base.fuse(pixels, ids, mask), off.fuse(pixels, ids, mask)
        assert torch.equal(a.hidden, b.hidden) and b.token_sizes is None
        text_only = [m.encode_text(ids, mask) for m in (base, on)]
        assert torch.equal(text_only[0].hidden, text_only[1].hidden) and text_only[1].token_sizes is None
        fused = on.fuse(pixels, ids, mask)
    sizes = fused.token_sizes
    assert sizes[:, 0].eq(1).all() and sizes[:, fused.spans["text"][0]:].eq(1).all()  # CLS and text: never merged
    assert sizes[:, 1:fused.num_image_tokens].gt(1).any()
    torch.testing.assert_close(fused.token_mask[:, fused.spans["text"][0]:], mask.bool())


def test_summary_tokens_are_never_merged():
    """The image's CLS and summary tokens keep size 1 and their place; the patches after them hold all 16."""
    ids, mask = text()
    model = model_of(token_merge=4, summary_tokens=2)
    with torch.no_grad():
        out = model.fuse(torch.randn(2, 3, 32, 32), ids, mask)
    n_img = out.num_image_tokens
    assert n_img < 3 + 16 and out.token_sizes[:, :3].eq(1).all()
    assert out.token_sizes[:, 3:n_img].sum(1).eq(16).all() and out.token_sizes[:, 3:n_img].gt(1).any()


def test_audio_is_never_merged():
    model = model_of(token_merge=4, modalities=["image", "text", "audio"],
                     audio={"num_mel_bins": 16, "max_frames": 32, "patch_time": 8, "patch_freq": 8,
                            "stride_time": 8, "stride_freq": 8})
    frames = torch.randn(2, 32, 16)
    with torch.no_grad():
        out = model.encode({"image": (torch.randn(2, 3, 32, 32),), "audio": (frames, torch.tensor([32, 16]))})
        alone = model.encode({"audio": (frames, torch.tensor([32, 16]))})
    audio_tokens = 1 + 2 * 4
    assert out.spans == {"image": (0, 17 - 12), "audio": (5, 5 + audio_tokens)}
    assert out.token_mask[1, 5:].sum() == 1 + 2 * 2 and out.token_sizes[:, 5:].eq(1).all()
    assert alone.hidden.shape[1] == audio_tokens


def tiny_lm(seed: int = 0, **over) -> tuple[VLMoE, MLMHead]:
    model = model_of(seed, vocab_size=40, max_text_len=20, hidden_size=48, num_heads=4,
                     moe={"drop_tokens": True, "min_capacity": 4}, **over)
    head = MLMHead(model.token_embedding).eval()
    with torch.no_grad():
        head.bias[2] = 0.5
        head.bias[0] = -1e4
    return model, head


@pytest.mark.parametrize("beams,bidirectional,proportional", [(3, True, True), (1, False, False)])
def test_cached_decoding_with_merging_gives_the_tokens_of_recomputing(beams, bidirectional, proportional):
    model, head = tiny_lm(token_merge=3, token_merge_proportional=proportional)
    ids = torch.tensor([[1, 5, 7, 9], [1, 0, 0, 0], [1, 11, 0, 0], [1, 3, 4, 0]])
    mask = (torch.arange(4)[None] < torch.tensor([4, 1, 2, 3])[:, None]).long()
    torch.manual_seed(1)
    pixels = torch.randn(4, 3, 32, 32)
    runs = [generate(model, head, {"image": (pixels,)}, ids, mask, eos_token_id=2, pad_token_id=0,
                     options=DecodeOptions(num_beams=beams, max_new_tokens=6, use_cache=cache),
                     prompt_bidirectional=bidirectional) for cache in (True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].lengths, runs[1].lengths)
    torch.testing.assert_close(runs[0].scores, runs[1].scores, rtol=1e-4, atol=1e-4)
    cache = model.new_cache()
    with torch.no_grad(), dropless(model):
        model.encode({"image": (pixels,), "text": (ids, mask)}, causal=True, cache=cache)
    assert sorted(cache.merged) == [1, 2, 3] and len({id(k) for k in cache.merged.values()}) == 3
    assert [cache.layers[i].k_bhmk.shape[2] for i in range(4)] == [21, 18, 15, 12]


def test_config_errors_name_the_fields():
    side = ModelConfig(**TINY).image_size
    assert "token_merge (9) after block 0: only 16 image patches" in ModelConfig(**TINY, token_merge=9) \
        .token_merge_problem(side)
    # 16 -> 11 -> 6: a third merge of 5 would take more than half
    assert "token_merge (5) after block 2: only 6" in ModelConfig(**TINY, token_merge=5).token_merge_problem(side)
    assert ModelConfig(**TINY, token_merge=9).token_merge_problem(2 * side) is None  # 64 patches fit
    with pytest.raises(ValueError, match="token_merge_layers \\[3\\]"):
        ModelConfig(**TINY, token_merge=1, token_merge_layers=[0, 3])
    with pytest.raises(ValueError, match="needs at least one block"):
        ModelConfig(**TINY, token_merge=1, token_merge_layers=[])
    with pytest.raises(ValueError, match="attention: local in blocks \\[2, 3\\]"):
        ModelConfig(**TINY, token_merge=2, token_merge_layers=[1], attention="local", attention_window=2)
    with pytest.raises(ValueError, match="token_merge must be >= 0"):
        ModelConfig(**TINY, token_merge=-1)


def test_local_blocks_before_the_first_merge_run_their_windows():
    """Local blocks 0-1, merges after 1 and 2: a window covering the 4 x 4 grid is dense attention, so the
    merged pass must equal the dense model's with the same merges (the windows apply before the merge only)."""
    model = model_of(token_merge=2, token_merge_layers=[1, 2], attention="local", attention_window=4,
                     attention_global_layers=[2, 3])
    dense = VLMoE(dataclasses.replace(model.cfg, attention="dense")).eval()
    dense.load_state_dict(model.state_dict())
    ids, mask = text()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, ref = model.fuse(pixels, ids, mask, causal=True), dense.fuse(pixels, ids, mask, causal=True)
    assert out.hidden.shape == (2, 17 - 4 + 6, 32)
    torch.testing.assert_close(out.hidden, ref.hidden, rtol=1e-5, atol=1e-5)


def test_flops_count_the_merged_tokens():
    over = dict(TINY, moe={"every": 0})  # dense FFNs: per block 24 n d^2 + 4 n^2 d (qkv, proj, fc1, fc2; QK, AV)
    d = TINY["hidden_size"]
    base = count_parameters(ModelConfig(**over), passes={"image": 1}).forward_flops_per_sample
    merged = count_parameters(ModelConfig(**over, token_merge=3), passes={"image": 1}).forward_flops_per_sample

    def block(n: int) -> int:
        return 24 * n * d * d + 4 * n * n * d
    tokens = [17, 14, 11, 8]  # 16 patches - 3 after blocks 0, 1, 2, plus the CLS
    matching = sum(2 * ((p + 1) // 2) * (p // 2) * d for p in (16, 13, 10))
    expected = sum(block(n) for n in tokens) + matching - 4 * block(17)
    assert merged - base == expected and merged < base


def test_routing_pictures_record_the_unmerged_pass_and_leave_merging_on():
    from pipeline.routing_pictures import RoutingRecorder

    model = model_of(token_merge=4)
    ids, mask = text()
    calls, spans = RoutingRecorder(model).run({"image": (torch.randn(2, 3, 32, 32),), "text": (ids, mask)})
    assert spans == {"image": (0, 17), "text": (17, 23)}  # every image token is one patch of the grid
    assert {c.name: c.expert_bn.shape for c in calls}["layer3/vl"] == (2, 23)
    assert model.cfg.token_merge == 4
    with torch.no_grad():
        assert model.fuse(torch.randn(2, 3, 32, 32), ids, mask).spans["image"] == (0, 17 - 12)
