"""Decoding speed of ``pipeline.model.generation.generate``: KV cache vs recomputing the prefix, beam vs greedy.

    .venv/bin/python bench/bench_decoding.py                          # batch 1 and 16, 32 tokens, all cores
    .venv/bin/python bench/bench_decoding.py --batch-sizes 16 --threads 1 --repeats 5
    .venv/bin/python bench/bench_decoding.py --quick                  # smoke run: batch 2, 4 tokens, 1 repeat

Model: the demo's (``model:`` of launch/recipes/vl_pretrain.yaml) at EP=1 with random weights, eval mode, fp32,
on CUDA when present, else CPU; LM head = the MLM head tied to the token embedding. Input: a random image (its
patch tokens are the prefix, bidirectional) and a prompt of 1 token ([CLS]); ``--new-tokens`` (32) generated
tokens forced for every sample (min_new_tokens = max_new_tokens, so EOS never ends a sequence early;
model.max_text_len is raised to 1 + new tokens when the recipe's is smaller: one more position embedding row).
Modes, timed round-robin in one process after ``--warmup`` calls each, median of ``--repeats``:
"greedy cache" (KV cache: one position per step), "greedy no cache" (``use_cache=False``: every step re-encodes
image + prompt + tokens so far), "beam K cache" (``--beams``). tokens/s = batch x new tokens / seconds (beam: the
output tokens, not the K x more it scores). "same tokens": greedy with and without the cache agree exactly.
On a CPU that other processes keep busy, use ``--threads 1``: a batch-1 step is ~100 small ops and with more
threads than free cores each op waits for a descheduled OpenMP thread (2 threads on a loaded 2-core machine:
~10x slower, BENCHMARKS.md).
Writes a markdown table to stdout and JSON to bench/results/decoding_<time>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import load_line, machine, print_table, write_result
from pipeline.config_utils import from_dict
from pipeline.model.config import ModelConfig
from pipeline.model.generation import DecodeOptions, Generated, generate
from pipeline.model.heads import MLMHead
from pipeline.model.vlmoe import VLMoE

PAD, BOS, EOS = 0, 2, 3  # ids of the demo tokenizer's [PAD], [CLS], [SEP]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="launch/recipes/vl_pretrain.yaml", help="its model: section is used")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per sample (forced)")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per mode and batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per mode and batch size (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2, 4 tokens, 1 repeat, no JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.new_tokens, args.warmup, args.repeats = [2], 4, 0, 1
    return args


def build(recipe: str, new_tokens: int, device: torch.device) -> tuple[VLMoE, MLMHead, ModelConfig]:
    """The recipe's model at EP=1 (one process), random weights, eval mode, fp32."""
    section = yaml.safe_load((REPO / recipe).read_text())["model"]
    section = {**section, "moe": {**section.get("moe", {}), "ep_size": 1}}
    section["max_text_len"] = max(section.get("max_text_len", 32), 1 + new_tokens)
    cfg = from_dict(ModelConfig, section, "model")
    torch.manual_seed(0)
    model = VLMoE(cfg).to(device).eval()
    head = MLMHead(model.token_embedding).to(device).eval()
    return model, head, cfg


def modes(beams: int) -> dict[str, dict[str, Any]]:
    return {"greedy cache": dict(num_beams=1, use_cache=True), "greedy no cache": dict(num_beams=1, use_cache=False),
            f"beam {beams} cache": dict(num_beams=beams, use_cache=True)}


def timed(fn) -> tuple[float, Generated]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def bench_batch(model: VLMoE, head: MLMHead, cfg: ModelConfig, batch: int, args: argparse.Namespace,
                device: torch.device) -> dict[str, Any]:
    """Seconds per ``generate`` call of every mode (round-robin), their outputs' agreement."""
    g = torch.Generator().manual_seed(batch)
    pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    prompt = torch.full((batch, 1), BOS, dtype=torch.long, device=device)
    mask = torch.ones_like(prompt)
    calls = {}
    for name, kw in modes(args.beams).items():
        options = DecodeOptions(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        calls[name] = (lambda o=options: generate(model, head, {"image": (pixels,)}, prompt, mask,
                                                  eos_token_id=EOS, pad_token_id=PAD, options=o))
    outputs: dict[str, Generated] = {}
    for name, call in calls.items():
        for _ in range(args.warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            seconds, outputs[name] = timed(call)
            times[name].append(seconds)
    for name, out in outputs.items():
        assert out.lengths.eq(args.new_tokens).all(), (name, out.lengths)  # every sample decoded every token
    greedy, full = outputs["greedy cache"], outputs["greedy no cache"]
    return {"batch": batch, "times_s": times, "median_s": {n: statistics.median(t) for n, t in times.items()},
            "same_tokens": bool(torch.equal(greedy.tokens, full.tokens))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model, head, cfg = build(args.recipe, args.new_tokens, device)
    beam = f"beam {args.beams} cache"
    print(f"decoding {args.new_tokens} tokens, demo model (hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
          f"{cfg.moe.num_experts} experts every {cfg.moe.every}), image {cfg.image_size}px / patch "
          f"{cfg.patch_size}, prompt 1 token, fp32 on {device}, {torch.get_num_threads()} threads; "
          f"{load_line()}", flush=True)
    results, rows = [], []
    for batch in args.batch_sizes:
        res = bench_batch(model, head, cfg, batch, args, device)
        results.append(res)
        med = res["median_s"]
        tokens = batch * args.new_tokens
        rows.append([batch, tokens / med["greedy cache"], tokens / med["greedy no cache"], tokens / med[beam],
                     med["greedy no cache"] / med["greedy cache"], med[beam] / med["greedy cache"],
                     "yes" if res["same_tokens"] else "NO"])
    table = print_table(["batch", "greedy cache tok/s", "greedy no-cache tok/s", f"{beam} tok/s",
                         "cache speed-up", f"beam {args.beams} / greedy time", "same tokens"], rows)
    payload = {"args": vars(args), "device": str(device),
               "threads": torch.get_num_threads(), "model": {"hidden_size": cfg.hidden_size,
                                                             "num_layers": cfg.num_layers,
                                                             "max_text_len": cfg.max_text_len},
               "results": results, "table": table}
    if not args.quick:
        write_result("decoding", payload)
        print(f"{load_line()}; {machine()['cpu']}")
    return payload


if __name__ == "__main__":
    main()
