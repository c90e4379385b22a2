"""VLMoE shapes, modes, masks, aux loss / expert counts, config validation."""
import pytest
import torch

from pipeline.config_utils import ConfigError, from_dict
from pipeline.model import EncoderOutput, ModelConfig, MoEConfig, VLMoE

TINY = dict(hidden_size=32, num_layers=4, num_heads=2, image_size=16, patch_size=8, vocab_size=50,
            max_text_len=8, num_fusion_layers=1)


def tiny(**moe) -> ModelConfig:
    return ModelConfig(**TINY, moe=MoEConfig(**{"num_experts": 4, "min_capacity": 1, **moe}))


def inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(b, 3, 16, 16, generator=g)
    ids = torch.randint(5, 50, (b, 8), generator=g)
    mask = torch.ones(b, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2] = 0  # a fully padded text
    return pixels, ids, mask


def test_modes_shapes_and_counts():
    torch.manual_seed(0)
    model = VLMoE(tiny())
    pixels, ids, mask = inputs()
    stats = model.moe_stats
    img, img_aux = model.encode_image(pixels), stats.aux_loss()
    stats.reset()
    txt = model.encode_text(ids, mask)
    txt_counts, txt_aux = dict(stats.routed), stats.aux_loss()
    stats.reset()
    joint = model.fuse(pixels, ids, mask)
    joint_counts, joint_aux = dict(stats.routed), stats.aux_loss()
    assert isinstance(img, EncoderOutput)
    assert img.hidden.shape == (3, 5, 32) and img.num_image_tokens == 5 and img.cls.shape == (3, 32)
    assert txt.hidden.shape == (3, 8, 32) and txt.num_image_tokens == 0
    assert joint.hidden.shape == (3, 13, 32) and joint.spans == {"image": (0, 5), "text": (5, 13)}
    # MoE blocks 1 and 3; block 3 is the fusion block: the joint pass uses the shared VL-FFN there.
    assert set(joint_counts) == set(stats.kept) == {"layer1/image", "layer1/text", "layer3/vl"}
    assert set(txt_counts) == {"layer1/text", "layer3/text"}
    # top-1 with used_token: padding is never routed
    assert int(txt_counts["layer1/text"].sum()) == int(mask.sum())
    assert int(joint_counts["layer3/vl"].sum()) == 3 * 5 + int(mask.sum())
    for out, aux in ((img, img_aux), (txt, txt_aux), (joint, joint_aux)):
        assert torch.isfinite(out.hidden).all() and aux.dim() == 0 and aux > 0


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = VLMoE(tiny(drop_tokens=False)).eval()
    pixels, ids, mask = inputs()
    out = model.encode_text(ids, mask)
    ids2 = ids.clone()
    ids2[1, 5:] = 7  # change only padded positions
    out2 = model.encode_text(ids2, mask)
    torch.testing.assert_close(out.hidden[1, :5], out2.hidden[1, :5])


def test_causal_text_ignores_future_tokens():
    torch.manual_seed(0)
    model = VLMoE(tiny(every=0)).eval()
    pixels, ids, mask = inputs()
    mask = torch.ones_like(mask)
    ids2 = ids.clone()
    ids2[:, 4:] = 9
    a = model.fuse(pixels, ids, mask, causal=True)
    b = model.fuse(pixels, ids2, mask, causal=True)
    torch.testing.assert_close(a.hidden[:, :5 + 4], b.hidden[:, :5 + 4])
    assert not torch.allclose(a.hidden[:, 10:], b.hidden[:, 10:])


def test_shared_routing_uses_one_pool():
    model = VLMoE(tiny(routing="shared"))
    pixels, ids, mask = inputs()
    model.fuse(pixels, ids, mask)
    assert set(model.moe_stats.routed) == set(model.moe_stats.kept) == {"layer1/shared", "layer3/shared"}
    assert "shared" in dict(model.blocks[1].ffn.named_children())


def test_dense_baseline_has_no_moe():
    model = VLMoE(tiny(every=0))
    model.fuse(*inputs())
    assert model.moe_stats.routed == {} and float(model.moe_stats.aux_loss()) == 0.0
    assert not model.sparse_ffns()


def test_experts_initialised_independently():
    model = VLMoE(tiny())
    experts = model.blocks[1].ffn["image"].experts
    assert not torch.equal(experts[0].fc1.weight, experts[1].fc1.weight)


def test_config_validation_and_from_dict():
    cfg = from_dict(ModelConfig, {"hidden_size": 64, "num_heads": 4, "moe": {"num_experts": 8, "top_k": 2}})
    assert cfg.moe.num_experts == 8 and cfg.moe_layers == [1, 3, 5]
    assert ModelConfig(moe=MoEConfig(layers=[0, 2])).moe_layers == [0, 2]
    for bad in ({"moe": {"top_k": 3}}, {"moe": {"num_experts": 6, "ep_size": 4}}, {"hidden_size": 100},
                {"moe": {"bogus": 1}}, {"modalities": ["image", "smell"]}, {"moe": {"layers": [9]}}):
        with pytest.raises(ConfigError):
            from_dict(ModelConfig, bad)


def test_kept_counts_show_capacity_drops():
    torch.manual_seed(0)
    model = VLMoE(tiny(capacity_factor=0.25, min_capacity=1))
    model.encode_image(torch.randn(4, 3, 16, 16))
    for key in ("layer1/image", "layer3/image"):
        routed, kept = model.moe_stats.routed[key], model.moe_stats.kept[key]
        assert (kept <= routed).all() and kept.sum() < routed.sum()


def test_init_is_seeded_and_experts_differ_across_ffns():
    torch.manual_seed(3)
    a = VLMoE(tiny())
    torch.manual_seed(3)
    b = VLMoE(tiny())
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    image, text = a.blocks[1].ffn["image"].experts, a.blocks[1].ffn["text"].experts
    assert not torch.equal(image[3].fc2.weight, text[3].fc2.weight)
    assert image[3].fc2.weight.detach().std() > 0.01 and not image[3].fc2.bias.detach().any()


def test_other_image_sizes_interpolate_positions():
    from pipeline.model.embeddings import resize_positions
    model = VLMoE(tiny())
    out = model.encode_image(torch.randn(2, 3, 32, 32))  # learned for 16 (2x2 grid), used at 4x4
    assert out.hidden.shape == (2, 17, 32)
    pos = model.embeddings["image"].position
    assert resize_positions(pos, 2) is pos
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.encode_image(torch.randn(2, 3, 20, 20))


def test_dense_vl_ffn_option():
    model = VLMoE(tiny(sparse_vl_ffn=False))
    model.fuse(*inputs())
    assert set(model.moe_stats.routed) == {"layer1/image", "layer1/text"}
    # layer 3 fuses through a dense VL-FFN
    model.encode_text(*inputs()[1:])
    assert "layer3/text" in model.moe_stats.routed


def test_mean_pooling_averages_valid_tokens_only():
    torch.manual_seed(0)
    cls_model = VLMoE(tiny(drop_tokens=False)).eval()
    moe = MoEConfig(num_experts=4, min_capacity=1, drop_tokens=False)
    model = VLMoE(ModelConfig(**{**TINY, "pooling": "mean"}, moe=moe)).eval()
    model.load_state_dict(cls_model.state_dict())
    pixels, ids, mask = inputs()
    out = model.fuse(pixels, ids, mask)
    valid = out.token_mask.float()[..., None]
    assert torch.allclose(out.pooled, (out.hidden * valid).sum(1) / valid.sum(1), atol=1e-6)
    assert not torch.allclose(out.pooled, out.cls)
    cls_out = cls_model.fuse(pixels, ids, mask)
    assert torch.equal(cls_out.pooled, cls_out.cls)
    # what sits in padded text positions never reaches the pooled vector
    other = ids.clone()
    other[mask == 0] = 7
    assert torch.allclose(model.fuse(pixels, other, mask).pooled, out.pooled, atol=1e-5)
    with pytest.raises(ValueError):
        from_dict(ModelConfig, {**TINY, "pooling": "max"})


@pytest.mark.parametrize("patch_embed", ["linear", "conv_stem"])
def test_coord_channels_put_location_into_the_patch_tokens(patch_embed):
    from pipeline.model.embeddings import with_coordinates
    planes = with_coordinates(torch.zeros(1, 3, 4, 4))[0, 3:]
    assert planes.shape == (2, 4, 4)
    assert planes[0, :, 0].eq(-1).all() and planes[0, :, -1].eq(1).all()  # x: left -> right
    assert planes[1, 0].eq(-1).all() and planes[1, -1].eq(1).all()  # y: top -> bottom
    torch.manual_seed(0)
    flat = torch.zeros(1, 3, 16, 16)  # a blank image: only the coordinates can tell patches apart
    for coords in (False, True):
        cfg = ModelConfig(**{**TINY, "patch_embed": patch_embed, "coord_channels": coords}, moe=MoEConfig(every=0))
        model = VLMoE(cfg).eval()
        emb = model.embeddings["image"]
        first = next(m for m in emb.patch.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.in_channels == (5 if coords else 3)
        with torch.no_grad():
            emb.position.zero_()
            tokens = emb(flat)[0][0, 1:]  # [P, D] patch tokens, position embeddings zeroed
        spread = (tokens - tokens.mean(0)).abs().max()
        assert (spread > 1e-5) if coords else (spread < 1e-7), (coords, float(spread))
        # another resolution still works (positions interpolated, coordinates recomputed)
        assert model.encode_image(torch.randn(2, 3, 32, 32)).hidden.shape == (2, 17, 32)


def test_conv_stem_trains_with_bf16_parameters_and_fp32_batchnorm_buffers():
    """What DeepSpeed's bf16 engine leaves: parameters cast, buffers kept fp32 (the CPU BatchNorm kernel
    rejects that mix); the stem must run forward and backward and keep updating its fp32 statistics."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "patch_embed": "conv_stem", "coord_channels": True}, moe=MoEConfig(every=0))
    model = VLMoE(cfg)
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    bn = next(m for m in model.embeddings["image"].patch if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.running_mean.dtype == torch.float32 and bn.weight.dtype == torch.bfloat16
    before = bn.running_mean.clone()
    out = model.encode_image(torch.randn(2, 3, 16, 16).bfloat16())
    assert out.hidden.dtype == torch.bfloat16
    (out.pooled.float() * torch.randn(out.pooled.shape)).sum().backward()
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    assert bn.running_mean.dtype == torch.float32 and not torch.equal(bn.running_mean, before)
    assert int(bn.num_batches_tracked) == 1
    # fp32 is plain nn.BatchNorm2d: same output as the stock module with the same state
    ref = torch.nn.BatchNorm2d(4).eval()
    ours = type(bn)(4).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(ours(x), ref(x))


def test_conv_stem_patch_embedding():
    cfg = ModelConfig(**{**TINY, "patch_embed": "conv_stem"}, moe=MoEConfig(num_experts=4, min_capacity=1))
    model = VLMoE(cfg)
    convs = [m for m in model.embeddings["image"].patch if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((3, 3), (2, 2))] * 3 + [((1, 1), (1, 1))]
    pixels, ids, mask = inputs()
    out = model.fuse(pixels, ids, mask)
    assert out.hidden.shape == (3, 5 + 8, 32)
    (out.pooled * torch.randn_like(out.pooled)).sum().backward()  # a plain sum of LayerNorm outputs has no gradient
    assert convs[0].weight.grad is not None and convs[0].weight.grad.abs().sum() > 0
    # 32x32 images: the same stem gives a 4x4 grid (positions interpolated)
    assert model.encode_image(torch.randn(2, 3, 32, 32)).hidden.shape == (2, 17, 32)
    with pytest.raises(ValueError, match="power of 2"):
        ModelConfig(**{**TINY, "patch_size": 6, "image_size": 18, "patch_embed": "conv_stem"})


def test_qk_norm_makes_attention_independent_of_query_key_scale():
    """With qk_norm the logits depend on the direction of each head's q and k, not their size: scaling the
    q and k projections changes nothing. Without it the same scaling sharpens the attention."""
    from pipeline.model.blocks import Attention
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32)
    for qk_norm in (False, True):
        attn = Attention(ModelConfig(**{**TINY, "qk_norm": qk_norm}, moe=MoEConfig(every=0))).eval()
        assert hasattr(attn, "q_norm") == qk_norm
        with torch.no_grad():
            before = attn(x, None)
            attn.qkv.weight[:64] *= 30.0  # rows of q and k (D=32 each); v untouched
            attn.qkv.bias[:64] *= 30.0
            change = float((attn(x, None) - before).abs().max())
        assert (change < 1e-4) if qk_norm else (change > 1e-2), (qk_norm, change)
    cfg = ModelConfig(**{**TINY, "qk_norm": True}, moe=MoEConfig(every=0))
    keys = VLMoE(cfg).state_dict()
    assert {"blocks.0.attn.q_norm.weight", "blocks.3.attn.k_norm.bias"} <= set(keys)
