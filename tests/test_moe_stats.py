"""One MoE statistics accumulator per step (``pipeline.model.moe_stats``): every MoE call of every pass
records its aux loss and routed / kept counts in ``model.moe_stats``; TensorBoard gets kept and dropped
fractions per layer and modality that match what the dispatch really ran through the experts."""
import pytest
import torch

from pipeline.model import VLMoE
from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.run.run_dir import RunDir
from pipeline.run.tb_logging import MetricsSink, expert_load_scalars
from tests.train_helpers import scalars

TINY = dict(hidden_size=32, num_layers=4, num_heads=2, image_size=16, patch_size=8, vocab_size=50,
            max_text_len=8, num_fusion_layers=1)


def tiny_model(**moe) -> VLMoE:
    torch.manual_seed(0)
    return VLMoE(ModelConfig(**TINY, moe=MoEConfig(**{"num_experts": 4, "min_capacity": 1, **moe})))


def text_inputs(b=3):
    ids = torch.randint(5, 50, (b, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(b, 8, dtype=torch.long)
    mask[:, 5:] = 0  # 5 real tokens of 8 per text
    return ids, mask


def expert_rows(model: VLMoE) -> dict[str, int]:
    """Forward hooks on every expert: the rows the dispatch really ran through each MoE FFN's experts."""
    rows: dict[str, int] = {}
    for name, ffn in model.sparse_ffns().items():  # "blocks.1.ffn.text" -> "layer1/text"
        _, layer, _, key = name.split(".")
        for expert in ffn.experts:
            def hook(_module, args, _out, tag=f"layer{layer}/{key}"):
                rows[tag] = rows.get(tag, 0) + args[0].shape[0]
            expert.register_forward_hook(hook)
    return rows


def test_stats_sum_every_call_of_a_step_and_reset():
    model = tiny_model()
    pixels, (ids, mask) = torch.randn(3, 3, 16, 16), text_inputs()
    model.moe_stats.reset()
    model.encode_image(pixels)
    model.fuse(pixels, ids, mask)
    model.encode_text(ids, mask)
    stats = model.moe_stats
    # image: 3 x (4 patches + CLS) per image pass; text: 3 x 5 real tokens (top-1 never routes padding)
    assert int(stats.routed["layer1/image"].sum()) == 2 * 15
    assert int(stats.routed["layer1/text"].sum()) == 2 * 15  # the text-only pass and the fused pass
    assert int(stats.routed["layer3/vl"].sum()) == 15 + 15 and int(stats.routed["layer3/text"].sum()) == 15
    assert stats.calls == 2 + 3 + 2  # image pass: layers 1, 3; fused: 1 image, 1 text, 3 vl; text: 1, 3
    aux = stats.aux_loss()
    assert aux.requires_grad and aux > 0
    aux.backward()
    assert model.blocks[1].ffn["image"].router.weight.grad.abs().sum() > 0
    stats.reset()
    assert stats.routed == {} and stats.calls == 0 and float(stats.aux_loss()) == 0.0


def test_dense_model_records_nothing():
    torch.manual_seed(0)
    model = VLMoE(ModelConfig(**TINY, moe=MoEConfig(every=0)))
    model.encode_text(*text_inputs())
    assert model.moe_stats.routed == {} and float(model.moe_stats.aux_loss()) == 0.0


@pytest.mark.parametrize("capacity_factor", [0.5, 4.0])
def test_tensorboard_kept_and_dropped_fractions_match_the_dispatch(tmp_path, capacity_factor):
    """Written by the trainer's sink and read back with TensorBoard's own reader: per layer and modality,
    kept_frac is the share of routed tokens the experts really processed (counted by hooks on the experts),
    dropped_frac its complement; a tight capacity drops some, a loose one none."""
    model = tiny_model(capacity_factor=capacity_factor)
    rows = expert_rows(model)
    model.moe_stats.reset()
    pixels, (ids, mask) = torch.randn(3, 3, 16, 16), text_inputs()
    model.encode_image(pixels)
    model.fuse(pixels, ids, mask)
    sink = MetricsSink(RunDir(tmp_path), enabled=True)
    sink.scalars(expert_load_scalars(model.moe_stats.routed, model.moe_stats.kept), step=1)
    sink.close()
    tb = scalars(tmp_path)
    keys = sorted(model.moe_stats.routed)
    assert keys == ["layer1/image", "layer1/text", "layer3/image", "layer3/vl"]
    for key in keys:
        routed = float(model.moe_stats.routed[key].sum())
        kept_frac, dropped_frac = tb[f"moe/{key}/kept_frac"][0][1], tb[f"moe/{key}/dropped_frac"][0][1]
        assert kept_frac == pytest.approx(rows[key] / routed, abs=1e-6), key
        assert dropped_frac == pytest.approx(1 - rows[key] / routed, abs=1e-6), key
    dropped = [tb[f"moe/{key}/dropped_frac"][0][1] for key in keys]
    assert (max(dropped) > 0) if capacity_factor < 1 else (dropped == [0.0] * len(keys))
