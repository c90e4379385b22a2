"""Smoke test of bench/bench_moe_layer.py on a tiny shape: it runs and writes its JSON."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_moe_layer.py"


def test_bench_moe_layer_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_moe_layer", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tokens", "64", "--experts", "2", "4", "--hidden", "16", "--repeats", "1", "--out", str(tmp_path)])
    rows = json.loads(next(tmp_path.glob("moe_layer_*.json")).read_text())["rows"]
    assert [r["experts"] for r in rows] == [2, 4]
    assert all(r["ours_ms"] > 0 and 0 < r["kept_fraction"] <= 1 for r in rows)
    assert "| tokens |" in capsys.readouterr().out
