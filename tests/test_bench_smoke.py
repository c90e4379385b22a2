"""Cheap checks of the end-to-end benchmark helpers (bench/common.py, bench/rank_probe.py) and that every
benchmark script parses its --quick/--help options. The benchmarks themselves are run by hand (BENCHMARKS.md)."""
from __future__ import annotations

import importlib

import pytest

from bench import common, rank_probe

SCRIPTS = ["bench.bench_train", "bench.bench_data_loading", "bench.bench_scaling", "bench.bench_memory",
           "bench.bench_moe_quality", "bench.peak_flops", "bench.bench_vqa_learning", "bench.bench_decoding"]


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


def test_probe_reads_own_memory():
    status = rank_probe.status_bytes()
    assert status["VmHWM"] >= status["VmRSS"] > 10 * 2**20
    assert rank_probe.output_dir(["--recipe", "r", "--output-dir", "runs/x"]).as_posix() == "runs/x"


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses_quick(name):
    module = importlib.import_module(name)
    args = module.parse_args(["--quick"])
    assert args.quick
