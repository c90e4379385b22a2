"""Cheap checks of the end-to-end benchmark helpers (bench/common.py, bench/rank_probe.py) and that every
benchmark script parses its --quick/--help options. The benchmarks themselves are run by hand (BENCHMARKS.md)."""
from __future__ import annotations

import importlib
import json

import pytest

from bench import common, rank_probe

SCRIPTS = ["bench.bench_train", "bench.bench_data_loading", "bench.bench_scaling", "bench.bench_memory",
           "bench.bench_moe_quality", "bench.peak_flops", "bench.bench_vqa_learning", "bench.bench_decoding",
           "bench.bench_moe_layer"]


def _row(step: int, step_time: float, samples: float, wait: float) -> dict:
    return {"step": step, "train/step_time_s": step_time, "train/samples_per_s": samples,
            "train/tokens_per_s": 10 * samples, "train/data_wait_frac": wait, "train/mfu": 0.1}


def test_measured_window_skips_warmup_and_weights_by_time():
    rows = [_row(4, 10.0, 1.0, 0.5), _row(8, 1.0, 16.0, 0.0), _row(12, 3.0, 16 / 3, 0.1)]
    window = common.measured_window(rows, warmup_steps=4)
    assert window["measured_steps"] == 8
    assert window["step_time_s"] == pytest.approx(2.0)
    # time-weighted rate = total samples / total time = (4*16 + 4*16) / (4*1 + 4*3)
    assert window["samples_per_s"] == pytest.approx(128 / 16)
    assert window["data_wait_frac"] == pytest.approx((4 * 1 * 0.0 + 4 * 3 * 0.1) / 16)


def test_measured_window_without_rows_after_warmup_fails():
    with pytest.raises(ValueError):
        common.measured_window([_row(4, 1.0, 1.0, 0.0)], warmup_steps=4)


def test_moe_sets_dense_has_no_moe_layer():
    assert "model.moe.every=0" in common.moe_sets(1, 2)
    assert "model.moe.ep_size=2" in common.moe_sets(16, 2)


def test_train_bench_runs_dense_once_and_each_impl_per_expert_count():
    """bench_train --impl: one dense baseline per size, each MoE count x each impl (model.moe.impl in its
    --set args), fused-AdamW repeats after, distinct run folders; the default stays gshard only."""
    from bench import bench_train
    args = bench_train.parse_args(["--sizes", "large", "--experts", "1", "16", "--impl", "gshard", "dropless",
                                   "--bf16-experts", "--fused-adamw-experts", "1", "16"])
    runs = bench_train.run_plan(args)
    assert runs == [("large", 1, "-", "fp32", False), ("large", 16, "gshard", "fp32", False),
                    ("large", 16, "dropless", "fp32", False), ("large", 1, "-", "fp32", True),
                    ("large", 16, "gshard", "fp32", True), ("large", 16, "dropless", "fp32", True)]
    assert len({bench_train.run_name(*r) for r in runs}) == len(runs)
    assert bench_train.run_name("large", 16, "gshard", "fp32", False) == "large_moe16_fp32"  # as before
    assert "model.moe.impl=dropless" in common.moe_sets(16, 2, "dropless")
    assert not any("impl" in s for s in common.moe_sets(1, 2, "dropless"))
    default = bench_train.run_plan(bench_train.parse_args(["--sizes", "demo", "--bf16-experts"]))
    assert {impl for _, e, impl, _, _ in default if e > 1} == {"gshard"}


def test_probe_fused_adamw_switch(monkeypatch):
    """BENCH_ADAMW_FUSED's patch: torch.optim.AdamW (as build_optimizer calls it) builds fused=True and is
    still an AdamW (DeepSpeed's isinstance checks)."""
    import torch
    original = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", original)  # restored after the test
    rank_probe.use_fused_adamw()
    weight = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([weight], lr=0.1)
    assert opt.defaults["fused"] is True and isinstance(opt, original)
    weight.grad = torch.ones(4)
    opt.step()
    assert torch.all(weight < 1)


def test_probe_reads_own_memory():
    status = rank_probe.status_bytes()
    assert status["VmHWM"] >= status["VmRSS"] > 10 * 2**20
    assert rank_probe.output_dir(["--recipe", "r", "--output-dir", "runs/x"]).as_posix() == "runs/x"


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses_quick(name):
    module = importlib.import_module(name)
    args = module.parse_args(["--quick"])
    assert args.quick


def test_moe_layer_bench_times_dropless_and_counts_optimizer_tensors(tmp_path):
    """bench_moe_layer on a tiny shape: both dropless columns are timed beside gshard, and the tensor count
    per FFN grows with the experts for gshard (router + 4 per expert) but not for dropless (router + 3)."""
    from bench import bench_moe_layer
    bench_moe_layer.main(["--tokens", "64", "--experts", "2", "8", "--hidden", "16", "--repeats", "1",
                          "--out", str(tmp_path)])
    result = json.loads(next(tmp_path.glob("moe_layer_*.json")).read_text())
    for row in result["rows"]:
        assert row["dropless_loop_ms"] > 0 and row["ours_ms"] > 0 and row["dense_ms"] > 0
        assert row["dropless_grouped_ms"] > 0 or not bench_moe_layer.has_grouped_mm()
    assert [(c["gshard_tensors"], c["dropless_tensors"]) for c in result["optimizer"]["tensors"]] == [(9, 4), (33, 4)]
    assert result["optimizer"]["adamw_experts"] == 8 and result["optimizer"]["adamw_step_ms"]["dropless_fused"] > 0


def test_moe_quality_variants_configure_the_model_they_name():
    """Each bench_moe_quality variant, applied to the recipe, gives the MoE it is named after, and the balance
    figures are the means over the MoE FFNs at the last log row that has them (not the final summary row)."""
    from bench import bench_moe_quality as quality
    from pipeline.recipe import load_recipe

    want = {"dense": ("gshard", 0, None, None), "gshard_cf1": ("gshard", 2, None, 1.0),
            "gshard_cf2": ("gshard", 2, None, 2.0), "dropless_bias": ("dropless", 2, "bias", None),
            "dropless_aux": ("dropless", 2, "aux", None)}
    assert set(quality.parse_args(["--quick"]).variants) == set(want)
    for variant, (impl, every, balance, capacity) in want.items():
        moe = load_recipe(common.VL_RECIPE, quality.variant_sets(variant, 8)).model.moe
        assert (moe.impl, moe.every, moe.ep_size, moe.top_k) == (impl, every, 1, 1), variant
        assert balance is None or moe.balance == balance
        assert capacity is None or moe.capacity_factor == capacity
        assert every == 0 or (moe.num_experts, moe.aux_loss_coef) == (8, 0.01)
    log = [{"step": 5, "moe/layer1/image/load_cv": 9.0},
           {"step": 10, "moe/layer1/image/load_cv": 0.5, "moe/layer1/image/dropped_frac": 0.2,
            "moe/layer3/vl/load_cv": 1.5, "moe/layer3/vl/dropped_frac": 0.0},
           {"step": 10, "itc_loss": 5.0}]
    balance = quality.balance_at_last_log(log)
    assert balance["balance_step"] == 10
    assert balance["load_cv"] == pytest.approx(1.0) and balance["dropped_frac"] == pytest.approx(0.1)
    assert balance["load_cv_per_ffn"] == {"layer1/image": 0.5, "layer3/vl": 1.5}


def test_attention_bench_times_and_measures_local_and_dense(tmp_path):
    """bench_attention --quick on one 8x8 grid (window 4: 4 windows): every variant is timed, the memory child
    reports a peak growth after its reset, local computes fewer pairs than dense, and a whole-grid window gives
    dense's output (the bench drives the real local path)."""
    from bench import bench_attention
    assert bench_attention.parse_args(["--quick"]).quick
    bench_attention.main(["--quick", "--grids", "8", "--variants", "dense_mask", "local", "--out", str(tmp_path)])
    result = json.loads(next(tmp_path.glob("attention_*.json")).read_text())
    (times,) = result["times"]
    assert times["n"] == 1 + 8 * 8 + 32
    assert times["local"]["pass_s"] > 0 and times["dense_mask"]["setup_s"] > 0
    assert {m["variant"] for m in result["memory"]} == {"dense_mask", "local"}
    assert all(m["hwm_reset"] and m["growth_mib"] > 0 for m in result["memory"])
    assert result["pairs"]["97"][0] < 97 * 97
    assert result["whole_grid_max_abs_diff"] < 1e-5
