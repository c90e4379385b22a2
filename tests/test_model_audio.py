"""Audio in the model: log-mel features (oracle: transformers' ASTFeatureExtractor), the patch embedding and
its padding mask, audio FFNs / experts / shared pool / fusion, AST initialisation (oracle: ASTModel's
embeddings), accounting and config errors."""
import time
import types

import numpy as np
import pytest
import torch
from transformers import ASTConfig, ASTFeatureExtractor, ASTModel, ViTConfig, ViTModel

from pipeline.config_utils import ConfigError, from_dict
from pipeline.model import ModelConfig, MoEConfig, VLMoE
from pipeline.model.accounting import count_parameters
from pipeline.model.audio_features import log_mel
from pipeline.model.config import AudioConfig
from pipeline.model.init_recipe import apply_init, check_init
from pipeline.model.moe import MLP, SparseFFN
from pipeline.model.pretrained import init_from_vit
from pipeline.recipe import InitConfig

# 16 bands x 40 frames, 8x8 patches, time step 4 (overlapping, as AST): 2 x 9 patches + CLS
AUDIO = dict(num_mel_bins=16, max_frames=40, patch_time=8, patch_freq=8, stride_time=4, stride_freq=8)
AUDIO_TOKENS = 1 + 2 * 9


def tiny(modalities=("image", "text", "audio"), **moe) -> ModelConfig:
    return ModelConfig(hidden_size=32, num_layers=4, num_heads=2, image_size=16, patch_size=8, vocab_size=50,
                       max_text_len=8, num_fusion_layers=1, modalities=list(modalities), audio=AudioConfig(**AUDIO),
                       moe=MoEConfig(**{"num_experts": 4, "min_capacity": 1, "drop_tokens": False, **moe}))


def clip(seconds=4.0, rate=16000, seed=0):
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.05, t.shape)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32)


def features(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 40, 16, generator=g), torch.tensor([40, 21, 5])


@pytest.mark.parametrize("max_frames", [500, 100], ids=["padded", "cut"])
def test_log_mel_is_transformers_ast_extraction(max_frames):
    cfg = AudioConfig(num_mel_bins=64, max_frames=max_frames)
    wave = clip()
    start = time.perf_counter()
    ours, length = log_mel(wave, 16000, cfg)
    elapsed = time.perf_counter() - start
    extractor = ASTFeatureExtractor(num_mel_bins=64, max_length=max_frames, mean=cfg.mean, std=cfg.std)
    expected = extractor(wave, sampling_rate=16000, return_tensors="np")["input_values"][0]
    assert ours.shape == (max_frames, 64) and ours.dtype == np.float32
    assert length == min(1 + (len(wave) - 400) // 160, max_frames)  # 398 frames in 4 s
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)
    again, _ = log_mel(wave, 16000, cfg)
    assert again.tobytes() == ours.tobytes()
    assert elapsed < 1.0, f"log-mel of a 4 s clip took {elapsed:.3f} s"
    with pytest.raises(ValueError, match="44100 Hz; model.audio.sample_rate is 16000"):
        log_mel(wave, 44100, cfg)
    with pytest.raises(ValueError, match="shorter than one 400-sample frame"):
        log_mel(wave[:300], 16000, cfg)


def test_padding_patches_are_masked_from_attention_and_capacity():
    torch.manual_seed(0)
    model = VLMoE(tiny()).eval()
    feats, lengths = features()
    with torch.no_grad():
        out = model.encode_audio(feats, lengths)
        routed = int(model.moe_stats.routed["layer1/audio"].sum())
        changed = feats.clone()
        for i, n in enumerate(lengths.tolist()):
            changed[i, n:] = 100.0  # only frames past each clip's length
        out2 = model.encode_audio(changed, lengths)
    # time patches start every 4 frames: length 21 keeps starts 0..20 (6 per frequency row), 5 keeps 0 and 4
    assert out.token_mask.sum(1).tolist() == [AUDIO_TOKENS, 1 + 2 * 6, 1 + 2 * 2]
    assert routed == int(out.token_mask.sum())  # top-1: padding takes no expert capacity
    torch.testing.assert_close(out.hidden[out.token_mask], out2.hidden[out2.token_mask])
    torch.testing.assert_close(out.pooled, out2.pooled)
    with pytest.raises(ValueError, match="audio.num_mel_bins=16"):
        model.encode_audio(torch.randn(2, 40, 12))


def test_audio_ffns_experts_and_fusion():
    torch.manual_seed(0)
    model = VLMoE(tiny())
    assert isinstance(model.blocks[0].ffn["audio"], MLP) and isinstance(model.blocks[1].ffn["audio"], SparseFFN)
    feats, lengths = features()
    ids, mask = torch.randint(5, 50, (3, 8)), torch.ones(3, 8, dtype=torch.long)
    stats = model.moe_stats
    out = model.encode_audio(feats, lengths)
    assert out.hidden.shape == (3, AUDIO_TOKENS, 32) and out.spans == {"audio": (0, AUDIO_TOKENS)}
    assert set(stats.routed) == {"layer1/audio", "layer3/audio"}
    stats.reset()
    joint = model.encode({"audio": (feats, lengths), "text": (ids, mask)})
    assert joint.spans == {"text": (0, 8), "audio": (8, 8 + AUDIO_TOKENS)}  # cfg.modalities order
    assert set(stats.routed) == {"layer1/text", "layer1/audio", "layer3/vl"}
    assert int(stats.routed["layer3/vl"].sum()) == 3 * 8 + int(joint.token_mask[:, 8:].sum())
    stats.reset()
    pixels = torch.randn(3, 3, 16, 16)
    every = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, audio_features=feats, audio_lengths=lengths)
    assert every.hidden.shape == (3, 5 + 8 + AUDIO_TOKENS, 32) and every.num_image_tokens == 5
    assert set(stats.routed) == {"layer1/image", "layer1/text", "layer1/audio", "layer3/vl"}
    assert ModelConfig().modalities == ["image", "text"]
    assert not any("audio" in k for k in VLMoE(tiny(("image", "text"))).state_dict())


def test_shared_routing_puts_audio_in_the_pool():
    torch.manual_seed(0)
    model = VLMoE(tiny(("text", "audio"), routing="shared"))
    assert list(model.blocks[1].ffn) == ["shared"] and list(model.blocks[0].ffn) == ["text", "audio"]
    feats, lengths = features()
    ids, mask = torch.randint(5, 50, (3, 8)), torch.ones(3, 8, dtype=torch.long)
    mask[0, 4:] = 0
    out = model.encode({"text": (ids, mask), "audio": (feats, lengths)})
    assert set(model.moe_stats.routed) == {"layer1/shared", "layer3/shared"}
    assert int(model.moe_stats.routed["layer1/shared"].sum()) == int(out.token_mask.sum())


def test_vit_init_starts_audio_ffns_as_its_ffn_and_leaves_the_audio_embedding(tmp_path):
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
                       image_size=16, patch_size=8)).save_pretrained(tmp_path / "vit")
    model = VLMoE(tiny(every=2))
    fresh = init_from_vit(model, tmp_path / "vit")
    assert "embeddings.audio.patch.weight" in fresh
    image, audio = model.blocks[0].ffn["image"], model.blocks[0].ffn["audio"]
    assert torch.equal(audio.fc1.weight, image.fc1.weight)
    audio_expert, image_expert = model.blocks[1].ffn["audio"].experts[3], model.blocks[1].ffn["image"].experts[0]
    assert torch.equal(audio_expert.fc2.weight, image_expert.fc2.weight)  # upcycled from the same ViT FFN


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory):
    torch.manual_seed(0)
    ast = ASTModel(ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=8, frequency_stride=8, time_stride=4, num_mel_bins=16,
                             max_length=40)).eval()
    with torch.no_grad():  # no zero-initialised tensor can pass for a copied one
        for p in ast.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("ast") / "ast"
    ast.save_pretrained(folder)
    return folder, ast


def test_ast_init_gives_ast_embeddings(ast_dir):
    folder, ast = ast_dir
    torch.manual_seed(1)
    model = VLMoE(tiny()).eval()
    apply_init(model, InitConfig(ast=str(folder)))
    feats, _ = features()
    with torch.no_grad():
        expected = ast.embeddings(feats)  # [B, CLS + distillation + 18 patches, D]
        ours, _ = model.embeddings["audio"](feats)
    torch.testing.assert_close(ours[:, 0], expected[:, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours[:, 1:], expected[:, 2:], atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(model.modality_type.weight[2]) == 0
    longer = VLMoE(ModelConfig(**{**tiny().__dict__, "audio": AudioConfig(**{**AUDIO, "max_frames": 80})}))
    apply_init(longer, InitConfig(ast=str(folder)))  # 19 time patches from AST's 9: interpolated
    assert longer.embeddings["audio"].position.shape == (1, 1 + 2 * 19, 32)
    torch.testing.assert_close(longer.embeddings["audio"].position[:, 0], ast.embeddings.position_embeddings[:, 0])


def test_ast_mismatches_are_named_before_launch(ast_dir, tmp_path):
    folder, _ = ast_dir

    def problems(cfg, path=folder):
        return check_init(types.SimpleNamespace(init=InitConfig(ast=str(path)), model=cfg))

    assert problems(tiny()) == []
    wide = ModelConfig(**{**tiny().__dict__, "audio": AudioConfig(**{**AUDIO, "patch_time": 16, "stride_time": 16})})
    found = problems(wide)
    assert len(found) == 2 and all(p.startswith(f"init.ast={folder}: ") for p in found), found
    assert "time_stride=4 (model.audio.stride_time needs 16)" in found[0] and "patch_size=8" in found[1]
    assert "add 'audio'" in problems(tiny(("image", "text")))[0]
    assert "not a folder" in problems(tiny(), tmp_path / "nope")[0]
    with pytest.raises(ConfigError, match=r"init.ast=.*time_stride=4"):
        apply_init(VLMoE(wide), InitConfig(ast=str(folder)))


def test_accounting_counts_audio_tokens_flops_and_ffns():
    dense_moe = dict(every=0)
    with_audio, without = tiny(**dense_moe), tiny(("image", "text"), **dense_moe)
    size, base = count_parameters(with_audio), count_parameters(without)
    assert size.total_params == sum(p.numel() for p in VLMoE(with_audio).parameters())
    ffn = 32 * 128 + 128 + 128 * 32 + 32  # hidden 32, FFN width 128: fc1 + fc2 weights and biases
    embedding = 32 * 8 * 8 + 32 + 32 + AUDIO_TOKENS * 32  # patch conv, CLS, positions
    assert size.total_params - base.total_params == embedding + 4 * ffn + 32  # + the modality-type row
    assert set(size.active_params_by_modality) == {"image", "text", "audio"}
    d, f, n = 32, 128, AUDIO_TOKENS
    per_block = 2 * n * d * 4 * d + 4 * n * n * d + 2 * n * 2 * d * f
    expected = 2 * 18 * 8 * 8 * d + 4 * per_block
    assert count_parameters(with_audio, passes={"audio": 1}).forward_flops_per_sample == expected
    assert count_parameters(with_audio, passes={"audio": 1}, audio_frames=80).forward_flops_per_sample > expected
    audio_text = count_parameters(with_audio, passes={"audio+text": 1}).forward_flops_per_sample
    assert base.forward_flops_per_sample < audio_text < size.forward_flops_per_sample  # fuse: all three
    with pytest.raises(ValueError, match=r"unknown pass kind\(s\) \['audio\+smell'\]"):
        count_parameters(with_audio, passes={"audio+smell": 1})
    with pytest.raises(ValueError, match=r"unknown pass kind\(s\) \['audio'\]"):
        count_parameters(without, passes={"audio": 1})
    moe = count_parameters(tiny(every=2, top_k=2))
    assert moe.active_params_by_modality["audio"] - size.active_params_by_modality["audio"] \
        == 2 * (32 * 4 + ffn)  # 2 MoE blocks: router [D, E] + 2 experts instead of 1 MLP


@pytest.mark.parametrize("audio, field", [
    ({"patch_time": 48}, "audio.patch_time (48) must be <= audio.max_frames (40)"),
    ({"patch_freq": 32}, "audio.patch_freq (32) must be <= audio.num_mel_bins (16)"),
    ({"stride_freq": 9}, "audio.stride_freq (9) must be <= audio.patch_freq (8)"),
    ({"max_frames": 0}, "audio.max_frames must be >= 1"),
    ({"bogus": 1}, "model.audio: unknown key"),
])
def test_bad_audio_settings_name_the_field(audio, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
        from_dict(ModelConfig, {"modalities": ["text", "audio"], "audio": {**AUDIO, **audio}}, "model")
