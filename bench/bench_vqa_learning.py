"""How fast model variants learn synth VQA from scratch: held-out accuracy per question type vs steps.

    .venv/bin/python bench/bench_vqa_learning.py                       # the variants of BENCHMARKS.md
    .venv/bin/python bench/bench_vqa_learning.py --variants cls mean --steps 400 --eval-every 100
    .venv/bin/python bench/bench_vqa_learning.py --quick               # smoke run: 2 variants, 4 steps
    .venv/bin/python bench/bench_vqa_learning.py --variants dense128 local128 --steps 300 --threads 1

Each variant runs at its model's ``image_size`` (``--canvas`` for the variants that do not set one): the synth
corpus is rendered at that canvas (``data_prep synth --canvas``, cached under runs/bench; the questions, answers
and tokenizer are those of the 64 px corpus, only the pixels differ). The ``*128`` variants are the sparse-
attention comparison of issue 22: 128 px at patch 8 is a 16 x 16 grid of 256 image tokens.

One process, no DeepSpeed, dense FFNs (``moe.every=0``): it isolates what the model and optimiser settings
do to learning speed, which the 2-rank runs of the demo cannot afford to sweep. It uses the pipeline's own
``VLMoE``, ``VQATask`` samples (tokenizer, soft targets, VQA head) and official VQA accuracy, on the
``data_prep synth`` corpus cached under runs/bench. Variants run one after another with the same seed,
data order and step budget; each prints its curve, and the JSON goes to bench/results/.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

#: name -> (ModelConfig overrides, head_lr_mult). "base" is the model of launch/recipes/vl_pretrain.yaml.
BASE_MODEL = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_fusion_layers": 2, "patch_size": 8,
              "image_size": 64, "max_text_len": 32, "pooling": "mean"}
VARIANTS: dict[str, tuple[dict[str, Any], float]] = {
    "cls_head10": ({"pooling": "cls"}, 10.0),
    "cls": ({"pooling": "cls"}, 1.0),
    "mean": ({}, 1.0),
    "mean_head10": ({}, 10.0),
    "conv_stem": ({"patch_embed": "conv_stem"}, 1.0),
    "conv_stem_p16": ({"patch_embed": "conv_stem", "patch_size": 16}, 1.0),
    "conv_stem_p16_coords": ({"patch_embed": "conv_stem", "patch_size": 16, "coord_channels": True}, 1.0),
    "coords": ({"coord_channels": True}, 1.0),
    "conv_stem_p16_coords_qknorm": ({"patch_embed": "conv_stem", "patch_size": 16, "coord_channels": True,
                                     "qk_norm": True}, 1.0),
    "wide_p8": ({"hidden_size": 192, "num_layers": 6, "num_heads": 6}, 1.0),
    # issue 22, 128 px canvas at patch 8 = 16 x 16 patches. Window 4 cuts the grid into 16 windows of 4 x 4
    # patches (32 px, a quadrant is 2 x 2 windows), shifted by 2 on odd blocks; window 8 would be only 4 windows,
    # one per quadrant, which is the quadrant structure of the synth world itself (local128_w8 checks it).
    "dense128": ({"image_size": 128}, 1.0),
    "local128": ({"image_size": 128, "attention": "local", "attention_window": 4}, 1.0),
    "local128_noshift": ({"image_size": 128, "attention": "local", "attention_window": 4,
                          "attention_shift": False}, 1.0),
    "local128_w8": ({"image_size": 128, "attention": "local", "attention_window": 8}, 1.0),
    # the last block dense (ViTDet keeps a few global blocks)
    "local128_g3": ({"image_size": 128, "attention": "local", "attention_window": 4,
                     "attention_global_layers": [3]}, 1.0),
    # 4 summary tokens after the image CLS: global tokens every window reads and writes in every block
    "local128_s4": ({"image_size": 128, "attention": "local", "attention_window": 4, "summary_tokens": 4}, 1.0),
    "local128_g3_s4": ({"image_size": 128, "attention": "local", "attention_window": 4,
                        "attention_global_layers": [3], "summary_tokens": 4}, 1.0),
    # control: one window over the whole grid is dense attention computed by the local path (same maths, other
    # float rounding), so its gap to dense128 is the run-to-run noise of this bench at one seed
    "local128_w16": ({"image_size": 128, "attention": "local", "attention_window": 16}, 1.0),
    # ToMe: 64 patches merged away after blocks 0, 1, 2 (the default token_merge_layers with 4 blocks), so the
    # blocks see 256 / 192 / 128 / 64 patches: 0.62x the patch tokens of dense over the 4 blocks
    "merge128": ({"image_size": 128, "token_merge": 64}, 1.0),
    "merge128_r32": ({"image_size": 128, "token_merge": 32}, 1.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["cls_head10", "mean", "conv_stem", "conv_stem_p16"],
                   choices=sorted(VARIANTS), help="variants to run, in order (default %(default)s)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per variant (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=100, help="eval interval in steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW lr of the body (default %(default)s)")
    p.add_argument("--num-samples", type=int, default=6000, help="synth VQA train questions (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    p.add_argument("--canvas", type=int, default=64,
                   help="image side in pixels of the variants that do not set image_size (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 variants, 4 steps, 400 samples")
    args = p.parse_args(argv)
    if args.quick:
        args.variants, args.steps, args.eval_every, args.num_samples = ["cls", "conv_stem"], 4, 4, 400
    return args


def variant_model(name: str, canvas: int) -> dict[str, Any]:
    """The ModelConfig overrides of a variant: BASE_MODEL, ``image_size`` ``canvas`` unless the variant sets one."""
    return {**BASE_MODEL, "image_size": canvas, **VARIANTS[name][0]}


def synth_at_canvas(num_samples: int, canvas: int) -> Path:
    """The synth vqa folder rendered at ``canvas`` px (64: the shared bench corpus; else its own cached copy,
    same seed, so the same scenes, questions and answers)."""
    captions, _ = common.ensure_synth(num_samples=num_samples, tokenizer_parts=("captions", "vqa"))
    if canvas == 64:
        return captions.parent / "vqa"
    data = common.BENCH_RUNS / f"synth{num_samples}_canvas{canvas}"
    if not (data / "vqa" / "manifest.json").is_file():
        common._data_prep("synth", "--output", data, "--num-samples", num_samples, "--canvas", canvas,
                          "--num-sounds", 0, "--no-progress")
    return data / "vqa"


def load_split(task: Any, folder: Path, split: str) -> list[dict[str, Any]]:
    """Every sample of ``split`` (shards from the manifest) through ``VQATask.prepare_sample``."""
    from PIL import Image

    from data_prep.shards import iter_tar_samples, manifest_shards
    samples = []
    for _, shard in (item for item in manifest_shards(str(folder)) if item[0] == split):
        for _, fields in iter_tar_samples(shard):
            sample = {"jpg": Image.open(io.BytesIO(fields["jpg"])).convert("RGB"), "txt": fields["txt"].decode(),
                      "json": json.loads(fields["json"])}
            samples.append(task.prepare_sample(sample, train=split == "train"))
    return samples


def run_variant(name: str, args: argparse.Namespace, train: dict, val: list[dict], tokenizer: Any,
                vqa_dir: Path) -> dict[str, Any]:
    import torch

    from pipeline.model import ModelConfig, MoEConfig, VLMoE
    from pipeline.tasks.base import TaskContext
    from pipeline.tasks.vqa import VQATask

    head_lr_mult = VARIANTS[name][1]
    model_args = variant_model(name, args.canvas)
    torch.manual_seed(0)
    cfg = ModelConfig(**model_args, vocab_size=len(tokenizer), moe=MoEConfig(every=0))
    model = VLMoE(cfg)
    task = VQATask(TaskContext(model_cfg=cfg, tokenizer=tokenizer, text_len=16, image_size=cfg.image_size,
                               data_dir=vqa_dir, objectives={"vqa": 1.0}), model)
    heads = task.heads
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": args.lr},
                             {"params": heads.parameters(), "lr": args.lr * head_lr_mult}],
                            betas=(0.9, 0.98), weight_decay=0.01)
    peaks = [g["lr"] for g in opt.param_groups]
    order = torch.Generator().manual_seed(0)
    n = len(train["pixel_values"])
    perm, pos, curve, started = torch.randperm(n, generator=order), 0, [], time.perf_counter()
    eval_seconds = 0.0
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=order), 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        scale = min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group, peak in zip(opt.param_groups, peaks):
            group["lr"] = peak * scale
        batch = {k: v[idx] for k, v in train.items()}
        loss = task(batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *heads.parameters()], 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            tick = time.perf_counter()
            point = {"step": step, "train_loss": round(float(loss.detach()), 4),
                     "seconds": round(tick - started, 1), **evaluate(task, val)}
            eval_seconds += time.perf_counter() - tick
            curve.append(point)
            print(f"  {name:14s} step {step:5d} {point['seconds']:7.1f}s  overall {point['overall']:.3f}  "
                  + "  ".join(f"{t} {a:.3f}" for t, a in sorted(point["by_question_type"].items())), flush=True)
    train_s_per_step = (time.perf_counter() - started - eval_seconds) / args.steps
    return {"variant": name, "model": model_args, "head_lr_mult": head_lr_mult, "curve": curve,
            "train_s_per_step": round(train_s_per_step, 4)}


def evaluate(task: Any, val: list[dict]) -> dict[str, Any]:
    """Official VQA accuracy overall and the exact-match rate per synth question type."""
    import torch
    task.eval()
    outputs: dict[str, list] = {"pred": [], "answers": [], "answer_type": [], "question_type": []}
    with torch.no_grad():
        for start in range(0, len(val), 200):
            batch = task.collate(val[start:start + 200])
            out = task.eval_outputs(batch)
            for key in outputs:
                outputs[key] += list(out[key])
    task.train()
    outputs["pred"] = torch.stack(outputs["pred"])
    overall = task.metrics(outputs)["acc"]
    predicted = task.answer_strings(outputs)
    by_type: dict[str, list[bool]] = {}
    for answer, answers, qtype in zip(predicted, outputs["answers"], outputs["question_type"]):
        by_type.setdefault(qtype, []).append(answer == answers[0])
    accuracy = {t: round(sum(v) / len(v), 4) for t, v in by_type.items()}
    return {"overall": round(overall, 4), "by_question_type": accuracy}


def load_corpus(vqa_dir: Path, tokenizer: Any, image_size: int) -> tuple[dict[str, Any], list[dict]]:
    """(train tensors stacked, val samples) of a synth vqa folder at ``image_size``."""
    import torch

    from pipeline.model import ModelConfig
    from pipeline.tasks.base import TaskContext
    from pipeline.tasks.vqa import VQATask
    loader = VQATask(TaskContext(model_cfg=ModelConfig(image_size=image_size), tokenizer=tokenizer, text_len=16,
                                 image_size=image_size, data_dir=vqa_dir, objectives={"vqa": 1.0}))
    train_samples = load_split(loader, vqa_dir, "train")
    train = {k: torch.stack([s[k] for s in train_samples])
             for k in ("pixel_values", "input_ids", "attention_mask", "targets")}
    return train, load_split(loader, vqa_dir, "val")


def print_tables(runs: list[dict[str, Any]]) -> None:
    """Overall accuracy per eval point and seconds per step; accuracy per question type at the end, and each
    variant minus the reference (``dense128`` when it ran, else the first variant) at the same image size."""
    print(f"\n| variant | " + " | ".join(f"step {p['step']}" for p in runs[0]["curve"]) + " | s/step |")
    print("|---|" + "---|" * (len(runs[0]["curve"]) + 1))
    for run in runs:
        print(f"| {run['variant']} | " + " | ".join(f"{p['overall']:.3f}" for p in run["curve"])
              + f" | {run['train_s_per_step']:.3f} |")
    types = sorted(runs[0]["curve"][-1]["by_question_type"])
    names = [run["variant"] for run in runs]
    reference = runs[names.index("dense128") if "dense128" in names else 0]
    print(f"\n| variant (step {runs[0]['curve'][-1]['step']}) | overall | " + " | ".join(types)
          + f" | overall - {reference['variant']} |")
    print("|---|" + "---|" * (len(types) + 2))
    for run in runs:
        last = run["curve"][-1]
        same = run["model"]["image_size"] == reference["model"]["image_size"]
        delta = f"{last['overall'] - reference['curve'][-1]['overall']:+.3f}" if same else "-"
        print(f"| {run['variant']} | {last['overall']:.3f} | "
              + " | ".join(f"{last['by_question_type'].get(t, float('nan')):.3f}" for t in types) + f" | {delta} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    # the tokenizer must know the questions' words too, not only the captions'
    _, tokenizer_dir = common.ensure_synth(num_samples=args.num_samples, tokenizer_parts=("captions", "vqa"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    corpora: dict[int, tuple[Path, dict[str, Any], list[dict]]] = {}
    runs = []
    for name in args.variants:
        size = variant_model(name, args.canvas)["image_size"]
        if size not in corpora:
            vqa_dir = synth_at_canvas(args.num_samples, size)
            corpora[size] = (vqa_dir, *load_corpus(vqa_dir, tokenizer, size))
            print(f"bench_vqa_learning: {size} px, {len(corpora[size][1]['pixel_values'])} train / "
                  f"{len(corpora[size][2])} val questions, {args.steps} steps of {args.batch_size}, lr {args.lr}, "
                  f"{args.threads} threads", flush=True)
        vqa_dir, train, val = corpora[size]
        runs.append(run_variant(name, args, train, val, tokenizer, vqa_dir))
    print_tables(runs)
    common.write_result("vqa_learning", {"args": vars(args), "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
