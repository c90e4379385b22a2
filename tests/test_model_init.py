"""Init from a saved transformers.ViTModel (oracle: equal hidden states), sparse upcycling (or not), BERT
embeddings (oracle: BERT's embedding sum before its LayerNorm), clear mismatch errors."""
import pytest
import torch
from transformers import BertConfig, BertModel, ViTConfig, ViTForImageClassification, ViTModel

from pipeline.model import ModelConfig, MoEConfig, VLMoE
from pipeline.model.pretrained import (PretrainedMismatch, init_from_vit, init_text_embeddings,
                                       load_upcycled)

VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=16,
           patch_size=4, layer_norm_eps=1e-6)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(**VIT)).eval()
    with torch.no_grad():  # non-trivial biases / norms so a wrong mapping cannot pass
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("vit")
    vit.save_pretrained(folder)
    return folder, vit


def our_cfg(**moe) -> ModelConfig:
    return ModelConfig(hidden_size=32, num_layers=3, num_heads=4, mlp_ratio=2, image_size=16, patch_size=4,
                       vocab_size=40, max_text_len=8, num_fusion_layers=1,
                       moe=MoEConfig(**{"min_capacity": 1, **moe}))


@pytest.mark.parametrize("moe", [dict(every=0), dict(every=1, num_experts=4, top_k=2, drop_tokens=False)],
                         ids=["dense", "upcycled_top2"])
def test_matches_vit_hidden_states(vit_dir, moe):
    folder, vit = vit_dir
    torch.manual_seed(1)
    model = VLMoE(our_cfg(**moe)).eval()
    fresh = init_from_vit(model, folder)
    assert any(k.startswith("embeddings.text.") for k in fresh)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = vit(pixel_values=pixels).last_hidden_state
        ours = model.encode_image(pixels).hidden
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_upcycled_experts_are_copies_and_text_ffn_copies_image(vit_dir):
    folder, _ = vit_dir
    model = VLMoE(our_cfg(every=1, num_experts=2))
    init_from_vit(model, folder)
    image_ffn, text_ffn = model.blocks[0].ffn["image"], model.blocks[0].ffn["text"]
    for ffn in (image_ffn, text_ffn):
        assert torch.equal(ffn.experts[0].fc1.weight, ffn.experts[1].fc1.weight)
    assert torch.equal(image_ffn.experts[0].fc2.bias, text_ffn.experts[1].fc2.bias)
    assert not torch.equal(image_ffn.router.weight, text_ffn.router.weight)  # routers fresh, independent


def test_without_upcycling_experts_keep_their_own_init(vit_dir):
    folder, vit = vit_dir
    torch.manual_seed(2)
    model = VLMoE(our_cfg(every=1, num_experts=2))
    init_from_vit(model, folder, upcycle=False)
    vit_fc1 = vit.layers[0].mlp.fc1.weight  # transformers 5 in-memory names
    experts = model.blocks[0].ffn["image"].experts
    assert not torch.equal(experts[0].fc1.weight, experts[1].fc1.weight)
    assert not torch.equal(experts[0].fc1.weight, vit_fc1)
    assert torch.equal(model.blocks[0].attn.proj.weight, vit.layers[0].attention.o_proj.weight)


def test_image_classification_checkpoint_gives_its_encoder(tmp_path, vit_dir):
    _, vit = vit_dir
    classifier = ViTForImageClassification(ViTConfig(**VIT, num_labels=3))
    classifier.vit.load_state_dict(vit.state_dict(), strict=False)  # ViTForImageClassification has no pooler
    classifier.save_pretrained(tmp_path / "cls")
    model = VLMoE(our_cfg(every=0))
    init_from_vit(model, tmp_path / "cls")  # the classifier head is not part of the encoder: ignored
    assert torch.equal(model.embeddings["image"].patch.weight, vit.embeddings.patch_embeddings.projection.weight)


def test_dense_model_upcycles_into_moe_model():
    torch.manual_seed(0)
    dense = VLMoE(our_cfg(every=0)).eval()
    sparse = VLMoE(our_cfg(every=1, num_experts=4, top_k=2, drop_tokens=False)).eval()
    load_upcycled(sparse, dense.state_dict())
    ids, mask = torch.randint(0, 40, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(sparse.fuse(pixels, ids, mask).hidden, dense.fuse(pixels, ids, mask).hidden)


def test_mismatches_are_named(vit_dir, tmp_path):
    folder, _ = vit_dir
    with pytest.raises(PretrainedMismatch, match="num_hidden_layers"):
        init_from_vit(VLMoE(ModelConfig(**{**our_cfg().__dict__, "num_layers": 2, "num_fusion_layers": 0})),
                      folder)
    dense = VLMoE(our_cfg(every=0)).state_dict()
    dense["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    dense["bogus.weight"] = torch.zeros(1)
    del dense["norm.bias"]
    with pytest.raises(PretrainedMismatch) as err:
        load_upcycled(VLMoE(our_cfg()), dense)
    text = str(err.value)
    assert "shape: blocks.0.attn.qkv.weight" in text and "unexpected: bogus.weight" in text
    assert "missing: norm.bias" in text
    stem = ModelConfig(**{**our_cfg(every=0).__dict__, "patch_embed": "conv_stem"})
    with pytest.raises(PretrainedMismatch, match="patch_embed='conv_stem'"):
        init_from_vit(VLMoE(stem), folder)
    coords = ModelConfig(**{**our_cfg(every=0).__dict__, "coord_channels": True})
    with pytest.raises(PretrainedMismatch, match="coord_channels"):
        init_from_vit(VLMoE(coords), folder)
    qk = ModelConfig(**{**our_cfg(every=0).__dict__, "qk_norm": True})
    with pytest.raises(PretrainedMismatch, match="qk_norm"):
        init_from_vit(VLMoE(qk), folder)


def tiny_bert(tmp_path, **cfg):
    torch.manual_seed(3)
    bert = BertModel(BertConfig(**{"vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 4, "intermediate_size": 64, **cfg})).eval()
    bert.save_pretrained(tmp_path / "bert")
    return bert


def test_bert_text_embeddings(tmp_path):
    bert = tiny_bert(tmp_path)
    model = VLMoE(our_cfg())
    init_text_embeddings(model, tmp_path / "bert", vocab_size=40)
    assert torch.equal(model.token_embedding.weight, bert.embeddings.word_embeddings.weight)
    with pytest.raises(PretrainedMismatch, match="vocab"):
        init_text_embeddings(model, tmp_path / "bert", vocab_size=41)


def test_bert_init_matches_bert_embeddings_before_their_layernorm(tmp_path):
    """What must match: BERT is post-LN, our blocks pre-LN, so no block output can; the residual stream
    entering our first block equals BERT's word + position + token-type-0 sum (the input of its embedding
    LayerNorm). Text of 8 tokens, the last 3 padding."""
    bert = tiny_bert(tmp_path)
    model = VLMoE(our_cfg()).eval()
    init_text_embeddings(model, tmp_path / "bert", vocab_size=40)
    seen = {}
    bert.embeddings.LayerNorm.register_forward_pre_hook(lambda m, args: seen.__setitem__("bert", args[0]))
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("ours", args[0]))
    ids = torch.randint(1, 40, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[:, 5:] = 0
    with torch.no_grad():
        bert(input_ids=ids, attention_mask=mask)
        model.encode_text(ids, mask)
    torch.testing.assert_close(seen["ours"], seen["bert"], atol=1e-6, rtol=1e-6)
    short = tmp_path / "short"
    tiny_bert(short, max_position_embeddings=4)  # fewer positions than max_text_len=8
    with pytest.raises(PretrainedMismatch, match="position embeddings"):
        init_text_embeddings(model, short / "bert", vocab_size=40)


def test_vit_of_another_resolution_gets_interpolated_positions(vit_dir):
    folder, vit = vit_dir
    cfg = ModelConfig(**{**our_cfg(every=0).__dict__, "image_size": 32})
    model = VLMoE(cfg)
    init_from_vit(model, folder)  # ViT positions: 4x4 grid; ours: 8x8
    assert model.embeddings["image"].position.shape == (1, 65, 32)
    torch.testing.assert_close(model.embeddings["image"].position[:, 0],
                               vit.embeddings.position_embeddings[:, 0].detach())
