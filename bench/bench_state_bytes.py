"""Model-state bytes per parameter on a CPU rank, by ZeRO stage, precision and data-parallel size: the
coefficients ``pipeline.plan`` predicts CPU ranks' memory with (``CPU_STATE_BYTES``).

    .venv/bin/python bench/bench_state_bytes.py                      # ZeRO-0/1/2, fp32 + bf16, 1 and 2 ranks
    .venv/bin/python bench/bench_state_bytes.py --precisions fp32 --stages 2

Each cell: ``deepspeed --num_gpus DP bench/bench_state_bytes.py --worker STAGE PRECISION OUT`` (CPU, gloo, one
thread per rank). A rank builds a 25.2M-parameter stack of 24 ``Linear(1024, 1024)`` (fp32, in host memory as
the pipeline builds its model), ``deepspeed.initialize`` with ``torch.optim.AdamW`` (torch's default
implementation, as ``pipeline.run.build.build_optimizer``) and ``ds_configs/zero{STAGE}_{PRECISION}.json``, then
2 steps of micro-batch 4. Measured on rank 0: peak resident set (VmHWM, reset after the imports) minus the resident
set after the imports, per parameter: model build + DeepSpeed's flat copies + gradients + AdamW states and
its step temporaries + allocator slack, all in host memory. Activations here are ~0 (4 rows).

The fit: bytes/param = a + b / dp for each (precision, stage), from the dp = 1 and dp = 2 cells (ZeRO-0: b = 0,
a = mean). Prints the table and the fit; writes bench/results/state_bytes_<time>.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WIDTH, LAYERS, MICRO_BATCH, STEPS = 1024, 24, 4, 2


def worker(stage: int, precision: str, out: Path) -> None:
    """One rank: build, initialize, train; rank 0 writes its bytes per parameter to ``out``."""
    import datetime

    import deepspeed
    import torch
    from torch import nn

    from bench.rank_probe import reset_peak, status_bytes
    from pipeline.run.distributed import skip_shm_comm_op

    torch.set_num_threads(1)
    skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    baseline = status_bytes()["VmRSS"]
    hwm_reset = reset_peak()
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    params = sum(p.numel() for p in model.parameters())
    config = {**json.loads((REPO / "ds_configs" / f"zero{stage}_{precision}.json").read_text()),
              "train_micro_batch_size_per_gpu": MICRO_BATCH, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=config)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for _ in range(STEPS):
        loss = engine(torch.randn(MICRO_BATCH, WIDTH, dtype=dtype)).float().square().mean()
        engine.backward(loss)
        engine.step()
    if torch.distributed.get_rank() == 0:
        peak = status_bytes()["VmHWM"]
        out.write_text(json.dumps({"stage": stage, "precision": precision,
                                   "dp": torch.distributed.get_world_size(), "params": params,
                                   "baseline_rss": baseline, "peak": peak, "hwm_reset": hwm_reset,
                                   "bytes_per_param": (peak - baseline) / params}) + "\n")


def measure(stage: int, precision: str, dp: int, folder: Path) -> dict:
    from bench import common

    out = folder / f"zero{stage}_{precision}_dp{dp}.json"
    out.unlink(missing_ok=True)
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    port = common.free_port()
    cmd = [deepspeed, "--num_gpus", str(dp), "--master_port", str(port), str(Path(__file__).resolve()),
           "--worker", str(stage), precision, str(out)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=common.launcher_env(), capture_output=True, text=True, timeout=600)
    finally:
        common.remove_shm_buffers(port)
    if proc.returncode or not out.is_file():
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(out.read_text())


def fit(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{"<precision> ZeRO-<stage>": {"a": .., "b": ..}}: bytes/param = a + b / dp through the dp 1 and 2 cells."""
    coefficients = {}
    for key in sorted({(r["precision"], r["stage"]) for r in rows}):
        by_dp = {r["dp"]: r["bytes_per_param"] for r in rows if (r["precision"], r["stage"]) == key}
        if key[1] == 0 or len(by_dp) < 2:
            a, b = sum(by_dp.values()) / len(by_dp), 0.0
        else:
            b = (by_dp[1] - by_dp[2]) * 2
            a = by_dp[1] - b
        coefficients[f"{key[0]} ZeRO-{key[1]}"] = {"a": round(a, 1), "b": round(b, 1)}
    return coefficients


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:
        i = argv.index("--worker")
        worker(int(argv[i + 1]), argv[i + 2], Path(argv[i + 3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--dp", type=int, nargs="+", default=[1, 2], help="data-parallel sizes (ranks per launch)")
    args = p.parse_args(argv)
    from bench import common

    folder = common.BENCH_RUNS / "state_bytes"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for precision in args.precisions:
        for stage in args.stages:
            for dp in args.dp:
                rows.append(measure(stage, precision, dp, folder))
                print(f"  {precision} ZeRO-{stage} dp {dp}: {rows[-1]['bytes_per_param']:.1f} bytes/param "
                      f"({common.load_line()})", flush=True)
    coefficients = fit(rows)
    print(f"\nbytes per parameter on a CPU rank (peak RSS - baseline; {LAYERS} x Linear({WIDTH}, {WIDTH}), "
          f"AdamW, {STEPS} steps)")
    table = common.print_table(["precision", "ZeRO", *(f"dp={d}" for d in args.dp), "a", "b (a + b/dp)"],
                               [[prec, stage, *(next((r["bytes_per_param"] for r in rows if (r["precision"],
                                 r["stage"], r["dp"]) == (prec, stage, d)), float("nan")) for d in args.dp),
                                 coefficients[f"{prec} ZeRO-{stage}"]["a"], coefficients[f"{prec} ZeRO-{stage}"]["b"]]
                                for prec in args.precisions for stage in args.stages])
    common.write_result("state_bytes", {"settings": vars(args), "rows": rows, "fit": coefficients, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
