"""The backward-profile switch of the training benchmark (bench/rank_probe.py ``BENCH_PROFILE=1``, bench_train
``--profile``): per-backward means of the named ranges and autograd nodes, and the printed split."""
from __future__ import annotations

import json

import pytest

from bench import bench_train, common, rank_probe


def test_write_profile_means_per_backward_and_sums_autograd_nodes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    # [self us, total us, calls] summed over 2 profiled backward calls
    events = {"engine.backward": [1e3, 8e6, 2], "zero.grad_hook": [2e3, 3e6, 400],
              "autograd::engine::evaluate_function: _LoopExpertsBackward": [10.0, 2e6, 44],
              "autograd::engine::evaluate_function: AddmmBackward0": [10.0, 1e6, 300],
              "_LoopExpertsBackward": [5e5, 1.9e6, 44], "aten::copy_": [1.5e6, 1.5e6, 900]}
    report: dict = {}
    rank_probe.write_profile(events, [4.0, 4.2], report, tmp_path)
    profile = report["profile"]
    assert profile["ranges"]["engine.backward"] == {"ms": 4000.0, "calls": 1.0}
    assert profile["ranges"]["zero.grad_hook"] == {"ms": 1500.0, "calls": 200.0}
    # only the engine's evaluate_function entries count (not the node's own, nested, event)
    assert profile["nodes"]["_LoopExpertsBackward"] == {"ms": 1000.0, "calls": 22.0}
    assert profile["nodes"]["AddmmBackward"]["ms"] == 500.0
    assert list(profile["self_ms"])[0] == "aten::copy_"  # sorted by self time
    table = (tmp_path / "probe" / "profile_rank1.txt").read_text()
    assert "wall ms [4000.0, 4200.0]" in table and "aten::copy_" in table


def test_profile_summary_prints_shares_of_the_backward(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    run_dir = tmp_path / "run"
    (run_dir / "probe").mkdir(parents=True)
    (run_dir / "probe" / "profile_rank0.txt").write_text("table\n")
    probes = [{"profile": {"backward_wall_ms": [w], "ranges": {"zero.grad_hook": {"ms": hook, "calls": 1}},
                           "nodes": {}, "usage": [{"minor_faults": faults, "user_s": 1.0, "sys_s": 0.5}]}}
              for w, hook, faults in ((1000.0, 300.0, 10), (3000.0, 500.0, 30))]
    text = bench_train.profile_summary([{"name": "large_x", "run_dir": str(run_dir), "probe": probes}])
    assert "large_x: profiled backward 2000 ms (mean of 2 ranks)" in text
    assert "minor_faults 20" in text
    line = next(line for line in text.splitlines() if "zero.grad_hook" in line)
    assert "400.0 ms" in line and "20.0%" in line  # mean over ranks / mean backward
    assert [p.name.endswith("large_x_rank0.txt") for p in (tmp_path / "results").iterdir()] == [True]
    assert "large_x" in capsys.readouterr().out


def test_rank_env_variants_are_named_and_parsed():
    args = bench_train.parse_args(["--sizes", "large", "--experts", "1", "16", "--profile",
                                   "--rank-env", "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1"])
    assert args.profile and args.rank_env == ["GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1"]
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--rank-env"])  # a variant needs a value
    json.dumps(vars(args))  # settings go into the result JSON
