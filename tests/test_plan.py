"""pipeline.plan: sizes of a base VL-MoE (12 layers, 768 hidden, 32 experts every other layer) against its
dense baseline, memory per rank by ZeRO stage / EP size, and impossible settings rejected."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.plan import main as plan_main

REPO = Path(__file__).resolve().parents[1]
BASE = ["--recipe", str(REPO / "launch/recipes/vl_pretrain.yaml"), "--skip-input-checks",
        "--set", "model.num_layers=12", "--set", "model.hidden_size=768", "--set", "model.num_heads=12",
        "--set", "model.moe.num_experts=32",
        "--set", "model.moe.every=2", "--set", "model.image_size=224", "--set", "model.patch_size=16",
        "--set", "data.image_size=224", "--set", "model.max_text_len=40", "--set", "data.text_len=40",
        "--set", "model.vocab_size=30522", "--set", "model.num_fusion_layers=2"]


def plan(capsys, *args):
    code = plan_main([*BASE, *args, "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


def test_base_moe_active_params_match_dense_total_is_several_times_larger(capsys):
    start = time.perf_counter()
    code, result = plan(capsys, "--ds-config", str(REPO / "ds_configs/zero2_bf16.json"), "--world-size", "8",
                        "--ep-size", "8")
    assert code == 0 and time.perf_counter() - start < 30  # meta-device model: no weights allocated (loaded CI)
    assert result["moe_layers"] == [1, 3, 5, 7, 9, 11] and result["num_experts"] == 32
    assert abs(result["active_vs_dense"] - 1) < 0.05
    assert result["total_vs_dense"] > 4
    assert result["params_per_rank"] < result["total_params"] / 4  # experts sharded over EP=8
    assert result["train_flops_per_sample"] > 0 and result["global_batch"] == 16 * 8


def test_memory_per_rank_falls_with_zero_stage_and_ep_size(capsys):
    """CUDA ranks: DeepSpeed's estimator (16-bit weights and grads on the accelerator, optimizer offloadable)."""
    def states(ds, ep):
        code, result = plan(capsys, "--ds-config", str(REPO / "ds_configs" / f"{ds}.json"), "--world-size", "8",
                            "--ep-size", str(ep), "--device", "cuda")
        assert code == 0, result
        return result["model_states_gib_per_rank"]
    assert states("zero0_bf16", 8) > states("zero1_bf16", 8) > states("zero2_bf16", 8)
    assert states("zero2_bf16", 2) > states("zero2_bf16", 8)
    assert states("zero2_offload_bf16", 8) < states("zero2_bf16", 8)


@pytest.mark.parametrize("args,message", [
    (["--ds-config", "ds_configs/zero3_bf16.json", "--world-size", "8"], "ZeRO stage 3 is not supported"),
    (["--ds-config", "ds_configs/zero2_bf16.json", "--world-size", "6", "--ep-size", "4"],
     "world size 6 is not divisible by model.moe.ep_size=4"),
    (["--ds-config", "ds_configs/zero2_bf16.json", "--world-size", "8", "--ep-size", "3"],
     "num_experts.*divisible by.*ep_size"),
])
def test_impossible_settings_rejected_with_reason(capsys, args, message):
    args = [str(REPO / a) if a.startswith("ds_configs") else a for a in args]
    code, err = plan(capsys, *args)
    assert code == 2 and __import__("re").search(message, err), err


def test_cli_prints_a_readable_summary():
    proc = subprocess.run([sys.executable, "-m", "pipeline.plan", *BASE, "--ds-config", "ds_configs/zero2_bf16.json",
                           "--world-size", "8", "--ep-size", "8"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "active per token" in proc.stdout and "memory per rank" in proc.stdout


def test_fine_tune_whose_model_cannot_load_init_from_is_rejected_before_launch(tmp_path, capsys):
    """The recipe's model: section overrides init_from's model; when that changes tensor shapes (here a
    patch-16 conv-stem pretraining fine-tuned by a recipe saying patch 8) the plan check, which the launch
    scripts run before the launcher, names the tensor and both shapes. A matching fine-tune passes."""
    run = tmp_path / "pretrained"
    run.mkdir()
    (run / "resolved_recipe.yaml").write_text(
        "model: {hidden_size: 64, num_layers: 2, num_heads: 2, num_fusion_layers: 1, image_size: 64,"
        " patch_size: 16, patch_embed: conv_stem, vocab_size: 1000}\n")
    vqa = ["--recipe", str(REPO / "launch/recipes/vqa.yaml"), "--ds-config", str(REPO / "ds_configs/zero2_fp32.json"),
           "--world-size", "2", "--set", f"init_from={run}", "--skip-input-checks"]
    assert plan_main([*vqa, "--set", "model.patch_size=8"]) == 2
    err = capsys.readouterr().err
    assert "init_from" in err and "embeddings.image.position: init_from [1, 17, 64] vs this recipe [1, 65, 64]" in err
    assert plan_main(vqa) == 0
    # another MoE implementation: other tensor names, which the shape check does not see; the plan names the
    # converter (gshard -> dropless) or says there is none
    assert plan_main([*vqa, "--set", "model.moe.impl=dropless"]) == 2
    assert f"python -m pipeline.run.convert_moe {run} --output NEW_RUN" in capsys.readouterr().err
    (run / "resolved_recipe.yaml").write_text((run / "resolved_recipe.yaml").read_text().replace(
        "vocab_size: 1000}", "vocab_size: 1000, moe: {impl: dropless}}"))
    assert plan_main(vqa) == 0  # the fine-tune's model inherits impl: dropless from init_from
    assert plan_main([*vqa, "--set", "model.moe.impl=gshard"]) == 2
    assert "there is no dropless -> gshard converter" in capsys.readouterr().err


def test_input_problems_and_an_impossible_engine_are_listed_together(tmp_path, capsys):
    """Without --skip-input-checks the plan checks the run's inputs too (pipeline.run.preflight) and lists every
    problem in one message, so a launch is fixed in one go rather than one error per attempt."""
    code = plan_main(["--recipe", str(REPO / "launch/recipes/vl_pretrain.yaml"),
                      "--ds-config", str(REPO / "ds_configs/zero3_bf16.json"), "--world-size", "2",
                      "--set", f"data.train=[{{path: {tmp_path / 'missing'}, split: train}}]",
                      "--set", "data.eval=null",
                      "--set", f"data.tokenizer={tmp_path / 'no_tokenizer'}"])
    err = capsys.readouterr().err
    assert code == 2 and "vl_pretrain.yaml: 3 problem(s)" in err, err
    assert f"data.train[0].path={tmp_path / 'missing'}: does not exist" in err
    assert f"data.tokenizer={tmp_path / 'no_tokenizer'}: not a folder" in err
    assert "ZeRO stage 3 is not supported with DeepSpeed MoE" in err



def test_flops_and_activations_follow_the_objectives(capsys):
    """Without ITM a vl_pretrain sample makes 3 fused passes fewer: less compute and activation memory."""
    args = ["--ds-config", str(REPO / "ds_configs/zero2_bf16.json"), "--world-size", "8"]
    code, full = plan(capsys, *args)
    assert code == 0, full
    code, no_itm = plan(capsys, *args, "--set", "objectives={itc: 1.0, mlm: 1.0}")
    assert code == 0, no_itm
    assert no_itm["train_flops_per_sample"] < full["train_flops_per_sample"]
    assert no_itm["activations_gib_per_rank_est"] < full["activations_gib_per_rank_est"]


def test_train_flops_are_three_forwards_of_the_task_passes():
    from pipeline.model.accounting import count_parameters
    from pipeline.plan import activation_bytes, size_of, task_passes, train_flops_per_sample
    from pipeline.recipe import load_recipe

    recipe = load_recipe(REPO / "launch/recipes/text_mlm.yaml")
    assert task_passes(recipe) == {"text": 1}
    forward = count_parameters(recipe.model, text_len=recipe.data.text_len, passes={"text": 1})
    assert size_of(recipe).forward_flops_per_sample == forward.forward_flops_per_sample
    assert train_flops_per_sample(recipe) == 3 * forward.forward_flops_per_sample
    assert activation_bytes(recipe, {"text": 2}) == 2 * activation_bytes(recipe, {"text": 1})


def test_activations_count_the_tokens_of_every_modality_of_a_pass():
    """A pass kind names its modalities (``audio+text``; ``fuse`` = all of the model's): each adds its tokens."""
    from pipeline.plan import activation_bytes
    from pipeline.recipe import load_recipe

    recipe = load_recipe(REPO / "launch/recipes/text_mlm.yaml", ["model.modalities=[image, text, audio]"])
    text, audio = activation_bytes(recipe, {"text": 1}), activation_bytes(recipe, {"audio": 1})
    assert activation_bytes(recipe, {"audio+text": 1}) > text + audio  # attention is quadratic in the tokens
    assert activation_bytes(recipe, {"fuse": 1}) > activation_bytes(recipe, {"audio+text": 1}) > audio > 0
    with pytest.raises(ValueError, match="unknown pass kind"):
        activation_bytes(load_recipe(REPO / "launch/recipes/text_mlm.yaml"), {"audio": 1})


def test_all_to_all_bytes_count_the_routes_a_dropless_forward_makes_and_split_by_node():
    """The plan's rows per step are the routes a real forward of a full (unpadded) micro-batch makes; the
    bytes split over the node by the EP layout; a group limit bounds the nodes a token's experts span."""
    import torch

    from pipeline.model import VLMoE
    from pipeline.model.moe import local_experts
    from pipeline.plan import all_to_all_bytes
    from pipeline.recipe import load_recipe

    sets = ["model.hidden_size=32", "model.num_heads=2", "model.num_layers=4", "model.image_size=32",
            "model.patch_size=8", "data.image_size=32", "model.max_text_len=8", "data.text_len=8",
            "model.moe.impl=dropless", "model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.ep_size=4",
            "batch.micro_batch_size=3"]
    recipe = load_recipe(REPO / "launch/recipes/vl_pretrain.yaml", sets)
    comm = all_to_all_bytes(recipe, {"fuse": 1}, world_size=4, ranks_per_node=8, prec="fp32", grad_accum=1)
    rows = comm["bytes_per_step"] / (4 * 32 * 4)  # dispatch + combine, fwd + bwd; fp32
    with local_experts():
        model = VLMoE(recipe.model)
    ids = torch.randint(5, 50, (3, 8))
    model.moe_stats.reset()
    model.fuse(torch.randn(3, 3, 32, 32), ids, torch.ones_like(ids))
    assert rows == sum(int(c.sum()) for c in model.moe_stats.routed.values()) == 3 * (17 + 8) * 2 * 2
    assert comm["to_other_nodes_bytes"] == 0 and comm["to_own_node_bytes"] == comm["bytes_per_step"] * 3 / 4
    wide = load_recipe(REPO / "launch/recipes/vl_pretrain.yaml", sets + ["model.moe.ep_size=8"])
    comm = all_to_all_bytes(wide, {"fuse": 1}, world_size=8, ranks_per_node=2, prec="bf16", grad_accum=2)
    assert comm["ep_nodes"] == 4 and comm["max_nodes_per_token"] == 2  # top-2: at most 2 nodes
    assert comm["to_other_nodes_bytes"] == comm["bytes_per_step"] * 6 / 8
    limited = load_recipe(REPO / "launch/recipes/vl_pretrain.yaml", sets + [
        "model.moe.ep_size=8", "model.moe.expert_groups=4", "model.moe.max_groups_per_token=1"])
    comm = all_to_all_bytes(limited, {"fuse": 1}, world_size=8, ranks_per_node=2, prec="bf16", grad_accum=2)
    assert comm["max_nodes_per_token"] == 1
    two = load_recipe(REPO / "launch/recipes/vl_pretrain.yaml", sets + [
        "model.moe.ep_size=8", "model.moe.expert_groups=4", "model.moe.max_groups_per_token=2"])
    comm = all_to_all_bytes(two, {"fuse": 1}, world_size=8, ranks_per_node=4, prec="bf16", grad_accum=2)
    assert comm["ep_nodes"] == 2 and comm["max_nodes_per_token"] == 2  # groups 1 and 2 sit on different nodes


def test_cpu_state_bytes_fall_with_dp_for_zero1_and_2_not_zero0_and_experts_split_over_world_over_ep():
    """CPU ranks: measured bytes per parameter (bench/bench_state_bytes.py); a ZeRO-1/2 partition shrinks as
    the data-parallel size grows, ZeRO-0 keeps everything; expert params are ``experts / ep`` per rank
    partitioned over ``world / ep`` ranks, i.e. exactly as a dense model of that size on ``world / ep`` ranks."""
    from pipeline.plan import model_state_bytes

    def dense(world, stage, prec="fp32"):
        return model_state_bytes(10**6, 0, 1, world, stage, prec, False, "cpu")["dense"]

    for prec in ("fp32", "bf16"):
        assert dense(1, 0, prec) == dense(2, 0, prec) == dense(8, 0, prec) > 20 * 10**6  # > 16 B: build + flat copy
        for stage in (1, 2):
            assert dense(1, stage, prec) > dense(2, stage, prec) > dense(8, stage, prec)
    assert dense(1, 2) > dense(1, 0) > dense(8, 2)  # ZeRO-2 on one rank holds more than ZeRO-0 (measured)
    experts = model_state_bytes(0, 4 * 10**6, 2, 8, 2, "fp32", False, "cpu")["experts"]
    assert experts == model_state_bytes(2 * 10**6, 0, 1, 4, 2, "fp32", False, "cpu")["dense"]
    assert model_state_bytes(0, 4 * 10**6, 8, 8, 2, "fp32", False, "cpu")["experts"] == dense(1, 2) / 2
    # offload moves nothing on a CPU rank; on CUDA it frees the optimizer states from the accelerator
    assert model_state_bytes(10**6, 0, 1, 2, 2, "fp32", True, "cpu") == model_state_bytes(
        10**6, 0, 1, 2, 2, "fp32", False, "cpu")


def test_device_flag_picks_the_memory_model_and_is_printed(capsys):
    """--device cpu: host memory by the measured coefficients (fp32 ZeRO-2 on 2 ranks: more than DeepSpeed's
    16-bit estimator says); cuda: the estimator; auto: cuda exactly when torch sees a GPU. The plan names the
    device, and memory_per_rank_bytes = states + activations (fp32 elements and a measured extra on CPU) + overhead."""
    import torch

    from pipeline.plan import CPU_ACTIVATION_EXTRA_BYTES_PER_SAMPLE

    args = ["--ds-config", str(REPO / "ds_configs/zero2_fp32.json"), "--world-size", "2", "--ep-size", "2"]
    results = {}
    for device in ("cpu", "cuda", "auto"):
        code, results[device] = plan(capsys, *args, "--device", device)
        assert code == 0, results[device]
        assert results[device]["device"] == (device if device != "auto" else
                                             "cuda" if torch.cuda.is_available() else "cpu")
    cpu, cuda = results["cpu"], results["cuda"]
    assert cpu["model_states_gib_per_rank"] > 1.5 * cuda["model_states_gib_per_rank"]
    extra = CPU_ACTIVATION_EXTRA_BYTES_PER_SAMPLE * 16 / 2**30  # the recipe's micro-batch 16
    assert abs(cpu["activations_gib_per_rank_est"] - (2 * cuda["activations_gib_per_rank_est"] + extra)) < 1e-9
    assert cpu["runtime_overhead_gib_per_rank"] > 0
    for result in (cpu, cuda):
        total = (result["model_states_gib_per_rank"] + result["activations_gib_per_rank_est"]
                 + result["runtime_overhead_gib_per_rank"]) * 2**30
        assert abs(result["memory_per_rank_bytes"] - total) <= 1
    assert cuda["runtime_overhead_gib_per_rank"] == 0
    proc = subprocess.run([sys.executable, "-m", "pipeline.plan", *BASE, *args, "--device", "cpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "GiB on cpu" in proc.stdout, proc.stderr


def test_local_attention_lowers_flops_and_activations_and_is_reported(capsys):
    """At 224 px / patch 16 (14x14 patches), 7x7 windows: fewer attention pairs -> fewer FLOPs and activation
    bytes than dense; a dense block listed in attention_global_layers costs what dense does; the plan names it."""
    args = ["--ds-config", str(REPO / "ds_configs/zero2_bf16.json"), "--world-size", "8"]
    code, dense = plan(capsys, *args)
    assert code == 0, dense
    local_args = [*args, "--set", "model.attention=local", "--set", "model.attention_window=7"]
    code, local = plan(capsys, *local_args)
    assert code == 0, local
    code, half = plan(capsys, *local_args, "--set", "model.attention_global_layers=[0, 2, 4, 6, 8, 10]")
    assert code == 0, half
    assert local["train_flops_per_sample"] < half["train_flops_per_sample"] < dense["train_flops_per_sample"]
    assert local["activations_gib_per_rank_est"] < half["activations_gib_per_rank_est"] \
        < dense["activations_gib_per_rank_est"]
    ratio = local["attention"]["forward_flops_vs_dense_attention"]
    assert ratio == pytest.approx(local["train_flops_per_sample"] / dense["train_flops_per_sample"])
    assert dense["attention"] == {"kind": "dense"}
    assert plan_main([*BASE, *local_args]) == 0
    assert "attention           local: window 7" in capsys.readouterr().out
    code, summary = plan(capsys, *local_args, "--set", "model.summary_tokens=4")  # 4 more global tokens per image
    assert code == 0, summary
    assert summary["train_flops_per_sample"] > local["train_flops_per_sample"]
    assert summary["activations_gib_per_rank_est"] > local["activations_gib_per_rank_est"]
    assert summary["attention"]["summary_tokens"] == 4


def test_activations_follow_the_data_image_size_and_token_merging(capsys):
    """The plan sizes the images the run feeds (data.image_size, not model.image_size) and counts the image
    tokens token merging leaves in later blocks."""
    from pipeline.plan import activation_bytes, layer_tokens
    from pipeline.recipe import load_recipe

    path = REPO / "launch/recipes/vl_pretrain.yaml"
    base = ["model.image_size=64", "model.patch_size=8", "data.image_size=64"]
    small, large = load_recipe(path, base), load_recipe(path, [*base, "data.image_size=128"])
    assert layer_tokens(large, ["image"])[0] == {"image": 1 + 256}
    assert activation_bytes(large, {"image": 1}) > 3 * activation_bytes(small, {"image": 1})
    merged = load_recipe(path, [*base, "data.image_size=128", "model.token_merge=32",
                                "model.token_merge_layers=[0, 1]"])
    assert [t["image"] for t in layer_tokens(merged, ["image", "text"])] == [257, 225, 193, 193]
    assert activation_bytes(merged, {"fuse": 1}) < activation_bytes(large, {"fuse": 1})
