"""How fast model variants learn synth VQA from scratch: held-out accuracy per question type vs steps.

    .venv/bin/python bench/bench_vqa_learning.py                       # the variants of BENCHMARKS.md
    .venv/bin/python bench/bench_vqa_learning.py --variants cls mean --steps 400 --eval-every 100
    .venv/bin/python bench/bench_vqa_learning.py --quick               # smoke run: 2 variants, 4 steps

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
    p.add_argument("--quick", action="store_true", help="smoke run: 2 variants, 4 steps, 400 samples")
    args = p.parse_args(argv)
    if args.quick:
        args.variants, args.steps, args.eval_every, args.num_samples = ["cls", "conv_stem"], 4, 4, 400
    return args


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

    overrides, head_lr_mult = VARIANTS[name]
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE_MODEL, **overrides, "vocab_size": len(tokenizer)}, moe=MoEConfig(every=0))
    model = VLMoE(cfg)
    task = VQATask(TaskContext(model_cfg=cfg, tokenizer=tokenizer, text_len=16, image_size=64,
                               data_dir=vqa_dir, objectives={"vqa": 1.0}), model)
    heads = task.heads
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": args.lr},
                             {"params": heads.parameters(), "lr": args.lr * head_lr_mult}],
                            betas=(0.9, 0.98), weight_decay=0.01)
    peaks = [g["lr"] for g in opt.param_groups]
    order = torch.Generator().manual_seed(0)
    n = len(train["pixel_values"])
    perm, pos, curve, started = torch.randperm(n, generator=order), 0, [], time.perf_counter()
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
            point = {"step": step, "train_loss": round(float(loss), 4),
                     "seconds": round(time.perf_counter() - started, 1), **evaluate(task, val)}
            curve.append(point)
            print(f"  {name:14s} step {step:5d} {point['seconds']:7.1f}s  overall {point['overall']:.3f}  "
                  + "  ".join(f"{t} {a:.3f}" for t, a in sorted(point["by_question_type"].items())), flush=True)
    return {"variant": name, "model": {**BASE_MODEL, **overrides}, "head_lr_mult": head_lr_mult, "curve": curve}


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from pipeline.model import ModelConfig
    from pipeline.tasks.base import TaskContext
    from pipeline.tasks.vqa import VQATask

    torch.set_num_threads(args.threads)
    # the tokenizer must know the questions' words too, not only the captions'
    captions, tokenizer_dir = common.ensure_synth(num_samples=args.num_samples,
                                                  tokenizer_parts=("captions", "vqa"))
    vqa_dir = captions.parent / "vqa"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    loader = VQATask(TaskContext(model_cfg=ModelConfig(), tokenizer=tokenizer, text_len=16, image_size=64,
                                 data_dir=vqa_dir, objectives={"vqa": 1.0}))
    train_samples = load_split(loader, vqa_dir, "train")
    val = load_split(loader, vqa_dir, "val")
    train = {k: torch.stack([s[k] for s in train_samples])
             for k in ("pixel_values", "input_ids", "attention_mask", "targets")}
    print(f"bench_vqa_learning: {len(train_samples)} train / {len(val)} val questions, {args.steps} steps of "
          f"{args.batch_size}, lr {args.lr}, {args.threads} threads", flush=True)
    runs = [run_variant(name, args, train, val, tokenizer, vqa_dir) for name in args.variants]
    print(f"\n| variant | " + " | ".join(f"step {p['step']}" for p in runs[0]["curve"]) + " | s/step |")
    print("|---|" + "---|" * (len(runs[0]["curve"]) + 1))
    for run in runs:
        last = run["curve"][-1]
        print(f"| {run['variant']} | " + " | ".join(f"{p['overall']:.3f}" for p in run["curve"])
              + f" | {last['seconds'] / last['step']:.3f} |")
    common.write_result("vqa_learning", {"args": vars(args), "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
