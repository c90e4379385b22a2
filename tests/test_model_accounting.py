"""Size accounting on the meta device: parameters and forward FLOPs of given model passes."""
import subprocess
import sys
import time

import pytest

from pipeline.model import ModelConfig, MoEConfig, VLMoE
from pipeline.model.accounting import build_meta_model, count_parameters
from tests.launcher import REPO

BASE = dict(hidden_size=768, num_layers=12, num_heads=12, image_size=224, patch_size=16, vocab_size=30522,
            max_text_len=40, num_fusion_layers=2)
IMAGE = {"image": 1}  # one image-only pass


def test_base_moe_vs_dense_baseline():
    start = time.perf_counter()
    sparse = count_parameters(ModelConfig(**BASE, moe=MoEConfig(num_experts=32, every=2, ep_size=8)))
    dense = count_parameters(ModelConfig(**BASE, moe=MoEConfig(every=0)))
    assert time.perf_counter() - start < 20  # meta device: no 1.5B-parameter allocation
    assert abs(sparse.active_params_per_token / dense.active_params_per_token - 1) < 0.05
    assert sparse.total_params > 5 * dense.total_params
    assert sparse.expert_params > 0.8 * sparse.total_params and dense.expert_params == 0
    assert abs(sparse.forward_flops_per_sample / dense.forward_flops_per_sample - 1) < 0.05


def test_total_matches_real_model_and_ep_is_ignored():
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, image_size=16, vocab_size=50, max_text_len=8,
                      num_fusion_layers=1, moe=MoEConfig(num_experts=4, every=1, top_k=2, use_residual=True))
    size = count_parameters(cfg)
    assert size.total_params == sum(p.numel() for p in VLMoE(cfg).parameters())
    assert next(build_meta_model(cfg).parameters()).is_meta


def test_dense_flops_by_hand():
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_ratio=4, image_size=16, patch_size=8,
                      vocab_size=50, max_text_len=8, num_fusion_layers=0, moe=MoEConfig(every=0))
    d, f, n = 32, 128, 5  # image pass: 4 patches + CLS
    per_block = 2 * n * d * 4 * d + 4 * n * n * d + 2 * n * 2 * d * f
    expected = 2 * 4 * 3 * 8 * 8 * d + 2 * per_block  # the forward pass only (training's 3x is the plan's)
    assert count_parameters(cfg, passes=IMAGE).forward_flops_per_sample == expected
    assert count_parameters(cfg, passes={"image": 2}).forward_flops_per_sample == 2 * expected
    more = count_parameters(cfg, image_size=32, passes=IMAGE)  # bigger images cost more
    assert more.forward_flops_per_sample > expected
    with pytest.raises(ValueError, match=r"unknown pass kind\(s\) \['vl_pretrain'\]"):
        count_parameters(cfg, passes={"vl_pretrain": 1})


def test_vl_pretrain_flops_follow_the_objectives():
    from pipeline.tasks.pretrain import VLPretrainTask
    cfg = ModelConfig(moe=MoEConfig(every=0))

    def passes(objectives):
        return VLPretrainTask.passes(VLPretrainTask.resolve_objectives(objectives), VLPretrainTask.Options())

    assert passes({}) == {"image": 1, "text": 1, "fuse": 4}  # ITC image + text, ITM 3 fused pairs, MLM 1
    assert passes({"itc": 1, "itm": 0, "mlm": 1}) == {"image": 1, "text": 1, "fuse": 1}
    assert passes({"mlm": 1}) == {"fuse": 1}
    full = count_parameters(cfg, passes=passes({})).forward_flops_per_sample
    no_itm = count_parameters(cfg, passes=passes({"itc": 1, "mlm": 1})).forward_flops_per_sample
    fuse = count_parameters(cfg).forward_flops_per_sample  # default: one fused pass
    assert full - no_itm == pytest.approx(3 * fuse)


def test_conv_stem_flops_by_hand():
    kw = dict(hidden_size=32, num_layers=1, num_heads=2, image_size=16, patch_size=4, vocab_size=50,
              max_text_len=8, num_fusion_layers=0, moe=MoEConfig(every=0))
    linear, stem = ModelConfig(**kw), ModelConfig(**kw, patch_embed="conv_stem")
    # 16x16 -> 3x3 stride-2 convs 3->32 (8x8), 32->32 (4x4, capped at D), then 1x1 32->32 on 16 patches
    stem_flops = 2 * 8 * 8 * 3 * 32 * 9 + 2 * 4 * 4 * 32 * 32 * 9 + 2 * 16 * 32 * 32
    linear_flops = 2 * 16 * 3 * 4 * 4 * 32
    diff = count_parameters(stem, passes=IMAGE).forward_flops_per_sample \
        - count_parameters(linear, passes=IMAGE).forward_flops_per_sample
    assert diff == stem_flops - linear_flops
    # coordinate planes: 2 more input channels in the first conv of either embedding
    coords = ModelConfig(**kw, coord_channels=True)
    stem_coords = ModelConfig(**kw, patch_embed="conv_stem", coord_channels=True)
    assert count_parameters(coords, passes=IMAGE).forward_flops_per_sample \
        - count_parameters(linear, passes=IMAGE).forward_flops_per_sample == 2 * 16 * 2 * 4 * 4 * 32
    assert count_parameters(stem_coords, passes=IMAGE).forward_flops_per_sample \
        - count_parameters(stem, passes=IMAGE).forward_flops_per_sample == 2 * 8 * 8 * 2 * 32 * 9
    assert count_parameters(coords).total_params - count_parameters(linear).total_params == 2 * 4 * 4 * 32


def test_meta_model_skips_weight_init_and_restores_it():
    """The plan check builds meta models once per launch: filling meta tensors would import torch._dynamo
    (seconds per process) for nothing; torch.nn.init must be back to normal afterwards."""
    code = ("import sys, torch\n"
            "from pipeline.model.accounting import build_meta_model\n"
            "from pipeline.model.config import ModelConfig\n"
            "normal = torch.nn.init.normal_\n"
            "model = build_meta_model(ModelConfig())\n"
            "assert next(model.parameters()).is_meta\n"
            "assert torch.nn.init.normal_ is normal, 'init functions not restored'\n"
            "print('dynamo imported', 'torch._dynamo' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dynamo imported False" in proc.stdout
