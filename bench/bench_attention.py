"""Local (windowed) vs dense attention (issue 22): forward+backward time and peak activation memory of one
attention module vs sequence length, and (``--train-step``) a training step of the large bench model at 1,024
image tokens, local vs dense, side by side.

    .venv/bin/python bench/bench_attention.py                   # g = 16, 32, 64 -> N = 289, 1057, 4129
    .venv/bin/python bench/bench_attention.py --grids 64 --repeats 7
    .venv/bin/python bench/bench_attention.py --train-step       # + the training step (about 10 min of CPU)
    .venv/bin/python bench/bench_attention.py --quick            # smoke run: g = 4, 8, 1 repeat, a few seconds

Module: ``pipeline.model.blocks.Attention`` of the large bench model (``launch/recipes/vl_pretrain.yaml`` +
``bench/common.py`` "large": hidden 384, 6 heads, head dim 64, qk_norm as the recipe), fp32, 1 thread, driven
without ``VLMoE``: the segments of a fused pass (image CLS + g x g patches, then 32 text tokens: N = 1 + g*g + 32)
are built by hand. The text of half the rows is padded (a caption of 12 tokens out of 32), as in a real batch.
Variants (all on the same input and weights, timed round-robin, median of ``--repeats``):
- dense, mask: SDPA with the [B, 1, N, N] bool mask of ``blocks.attention_mask`` (what the model runs with padding);
- dense, no mask: SDPA without a mask (its best case: the padding is then attended, so it is not the model's
  computation, only a floor for dense);
- dense, eager: the dense_mask computation on SDPA's math backend (``sdpa_kernel(SDPBackend.MATH)``): scores and
  probabilities materialised as [B, H, N, N] tensors, as eager attention (transformers' ``attn_implementation=
  "eager"``, timm without fused attention) holds them; the model never runs this way, it shows what the N x N
  activation memory of issue 22's premise is;
- local: ``sparse_attention.build_local_layout`` (window ``--window`` x ``--window`` patches, CLS and text global),
  unshifted; local_shift: the shifted layout of odd blocks (Swin's cyclic shift: as many windows, plus a region
  mask). Both carry a [B*W, 1, L, L+G] mask here (the padded text is a global key some rows must not see).
A pass = build the mask / layout once (the model builds them once per pass for all blocks: "setup" is also
timed alone), ``Attention.forward``, ``out.sum().backward()`` (gradients of the input and the weights).

Peak activation memory: a fresh subprocess per (variant, N) allocates the module and the inputs, runs one
warm-up pass, frees its gradients, then resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5, as
``bench/rank_probe.py``) and runs one pass: figure = VmHWM (peak resident set) during the pass - VmRSS before it.
The child runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` = 64 KiB so freed tensors go back to the kernel (otherwise
the warm-up's freed blocks are reused without raising the peak, and the figure reads low). It includes the mask or
layout, q/k/v, the attention's saved tensors and workspace, and the gradients of that pass.

Train step (``--train-step``): ``pipeline.train`` (``bench/rank_probe.py``, the real ``deepspeed`` launcher) with
``vl_pretrain`` on the cached synth corpus, the large model with dense FFNs (no MoE: attention's share is what
changes), ``model.image_size=256 model.patch_size=8`` (32 x 32 = 1,024 patches), micro-batch ``--train-micro``,
``--train-ranks`` ranks, ZeRO-2 fp32; runs alternate dense, local, dense, local (``--train-order``: the repeat
shows the load drift); step time from each run's ``train_log.jsonl`` after the warm-up steps; ratio = mean dense /
mean local step time.
Prints tables; writes JSON to bench/results/attention_<time>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from pipeline.model.blocks import Attention, Segment, attention_mask, valid_tokens  # noqa: E402
from pipeline.model.config import ModelConfig  # noqa: E402
from pipeline.model.sparse_attention import attention_pairs, build_local_layout  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402

VARIANTS = ["dense_mask", "dense_nomask", "dense_eager", "local", "local_shift"]
TEXT_LEN, PADDED_TEXT = 32, 12
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", type=int, nargs="+", default=None,
                   help="image grid sides g (N = 1+g*g+32); default 16 32 64 (--quick: 4 8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--window", type=int, default=8, help="model.attention_window")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--train-step", action="store_true", help="also the training step of the large model")
    p.add_argument("--train-only", action="store_true", help="only the training step")
    p.add_argument("--train-micro", type=int, default=2, help="micro-batch per rank of the training step")
    p.add_argument("--train-ranks", type=int, default=1)
    p.add_argument("--train-order", nargs="+", choices=["dense", "local"], default=["dense", "local", "dense", "local"],
                   help="runs in this order (alternating: load drift shows as dense vs dense)")
    p.add_argument("--train-steps", type=int, nargs=2, default=[1, 3], metavar=("WARMUP", "MEASURED"))
    p.add_argument("--quick", action="store_true", help="smoke run: g = 4, 8 (or --grids), 1 repeat, window 4")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "GRID"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=common.RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.grids, args.repeats, args.window = args.grids or [4, 8], 1, 4
    args.grids = args.grids or [16, 32, 64]
    return args


# ------------------------------------------------------------------------------------------- module bench
def model_config(window: int) -> ModelConfig:
    """The large bench model's config (attention settings aside, which each variant sets)."""
    sets = common.MODEL_SIZES["large"] + [f"model.attention_window={window}"]
    return load_recipe(common.VL_RECIPE, sets).model


def fused_inputs(grid: int, batch: int) -> tuple[list[Segment], torch.Tensor | None]:
    """Segments of a fused image+text pass (image CLS + grid^2 patches, 32 text tokens; the text of every
    odd row padded after 12 tokens) and the joint valid mask."""
    n_img = 1 + grid * grid
    text_valid_bt = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
    text_valid_bt[1::2, PADDED_TEXT:] = False
    segments = [Segment("image", 0, n_img, None), Segment("text", n_img, n_img + TEXT_LEN, text_valid_bt)]
    return segments, valid_tokens(segments, batch, torch.device("cpu"))


def setup(variant: str, cfg: ModelConfig, segments: list[Segment], valid_bn: torch.Tensor | None, batch: int
          ) -> tuple[torch.Tensor | None, Any]:
    """(mask, layout) of a variant, built as the model builds them once per pass."""
    cpu = torch.device("cpu")
    if variant == "dense_nomask":
        return None, None
    if variant in ("dense_mask", "dense_eager"):
        return attention_mask(segments, valid_bn, batch, False, cpu), None
    return None, build_local_layout(cfg, segments, valid_bn, batch, False, cpu, None, variant == "local_shift")


class Case:
    """One sequence length: the module, the input, and a pass per variant."""

    def __init__(self, cfg: ModelConfig, grid: int, batch: int):
        torch.manual_seed(0)
        self.cfg, self.batch = cfg, batch
        self.segments, self.valid_bn = fused_inputs(grid, batch)
        self.n = self.segments[-1].end
        self.attn = Attention(cfg)
        self.x_bnd = torch.randn(batch, self.n, cfg.hidden_size, requires_grad=True)

    def run(self, variant: str) -> tuple[float, float]:
        """(setup seconds, whole pass seconds) of one forward+backward."""
        self.x_bnd.grad = None
        self.attn.zero_grad(set_to_none=True)
        start = time.perf_counter()
        mask, layout = setup(variant, self.cfg, self.segments, self.valid_bn, self.batch)
        built = time.perf_counter()
        with sdpa_kernel(SDPBackend.MATH) if variant == "dense_eager" else contextlib.nullcontext():
            out_bnd = self.attn(self.x_bnd, mask, layout=layout)
            out_bnd.sum().backward()
        end = time.perf_counter()
        return built - start, end - start


def time_grid(cfg: ModelConfig, grid: int, args: argparse.Namespace) -> dict[str, Any]:
    case = Case(cfg, grid, args.batch)
    for variant in args.variants:  # warm-up
        case.run(variant)
    samples: dict[str, list[tuple[float, float]]] = {v: [] for v in args.variants}
    for repeat in range(args.repeats):
        order = args.variants if repeat % 2 == 0 else args.variants[::-1]
        for variant in order:
            samples[variant].append(case.run(variant))
    out = {"grid": grid, "n": case.n, "batch": args.batch}
    for variant, values in samples.items():
        out[variant] = {"pass_s": statistics.median(v[1] for v in values),
                        "setup_s": statistics.median(v[0] for v in values),
                        "all_pass_s": [v[1] for v in values]}
    return out


def check_same_output(cfg: ModelConfig, grid: int, batch: int) -> float:
    """Largest |local - dense| of the outputs with a window covering the whole grid (a sanity check that the
    bench drives the real paths: it must be ~1e-6)."""
    big = dataclass_replace(cfg, attention_window=grid)
    case = Case(big, grid, batch)
    with torch.no_grad():
        dense = case.attn(case.x_bnd, attention_mask(case.segments, case.valid_bn, batch, False,
                                                      torch.device("cpu")))
        layout = build_local_layout(big, case.segments, case.valid_bn, batch, False, torch.device("cpu"), None,
                                    False)
        local = case.attn(case.x_bnd, None, layout=layout)
    return float((dense - local).abs().max())


def dataclass_replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    import dataclasses
    return dataclasses.replace(cfg, **changes)


# ------------------------------------------------------------------------------------------- memory
def status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def child_memory(variant: str, grid: int, args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: peak RSS growth of one pass of ``variant`` above the settled level."""
    import gc
    torch.set_num_threads(1)
    case = Case(model_config(args.window), grid, args.batch)
    case.run(variant)
    case.x_bnd.grad = None
    case.attn.zero_grad(set_to_none=True)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = status_kib()
    reset = before["VmHWM"] <= before["VmRSS"] + 64
    case.run(variant)
    after = status_kib()
    return {"variant": variant, "grid": grid, "n": case.n, "rss_before_mib": before["VmRSS"] / 1024,
            "peak_mib": after["VmHWM"] / 1024, "growth_mib": (after["VmHWM"] - before["VmRSS"]) / 1024,
            "hwm_reset": reset}


def measure_memory(variant: str, grid: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, str(grid), "--batch", str(args.batch),
           "--window", str(args.window)]
    env = {**common.launcher_env(), "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- train step
def train_step(args: argparse.Namespace) -> list[dict[str, Any]]:
    captions, tokenizer = common.ensure_synth()
    warmup, measured = (1, 1) if args.quick else args.train_steps
    image = 64 if args.quick else 256
    model_sets = common.MODEL_SIZES["large"] + common.moe_sets(1, 1) + [
        f"model.image_size={image}", "model.patch_size=8", f"data.image_size={image}",
        f"model.attention_window={args.window}"]
    rows = []
    for attention in args.train_order:
        sets = (common.data_sets(captions, tokenizer) + model_sets
                + [f"model.attention={attention}", f"batch.micro_batch_size={args.train_micro}",
                   f"train.steps={warmup + measured}", "train.log_every=1", "train.save_every=0",
                   "train.eval_every=0", "schedule.warmup_steps=1", "train.peak_tflops=1.0"])
        name = f"attention_{attention}_{len(rows)}"
        run = common.run_training(common.BENCH_RUNS / "attention" / name, sets, args.train_ranks,
                                  "ds_configs/zero2_fp32.json", timeout=1500)
        window = common.measured_window(run["log"], warmup)
        rows.append({"attention": attention, "micro_batch": args.train_micro, "ranks": args.train_ranks,
                     "image_tokens": (image // 8) ** 2, **window, "phases": common.phase_means(run["probe"], warmup),
                     "peak_rss_gib": max(p.get("peak_before_save", p["peak"]) for p in run["probe"]) / 2**30,
                     "command": run["command"], "wall_s": run["wall_s"], "load_average": run["load_average"]})
        print(f"  {name}: {rows[-1]['step_time_s']:.2f} s/step ({common.load_line()})", flush=True)
    return rows


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(child_memory(args.child[0], int(args.child[1]), args)))
        return 0
    print(f"start: {common.load_line()}", flush=True)
    cfg = model_config(args.window)
    result: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "load_start": os.getloadavg()}
    tables = []
    if not args.train_only:
        result["whole_grid_max_abs_diff"] = check_same_output(cfg, args.grids[0], args.batch)
        times, memory = [], []
        for grid in args.grids:
            times.append(time_grid(cfg, grid, args))
            t = times[-1]
            print(f"  g={grid} N={t['n']}: " + ", ".join(f"{v} {t[v]['pass_s'] * 1e3:.1f} ms" for v in args.variants)
                  + f" ({common.load_line()})", flush=True)
            if not args.no_memory:
                for variant in args.variants:
                    memory.append(measure_memory(variant, grid, args))
        local_cfg = dataclass_replace(cfg, attention="local")
        pairs = {t["n"]: (attention_pairs(local_cfg, 0, {"image": 1 + t["grid"] ** 2, "text": TEXT_LEN}),
                          attention_pairs(local_cfg, 1, {"image": 1 + t["grid"] ** 2, "text": TEXT_LEN}))
                 for t in times}
        mem = {(m["variant"], m["n"]): m for m in memory}
        print(f"\nAttention fwd+bwd, hidden {cfg.hidden_size}, {cfg.num_heads} heads, batch {args.batch}, fp32, "
              f"1 thread, window {args.window}, median of {args.repeats}; ms per pass (setup = mask / layout build, "
              f"included); {common.load_line()}")
        headers = ["N (g)", "variant", "pass ms", "setup ms", "dense mask / this", "peak act. MiB",
                   "dense mask mem / this", "pairs / sample"]
        rows = []
        for t in times:
            base = t.get("dense_mask")
            for variant in args.variants:
                m = mem.get((variant, t["n"]))
                dm = mem.get(("dense_mask", t["n"]))
                p = t["n"] ** 2 if variant.startswith("dense") else pairs[t["n"]][variant == "local_shift"]
                rows.append([f"{t['n']} ({t['grid']})", variant, t[variant]["pass_s"] * 1e3,
                             t[variant]["setup_s"] * 1e3,
                             f"{base['pass_s'] / t[variant]['pass_s']:.2f}x" if base else "-",
                             m["growth_mib"] if m else None,
                             f"{dm['growth_mib'] / m['growth_mib']:.2f}x" if m and dm else "-", p])
        tables.append(common.print_table(headers, rows))
        result.update(times=times, memory=memory, pairs={str(k): v for k, v in pairs.items()})
        print(f"whole-grid window vs dense, max |diff| of the outputs: {result['whole_grid_max_abs_diff']:.2e}")
    if args.train_step or args.train_only:
        train = train_step(args)
        print(f"\nTraining step, vl_pretrain large (dense FFN), {train[0]['image_tokens']} image tokens, "
              f"micro-batch {args.train_micro}, {args.train_ranks} rank(s), ZeRO-2 fp32; {common.load_line()}")
        tables.append(common.print_table(
            ["attention", "s/step", "samples/s", "fwd/bwd/opt s", "peak RSS GiB", "dense (first) / this"],
            [[r["attention"], r["step_time_s"], r["samples_per_s"],
              "/".join(f"{r['phases'].get(k, float('nan')):.2f}" for k in ("forward_s", "backward_s", "step_s")),
              r["peak_rss_gib"], f"{train[0]['step_time_s'] / r['step_time_s']:.2f}x"] for r in train]))
        means = {a: statistics.mean(r["step_time_s"] for r in train if r["attention"] == a) for a in ("dense", "local")
                 if any(r["attention"] == a for r in train)}
        if len(means) == 2:
            print(f"mean s/step: dense {means['dense']:.2f}, local {means['local']:.2f}: "
                  f"dense / local {means['dense'] / means['local']:.2f}x")
        result["train"] = train
    result["table"] = "\n\n".join(tables)
    write_result(args.out, result)
    return 0


def write_result(folder: Path, payload: dict[str, Any]) -> Path:
    """``common.write_result``'s JSON, into ``folder`` (tests write to a temporary one)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"attention_{time.strftime('%Y%m%d_%H%M%S', time.gmtime())}.json"
    payload = {"benchmark": "attention", "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "machine": common.machine(), "load_average_end": os.getloadavg(), **payload}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    raise SystemExit(main())
