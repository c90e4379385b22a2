"""checkpoint_merge: DeepSpeed's dense file + per-expert files (global expert ids) -> an EP=1 state dict;
the evaluate table; init_from's shape check. (Checkpoint resolution: tests/test_run_dir.py.)"""
import re

import pytest
import torch

from pipeline.run.checkpoint_merge import merge_moe_checkpoint
from pipeline.evaluate import format_table, parse_args
from pipeline.model import ModelConfig, MoEConfig, VLMoE

EXPERT = re.compile(r"^(.*\.deepspeed_experts)\.(\d+)\.")


def tiny_model(seed):
    torch.manual_seed(seed)
    return VLMoE(ModelConfig(hidden_size=16, num_layers=2, num_heads=2, image_size=16, patch_size=8, vocab_size=16,
                             max_text_len=4, num_fusion_layers=1, moe=MoEConfig(num_experts=4, every=2)))


def write_deepspeed_layout(folder, state, ep_size=2, num_experts=4):
    """What DeepSpeed writes for an EP=ep_size run: dense file without experts, one file per (MoE layer,
    global expert) holding that expert's tensors under their global id."""
    folder.mkdir(parents=True)
    dense = {k: v for k, v in state.items() if not EXPERT.match(k)}
    torch.save({"module": dense, "ds_version": "0.19.8"}, folder / "mp_rank_00_model_states.pt")
    modules = sorted({EXPERT.match(k).group(1) for k in state if EXPERT.match(k)})
    for layer_id, module in enumerate(modules):
        for g in range(num_experts):
            part = {k: v for k, v in state.items() if k.startswith(f"{module}.{g}.")}
            torch.save(part, folder / f"layer_{layer_id}_expert_{g}_mp_rank_00_model_states.pt")
    return modules


def test_merge_gives_an_ep1_state_dict(tmp_path):
    src = tiny_model(0).state_dict()
    modules = write_deepspeed_layout(tmp_path / "ckpt", src)
    assert len(modules) == 3  # image, text, vl FFNs of the MoE fusion block
    merged = merge_moe_checkpoint(tmp_path / "ckpt")
    target = tiny_model(1)
    target.load_state_dict(merged, strict=True)
    for key, value in target.state_dict().items():
        assert torch.equal(value, src[key]), key


def test_merge_rejects_a_missing_expert(tmp_path):
    write_deepspeed_layout(tmp_path / "ckpt", tiny_model(0).state_dict())
    (tmp_path / "ckpt" / "layer_1_expert_2_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ValueError, match=r"experts \[0, 1, 3\]"):
        merge_moe_checkpoint(tmp_path / "ckpt")


def test_table_puts_baseline_next_to_score():
    table = format_table({"acc": 0.75, "acc/number": 0.5, "num_samples": 32.0}, {"acc": 0.25}, "q-type prior")
    lines = table.splitlines()
    assert "q-type prior" in lines[0]
    assert re.search(r"acc\s+\|\s+75\.00 \|\s+25\.00", table)
    assert re.search(r"acc/number\s+\|\s+50\.00 \|\s+-", table)


def test_cli_rejects_pretraining_tasks():
    with pytest.raises(SystemExit):
        parse_args(["--checkpoint", "x", "--task", "vl_pretrain", "--data", "d"])


def test_init_from_with_other_shapes_is_a_config_error_naming_the_tensor(tmp_path):
    """A recipe whose model: section disagrees with init_from's model (here patch 8 vs 4) fails with the
    tensor, both shapes and the recipe to fix, not a torch size-mismatch dump; a matching model loads."""
    from types import SimpleNamespace

    from pipeline.run.checkpoint import load_weights
    from pipeline.config_utils import ConfigError

    def dense(patch, seed):
        torch.manual_seed(seed)
        return VLMoE(ModelConfig(hidden_size=16, num_layers=2, num_heads=2, image_size=16, patch_size=patch,
                                 vocab_size=16, max_text_len=4, num_fusion_layers=1, moe=MoEConfig(every=0)))

    run = tmp_path / "run"
    folder = run / "checkpoints" / "step_000001"
    source = dense(8, 0)
    write_deepspeed_layout(folder, source.state_dict())
    (folder / "COMPLETE").write_text("1\n")
    (run / "resolved_recipe.yaml").write_text("model: {patch_size: 8}\n")
    with pytest.raises(ConfigError, match=r"embeddings\.image\.position: checkpoint \[1, 5, 16\] vs model "
                                          r"\[1, 17, 16\].*resolved_recipe\.yaml"):
        load_weights(SimpleNamespace(module=dense(4, 1)), run)
    target = dense(8, 1)
    load_weights(SimpleNamespace(module=target), run)
    for key, value in target.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
