"""Export pieces without a run: every kind of task head survives its JSON spec (same keys, same outputs,
the MLM decoder tied to the token embedding), unknown heads are refused by name, and the preprocessor config
carries the audio feature settings of an audio model."""
import dataclasses
import json
import types

import pytest
import torch
from torch import nn

from pipeline.hf.export_files import preprocessor_config
from pipeline.hf.heads import build_head, head_spec, input_size, output_size
from pipeline.model import VLMoE
from pipeline.model.config import AudioConfig, ModelConfig, MoEConfig
from pipeline.model.heads import ITCHead, ITMHead, MLMHead
from pipeline.model.moe import local_experts
from pipeline.tasks.vqa import vqa_head

D = 32


@pytest.fixture(scope="module")
def model() -> VLMoE:
    with local_experts():
        return VLMoE(ModelConfig(hidden_size=D, num_heads=2, num_layers=2, vocab_size=40,
                                 moe=MoEConfig(min_capacity=1)))


def test_every_head_kind_round_trips_through_its_spec(model):
    torch.manual_seed(0)
    heads = {"itc": ITCHead(D, 16, max_logit_scale=50.0), "itm": ITMHead(D), "mlm": MLMHead(model.token_embedding),
             "vqa": vqa_head(D, 7), "cls": nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 3)),
             "pair": nn.Sequential(nn.Linear(2 * D, 2 * D), nn.Tanh(), nn.Dropout(0.1), nn.Linear(2 * D, 2))}
    x = torch.randn(5, D)
    for name, head in heads.items():
        spec = json.loads(json.dumps(head_spec(name, head)))  # plain JSON
        rebuilt = build_head(spec, model)
        rebuilt.load_state_dict(head.state_dict(), strict=True)
        head.eval(), rebuilt.eval()
        source = torch.cat([x, x], 1) if name == "pair" else x
        if name == "itc":
            assert all(torch.equal(a, b) for a, b in zip(rebuilt(x, x), head(x, x)))
        else:
            torch.testing.assert_close(rebuilt(source), head(source))
    assert build_head(head_spec("mlm", heads["mlm"]), model).token_embedding is model.token_embedding
    assert output_size(head_spec("vqa", heads["vqa"])) == 7 and input_size(head_spec("vqa", heads["vqa"])) == D
    assert input_size(head_spec("cls", heads["cls"])) == D and input_size(head_spec("pair", heads["pair"])) == 2 * D
    assert output_size(head_spec("itm", heads["itm"])) is None


def test_unknown_head_is_refused_by_name():
    with pytest.raises(ValueError, match="head 'odd'.*Bilinear"):
        head_spec("odd", nn.Bilinear(2, 2, 2))
    with pytest.raises(ValueError, match="head 'seq'.*ReLU"):
        head_spec("seq", nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_preprocessor_config_has_image_and_audio_settings():
    audio = AudioConfig(num_mel_bins=32, max_frames=200)
    recipe = types.SimpleNamespace(
        data=types.SimpleNamespace(image_size=48, text_len=12),
        model=ModelConfig(modalities=("image", "text", "audio"), audio=audio))
    config = json.loads(json.dumps(preprocessor_config(recipe)))
    assert config["size"] == {"height": 48, "width": 48} and config["text_len"] == 12
    assert config["image_mean"] == [0.5] * 3 and config["rescale_factor"] == pytest.approx(1 / 255)
    expected = json.loads(json.dumps(dataclasses.asdict(audio)))
    assert {k: config["audio"][k] for k in expected} == expected
    assert config["audio"]["hop_seconds"] == 0.01
    recipe.model = ModelConfig()
    assert "audio" not in preprocessor_config(recipe)
