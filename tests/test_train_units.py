"""Pieces of the training loop without a launcher: schedule, expert-load figures,
optimizer groups (MoE split, head lr, no-decay, freeze), eval padding."""
import math

import pytest
import torch
from torch import nn

from pipeline.config_utils import ConfigError
from pipeline.run.schedule import lr_factor
from pipeline.run.tb_logging import expert_load_scalars


def test_lr_warmup_then_cosine_or_linear_to_floor():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant") == 1.0
    with pytest.raises(ValueError):
        lr_factor(50, 100, 0, "exponential")


def test_expert_load_entropy_and_measured_drops():
    balanced = expert_load_scalars({"layer1/image": torch.tensor([25, 25, 25, 25])},
                                   {"layer1/image": torch.tensor([25, 25, 25, 25])})
    assert balanced["moe/layer1/image/entropy"] == pytest.approx(1.0)
    assert balanced["moe/layer1/image/dropped_frac"] == pytest.approx(0.0)
    skewed = expert_load_scalars({"layer1/text": torch.tensor([100, 0, 0, 0])},
                                 {"layer1/text": torch.tensor([40, 0, 0, 0])})
    assert skewed["moe/layer1/text/entropy"] == pytest.approx(0.0)
    assert skewed["moe/layer1/text/max_over_mean"] == pytest.approx(4.0)
    assert skewed["moe/layer1/text/routed"] == 100 and skewed["moe/layer1/text/kept"] == 40
    assert skewed["moe/layer1/text/dropped_frac"] == pytest.approx(0.6)
    assert skewed["moe/layer1/text/kept_frac"] == pytest.approx(0.4)
    assert sum(skewed[f"moe_load/layer1/text/expert{i:02d}"] for i in range(4)) == pytest.approx(1.0)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.heads = nn.ModuleDict({"cls": nn.Linear(4, 2)})


def test_param_groups_head_lr_no_decay_and_freeze():
    from pipeline.run.build import apply_freeze, param_groups
    from pipeline.recipe import OptimConfig

    toy = _Toy()
    assert apply_freeze(toy, [r"^model\.1\."]) == ["model.1.weight", "model.1.bias"]
    with pytest.raises(ConfigError, match="match no parameter"):
        apply_freeze(toy, ["nothing_like_this"])
    groups = {g["name"]: g for g in param_groups(toy, OptimConfig(lr=1e-3, head_lr_mult=10, weight_decay=0.1))}
    assert groups["body_decay"]["lr"] == 1e-3 and groups["body_decay"]["weight_decay"] == 0.1
    assert groups["heads_decay"]["lr"] == pytest.approx(1e-2)
    assert groups["body_no_decay"]["weight_decay"] == 0.0
    names = sum((len(g["params"]) for g in groups.values()), 0)
    assert names == 4  # frozen LayerNorm excluded


def test_moe_expert_params_get_their_own_groups():
    from deepspeed.moe.layer import MoE

    from pipeline.run.build import param_groups
    from pipeline.recipe import OptimConfig

    toy = _Toy()
    toy.model.append(MoE(4, nn.Linear(4, 4), num_experts=2, ep_size=1, k=1))
    groups = param_groups(toy, OptimConfig())
    moe_groups = [g for g in groups if g.get("moe")]
    assert moe_groups and all(all(not getattr(p, "allreduce", True) for p in g["params"]) for g in moe_groups)
    assert not any(getattr(p, "allreduce", True) is False for g in groups if not g.get("moe") for p in g["params"])


def test_eval_padding_marks_valid_and_keeps_shapes():
    from pipeline.run.eval_loop import pad_and_collate
    from pipeline.tasks.base import Task

    class T(Task):
        name, fields = "t", ("txt",)
        build_heads = prepare_sample = training_loss = eval_outputs = metrics = None

        def padding_sample(self):
            return {"x": torch.zeros(3), "id": -1}

    T.__abstractmethods__ = frozenset()
    batch = pad_and_collate(T(None), [{"x": torch.ones(3), "id": 7, "__key__": "k"}], 4)
    assert batch["x"].shape == (4, 3) and batch["valid"].tolist() == [True, False, False, False]
    assert batch["id"] == [7, -1, -1, -1] and "__key__" not in batch
    assert math.isclose(float(batch["x"].sum()), 3.0)


def test_each_loss_term_is_averaged_over_the_micro_batches_that_reported_it():
    """Mixed sources: image batches report itc, audio ones atc; a log window of both must not dilute either."""
    from pipeline.run.tb_logging import TrainWindow, console_line

    window = TrainWindow()
    for itc in (1.0, 2.0, 3.0):  # source 0: image-text
        window.add_micro({"loss": 4.0, "itc": itc, "mlm_acc": 0.5}, 0, 10, {}, {})
    window.add_micro({"loss": 8.0, "atc": 8.0}, 1, 30, {}, {})  # source 1: audio-text
    means = window.term_means(torch.device("cpu"))
    assert means == pytest.approx({"train/loss": 5.0, "train/itc": 2.0, "train/mlm_acc": 0.5, "train/atc": 8.0})
    assert window.tokens == 60 and window.micro == 4
    assert window.source_shares(2) == pytest.approx({"data/source_0_share": 0.75, "data/source_1_share": 0.25})
    assert window.source_shares(1) == {}
    assert console_line(3, 10, means, dict(window.sources)).endswith(" | src 0:3 1:1")
    assert "src" not in console_line(3, 10, means)


def test_tokens_in_counts_the_audio_patches_of_real_frames():
    from pipeline.model.audio import AudioEmbedding
    from pipeline.model.config import ModelConfig
    from pipeline.run.trainer import _tokens_in

    cfg = ModelConfig(hidden_size=16, num_layers=2, num_heads=2, image_size=16, patch_size=8, vocab_size=16)
    audio = cfg.audio  # 64 mel bins, 400 frames, 16x16 patches: a 4 x 25 grid
    lengths = torch.tensor([audio.max_frames, 20, 1])
    text = {"input_ids": torch.zeros(3, 5, dtype=torch.long), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    batch = {**text, "audio_values": torch.zeros(3, audio.max_frames, audio.num_mel_bins), "audio_lengths": lengths}
    assert _tokens_in(batch, cfg) == 15 + (1 + 4 * 25) + (1 + 4 * 2) + (1 + 4 * 1)
    _, valid_bp = AudioEmbedding(cfg)(batch["audio_values"], lengths)  # the tokens the model attends to
    assert _tokens_in(batch, cfg) == 15 + int(valid_bp.sum())
    del batch["audio_lengths"]
    assert _tokens_in(batch, cfg) == 15 + 3 * (1 + audio.num_patches)
    images = {**text, "pixel_values": torch.zeros(3, 3, 16, 16)}
    assert _tokens_in(images, cfg) == 15 + 3 * (1 + 4)


def test_tokens_in_equals_the_tokens_the_model_attends():
    """Images larger than model.image_size (a higher-resolution fine-tune) and summary tokens: the count is
    what the encoder builds, not 1 + model.num_patches."""
    from pipeline.model.config import ModelConfig
    from pipeline.model.vlmoe import VLMoE
    from pipeline.run.trainer import _tokens_in

    cfg = ModelConfig(hidden_size=16, num_layers=2, num_heads=2, image_size=16, patch_size=8, vocab_size=16,
                      summary_tokens=3, modalities=["image", "text", "audio"])
    audio = cfg.audio
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
             "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2]), "pixel_values": torch.zeros(2, 3, 32, 32),
             "audio_values": torch.zeros(2, audio.max_frames, audio.num_mel_bins),
             "audio_lengths": torch.tensor([audio.max_frames, 20])}
    out = VLMoE(cfg).encode({"image": (batch["pixel_values"],), "text": (batch["input_ids"], batch["attention_mask"]),
                             "audio": (batch["audio_values"], batch["audio_lengths"])})
    assert _tokens_in(batch, cfg) == int(out.token_mask.sum()) == 8 + 2 * (4 + 16) + (4 + 4 * 25) + (4 + 4 * 2)

