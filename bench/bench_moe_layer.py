"""Forward+backward time of our MoE FFN vs the dense FFN of the same active size (and DeepSpeed's stock layer).

    .venv/bin/python bench/bench_moe_layer.py                      # 4/16/64 experts x 1k/4k/16k tokens
    .venv/bin/python bench/bench_moe_layer.py --tokens 4096 --experts 64 --repeats 9

Shapes: S tokens, D hidden, F = 4D FFN width, E experts. One layer, top-1 (``--top-k``), capacity factor 1,
``min_capacity`` 4, token dropping on (DeepSpeed defaults). "dense" is one MLP D->k*F->D (what one token
activates); "stock" is ``deepspeed.moe.layer.MoE`` as shipped; "ours" is ``SparseFFN`` with the indexed
dispatch (pipeline/model/dispatch.py). A step = zero grads, forward, (sum(out) + l_aux).backward().
Modules are timed round-robin and the best of ``--repeats`` is reported (other processes only ever add
time on a shared CPU; medians are in the JSON). "kept" = share of routes within expert capacity.
Writes a table to stdout and JSON to bench/results/moe_layer_<time>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model.moe import MLP, SparseFFN

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=1, choices=[1, 2])
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--no-drop", action="store_true", help="drop_tokens=False (capacity grows)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser.parse_args(argv)


def build(args: argparse.Namespace, experts: int, dispatch: str) -> SparseFFN:
    moe = MoEConfig(num_experts=experts, top_k=args.top_k, capacity_factor=args.capacity_factor,
                    eval_capacity_factor=args.capacity_factor, drop_tokens=not args.no_drop, dispatch=dispatch)
    torch.manual_seed(0)
    return SparseFFN(ModelConfig(hidden_size=args.hidden, num_heads=1, moe=moe)).to(DTYPES[args.dtype])


def step(module: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward+backward."""
    for p in module.parameters():
        p.grad = None
    x.grad = None
    if isinstance(module, SparseFFN):
        out, l_aux, _ = module(x)
        (out.float().sum() + l_aux).backward()
    else:
        module(x).float().sum().backward()


@torch.no_grad()
def kept_fraction(module: SparseFFN, x: torch.Tensor, top_k: int) -> float:
    """Share of the S*k routes that fit in expert capacity (the rest are dropped)."""
    indices_ks = module.deepspeed_moe.gate(x.reshape(-1, x.shape[-1]), None, True)[3]
    return float((indices_ks >= 0).float().sum()) / (x.shape[0] * top_k)


def time_modules(modules: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int
                 ) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in modules}
    for name, module in modules.items():  # warm-up
        step(module, x)
    for _ in range(repeats):
        for name, module in modules.items():
            start = time.perf_counter()
            step(module, x)
            times[name].append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden, dtype=DTYPES[args.dtype], requires_grad=True)
        # the dense FFN a token activates: top-k experts of width F = one MLP of width k*F
        dense = MLP(args.hidden, 4 * args.hidden * args.top_k).to(DTYPES[args.dtype])
        for experts in args.experts:
            modules = {"dense": dense, "stock": build(args, experts, "deepspeed"),
                       "ours": build(args, experts, "indexed")}
            times = time_modules(modules, x, args.repeats)
            best = {name: min(values) for name, values in times.items()}
            row = {"tokens": tokens, "experts": experts, "kept_fraction": kept_fraction(modules["ours"], x,
                                                                                       args.top_k)}
            for name in modules:
                row[f"{name}_ms"] = 1e3 * best[name]
                row[f"{name}_median_ms"] = 1e3 * statistics.median(times[name])
            row["stock_x"], row["ours_x"] = best["stock"] / best["dense"], best["ours"] / best["dense"]
            rows.append(row)
            print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    print(f"| {row['tokens']:>6} | {row['experts']:>3} | {row['dense_ms']:9.1f} | {row['stock_ms']:9.1f} "
          f"({row['stock_x']:.2f}x) | {row['ours_ms']:9.1f} ({row['ours_x']:.2f}x) | {row['kept_fraction']:.3f} |",
          flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"MoE FFN fwd+bwd, D={args.hidden} F={4 * args.hidden} top-{args.top_k} cf={args.capacity_factor} "
          f"drop={not args.no_drop} {args.dtype} threads={args.threads} (best of {args.repeats})")
    print("| tokens | E | dense ms | stock ms (vs dense) | ours ms (vs dense) | kept |")
    print("|---|---|---|---|---|---|")
    rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"moe_layer_{time.strftime('%Y%m%d_%H%M%S')}.json"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path.write_text(json.dumps({"settings": settings, "torch": torch.__version__,
                                "machine": platform.processor() or platform.machine(), "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
