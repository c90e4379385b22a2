"""Forward+backward time of the MoE FFNs (gshard and dropless) vs the dense FFN of the same active size, and
the optimizer's share: parameter tensors per FFN and an AdamW step (issues 3 and 21).

    .venv/bin/python bench/bench_moe_layer.py                      # 4/16/64 experts x 1k/4k/16k tokens
    .venv/bin/python bench/bench_moe_layer.py --tokens 4096 --experts 64 --repeats 9
    .venv/bin/python bench/bench_moe_layer.py --quick               # smoke run, a few seconds
    .venv/bin/python bench/bench_moe_layer.py --tokens 4096 --experts 64 --profile   # + torch.profiler tables

Shapes: S tokens, D hidden, F = 4D FFN width, E experts. One layer, top-1 (``--top-k``). Columns:
- "dense": one MLP D->k*F->D (what one token activates);
- "ours": ``SparseFFN`` (``moe.impl: gshard``) with the indexed dispatch (pipeline/model/dispatch.py),
  capacity factor 1, ``min_capacity`` 4, token dropping on (DeepSpeed defaults); "kept" = share of its
  routes within expert capacity (the rest are dropped);
- "dropless loop" / "dropless grouped": ``DroplessFFN`` (``moe.impl: dropless``, pipeline/model/dropless.py)
  with ``grouped_mm: off`` (a loop of per-expert matmuls) / ``on`` (``torch._grouped_mm``); every route is
  computed (no capacity, nothing dropped), balance ``--balance`` (default ``bias``: no aux loss);
- "stock" (only with ``--stock``): ``deepspeed.moe.layer.MoE`` as shipped (slow at many tokens x experts).
Routers are not identical across implementations (routing differs by design); every module is built after
``torch.manual_seed(0)``. A step = zero grads, forward, (sum(out) + l_aux).backward(). Modules are timed
round-robin and the best of ``--repeats`` is reported (other processes only ever add time on a shared CPU;
medians are in the JSON).

Optimizer: parameter tensors per MoE FFN at each expert count (gshard: router + 4 per expert; dropless:
router + 3 fused tensors), and one ``torch.optim.AdamW.step()`` over the FFN's parameters at the largest
expert count, both implementations (same parameter count) and the dense FFN, torch's default AdamW and
``fused=True``.
Writes tables to stdout and JSON to bench/results/moe_layer_<time>.json.
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
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model.dropless import DroplessFFN, has_grouped_mm
from pipeline.model.moe import MLP, MoEFFN, SparseFFN

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DROPLESS = {"dropless_loop": "off", "dropless_grouped": "on"}
QUICK = {"experts": [4, 16], "tokens": [1024], "repeats": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=1, choices=[1, 2])
    parser.add_argument("--capacity-factor", type=float, default=1.0, help="gshard only")
    parser.add_argument("--no-drop", action="store_true", help="gshard drop_tokens=False (capacity grows)")
    parser.add_argument("--balance", choices=["bias", "aux", "none"], default="bias", help="dropless balance")
    parser.add_argument("--grouped-mm", nargs="+", choices=["off", "on"], default=["off", "on"],
                        help="dropless variants to time: off = the loop, on = torch._grouped_mm")
    parser.add_argument("--stock", action="store_true", help="also time deepspeed.moe.layer.MoE as shipped")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true",
                        help="print a torch.profiler table of each dropless variant per shape (not timed)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK} (overrides those options)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def build(args: argparse.Namespace, experts: int, dispatch: str) -> SparseFFN:
    """The gshard FFN (``dispatch``: indexed = ours, deepspeed = stock)."""
    moe = MoEConfig(num_experts=experts, top_k=args.top_k, capacity_factor=args.capacity_factor,
                    eval_capacity_factor=args.capacity_factor, drop_tokens=not args.no_drop, dispatch=dispatch)
    torch.manual_seed(0)
    return SparseFFN(ModelConfig(hidden_size=args.hidden, num_heads=1, moe=moe)).to(DTYPES[args.dtype])


def build_dropless(args: argparse.Namespace, experts: int, grouped_mm: str) -> DroplessFFN:
    """The dropless FFN, every expert local; expert weights drawn as nn.Linear draws them (gshard's experts)."""
    moe = MoEConfig(num_experts=experts, top_k=args.top_k, impl="dropless", grouped_mm=grouped_mm,
                    balance=args.balance)
    torch.manual_seed(0)
    ffn = DroplessFFN(ModelConfig(hidden_size=args.hidden, num_heads=1, moe=moe))
    with torch.no_grad():  # GroupedMLP leaves w1/w2 uninitialised (the model's init fills them)
        for w_eab in (ffn.experts.w1, ffn.experts.w2):
            nn.init.uniform_(w_eab, -w_eab.shape[-1] ** -0.5, w_eab.shape[-1] ** -0.5)
    return ffn.to(DTYPES[args.dtype])


def step(module: nn.Module, x: torch.Tensor) -> None:
    """One forward+backward."""
    for p in module.parameters():
        p.grad = None
    x.grad = None
    if isinstance(module, MoEFFN):
        out, l_aux, _ = module(x)
        (out.float().sum() + l_aux).backward()
    else:
        module(x).float().sum().backward()


@torch.no_grad()
def kept_fraction(module: SparseFFN, x: torch.Tensor, top_k: int) -> float:
    """Share of the S*k routes that fit in expert capacity (the rest are dropped)."""
    indices_ks = module.deepspeed_moe.gate(x.reshape(-1, x.shape[-1]), None, True)[3]
    return float((indices_ks >= 0).float().sum()) / (x.shape[0] * top_k)


@torch.no_grad()
def load_cv(module: DroplessFFN, x: torch.Tensor) -> float:
    """Coefficient of variation of the dropless expert load on ``x`` (0 = every expert gets S*k/E rows)."""
    return module.load_cv(module(x)[2])


def time_modules(modules: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in modules}
    for name, module in modules.items():  # warm-up
        step(module, x)
    for _ in range(repeats):
        for name, module in modules.items():
            start = time.perf_counter()
            step(module, x)
            times[name].append(time.perf_counter() - start)
    return times


def profile(modules: dict[str, nn.Module], x: torch.Tensor, rows: int = 15) -> None:
    """torch.profiler CPU-time table of two steps of each dropless module."""
    for name, module in modules.items():
        if not name.startswith("dropless"):
            continue
        step(module, x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step(module, x)
        print(f"\n{name}, S={x.shape[0]}, E={module.num_experts}, 2 steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    grouped = has_grouped_mm()
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden, dtype=DTYPES[args.dtype], requires_grad=True)
        # the dense FFN a token activates: top-k experts of width F = one MLP of width k*F
        torch.manual_seed(0)
        dense = MLP(args.hidden, 4 * args.hidden * args.top_k).to(DTYPES[args.dtype])
        for experts in args.experts:
            modules: dict[str, nn.Module] = {"dense": dense, "ours": build(args, experts, "indexed")}
            if args.stock:
                modules["stock"] = build(args, experts, "deepspeed")
            for name, mode in DROPLESS.items():
                if mode in args.grouped_mm and (mode == "off" or grouped):
                    modules[name] = build_dropless(args, experts, mode)
            times = time_modules(modules, x, args.repeats)
            if args.profile:
                profile(modules, x)
            best = {name: min(values) for name, values in times.items()}
            row = {"tokens": tokens, "experts": experts,
                   "kept_fraction": kept_fraction(modules["ours"], x, args.top_k),
                   "dropless_load_cv": load_cv(build_dropless(args, experts, "off"), x)}
            for name in modules:
                row[f"{name}_ms"] = 1e3 * best[name]
                row[f"{name}_median_ms"] = 1e3 * statistics.median(times[name])
                if name != "dense":
                    row[f"{name}_x"] = best[name] / best["dense"]
            rows.append(row)
            print_row(rows[-1], args.stock)
            del modules
    return rows


def table_header(stock: bool) -> str:
    extra, rule = (" stock ms (vs dense) |", "---|") if stock else ("", "")
    return ("| tokens | E | dense ms | gshard ours ms (vs dense) | kept |" + extra
            + " dropless loop ms (vs dense) | dropless grouped_mm ms (vs dense) | dropless load CV |\n"
            + "|---|---|---|---|---|" + rule + "---|---|---|")


def print_row(row: dict, stock: bool) -> None:
    def cell(name: str) -> str:
        return f" {row[name + '_ms']:9.1f} ({row[name + '_x']:.2f}x) |" if f"{name}_ms" in row else " - |"

    print(f"| {row['tokens']:>6} | {row['experts']:>3} | {row['dense_ms']:9.1f} |{cell('ours')} "
          f"{row['kept_fraction']:.3f} |{cell('stock') if stock else ''}{cell('dropless_loop')}"
          f"{cell('dropless_grouped')} {row['dropless_load_cv']:.3f} |", flush=True)


def adamw_step_s(module: nn.Module, repeats: int, fused: bool) -> float:
    """Best time of one AdamW step over the module's parameters, with random gradients: torch's default
    implementation (a for-loop over tensors on CPU), or ``fused=True`` (one kernel per tensor)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)
    opt.step()  # creates the state
    times = []
    for _ in range(max(repeats, 2)):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return min(times)


def optimizer_figures(args: argparse.Namespace) -> dict:
    """Parameter tensors per FFN at each expert count; AdamW step at the largest, each implementation."""
    counts = []
    for experts in args.experts:
        gshard, dropless = build(args, experts, "indexed"), build_dropless(args, experts, "off")
        counts.append({"experts": experts, "gshard_tensors": len(list(gshard.parameters())),
                       "dropless_tensors": len(list(dropless.parameters())),
                       "parameters": sum(p.numel() for p in dropless.parameters())})
        assert counts[-1]["parameters"] == sum(p.numel() for p in gshard.parameters())
    experts = max(args.experts)
    torch.manual_seed(0)
    modules = {"dense": MLP(args.hidden, 4 * args.hidden * args.top_k).to(DTYPES[args.dtype]),
               "gshard": build(args, experts, "indexed"), "dropless": build_dropless(args, experts, "off")}
    step_ms = {f"{name}_{kind}": 1e3 * adamw_step_s(module, args.repeats, kind == "fused")
               for kind in ("default", "fused") for name, module in modules.items()}
    print("\nOptimizer: parameter tensors per MoE FFN (router included; same parameter count)")
    print("| E | parameters | gshard tensors | dropless tensors |\n|---|---|---|---|")
    for c in counts:
        print(f"| {c['experts']} | {c['parameters'] / 1e6:.2f} M | {c['gshard_tensors']} | {c['dropless_tensors']} |")
    print(f"\nAdamW step at E={experts}, best of {max(args.repeats, 2)} (dense: the FFN of equal active size)")
    print("| AdamW | " + " | ".join(f"{name} ms ({len(list(m.parameters()))} tensors)" for name, m in modules.items())
          + " |\n|---|---|---|---|")
    for kind in ("default", "fused"):
        print(f"| {kind} | " + " | ".join(f"{step_ms[f'{name}_{kind}']:.1f}" for name in modules) + " |", flush=True)
    return {"tensors": counts, "adamw_experts": experts, "adamw_step_ms": step_ms}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"MoE FFN fwd+bwd, D={args.hidden} F={4 * args.hidden} top-{args.top_k} gshard cf={args.capacity_factor} "
          f"drop={not args.no_drop}, dropless balance={args.balance}; {args.dtype} threads={args.threads} "
          f"(best of {args.repeats}); torch._grouped_mm: {has_grouped_mm()}")
    print(table_header(args.stock))
    rows = run(args)
    optimizer = optimizer_figures(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"moe_layer_{time.strftime('%Y%m%d_%H%M%S')}.json"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path.write_text(json.dumps({"settings": settings, "torch": torch.__version__,
                                "machine": platform.processor() or platform.machine(), "rows": rows,
                                "optimizer": optimizer}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
