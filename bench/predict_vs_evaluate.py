"""Does ``pipeline.predict`` on an export reproduce ``pipeline.evaluate`` on its checkpoint? VQA, first N questions.

    python bench/predict_vs_evaluate.py --model /tmp/vqa_export --data runs/demo/data/vqa \\
        --checkpoint runs/demo/vqa --limit 100 --workdir /tmp/pve [--cwd /path/the/run/paths/are/relative/to]

The first ``--limit`` samples of the split (read with webdataset, in shard order) are written twice: as a
data folder of one shard (so ``pipeline.evaluate`` sees exactly these questions, in the same batches) and as
images + a JSONL for ``pipeline.predict``. Both run with ``--batch-size``; the bench prints and writes
(``WORKDIR/result.json``) the official VQA accuracy both ways, how many answers agree, the export's load time
and predictions/s (in-process, CPU unless ``--device``), and the CLI's wall-clock seconds. Exit 1 when the
accuracies or any answer differ. ``--eval-capacity-factor`` goes to evaluate (use the one the export has).
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def write_subset(data: Path, split: str, limit: int, workdir: Path) -> list[dict[str, Any]]:
    """The first ``limit`` samples (0: all) as WORKDIR/data (one shard, manifest, answers.json) and
    WORKDIR/images + WORKDIR/questions.jsonl; returns their ground truth."""
    import webdataset as wds

    manifest = json.loads((data / "manifest.json").read_text())
    shards = [str(data / name) for name in manifest["splits"][split]["shards"]]
    subset, images = workdir / "data", workdir / "images"
    for folder in (subset, images):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    truth, lines = [], []
    with tarfile.open(subset / f"{split}-000000.tar", "w") as tar:
        for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
            if limit and len(truth) == limit:
                break
            for ext in ("jpg", "txt", "json"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(sample[ext])
                tar.addfile(info, io.BytesIO(sample[ext]))
            meta = json.loads(sample["json"])
            (images / f"{sample['__key__']}.jpg").write_bytes(sample["jpg"])
            question = sample["txt"].decode("utf-8") if sample.get("txt") else meta["question"]
            lines.append({"id": meta["question_id"], "image": f"images/{sample['__key__']}.jpg", "question": question})
            truth.append({"question_id": meta["question_id"], "answers": meta.get("answers") or [],
                          "answer_type": meta.get("answer_type") or ""})
    (workdir / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    manifest = {k: v for k, v in manifest.items() if k != "checksums"}
    manifest["splits"] = {split: {**manifest["splits"][split], "shards": [f"{split}-000000.tar"],
                                  "num_samples": len(truth)}}
    (subset / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (subset / "sizes.json").write_text(json.dumps({f"{split}-000000.tar": len(truth)}))
    for name in manifest.get("files", {}).values():
        shutil.copy(data / name, subset / name)
    return truth


def run_predict(args: argparse.Namespace, workdir: Path) -> tuple[dict[int, str], dict[str, float]]:
    """(question id -> answer, timings): in-process load and prediction, then the CLI end to end."""
    from pipeline.predict import Predictor, parse_args, read_items, run_batches

    items = read_items(workdir / "questions.jsonl")
    started = time.perf_counter()
    predictor = Predictor(Path(args.model), args.device)
    loaded = time.perf_counter()
    cli = parse_args(["--model", args.model, "--input", str(workdir / "questions.jsonl"), "--batch-size",
                      str(args.batch_size), "--no-progress"])
    rows = list(run_batches(predictor, items, cli, "vqa"))
    done = time.perf_counter()
    errors = [r for r in rows if "error" in r]
    if errors:
        raise SystemExit(f"predict failed on {len(errors)} items, e.g. {errors[0]}")
    wall = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.predict", "--model", args.model, "--input",
                           str(workdir / "questions.jsonl"), "--output", str(workdir / "predict.jsonl"),
                           "--batch-size", str(args.batch_size), "--no-progress", "--device", args.device],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pipeline.predict CLI failed:\n{proc.stderr[-3000:]}")
    cli_rows = [json.loads(line) for line in (workdir / "predict.jsonl").read_text().splitlines()]
    if [r["answer"] for r in cli_rows] != [r["answer"] for r in rows]:
        raise SystemExit("the CLI's answers differ from the in-process run's")
    timings = {"load_seconds": round(loaded - started, 3), "predict_seconds": round(done - loaded, 3),
               "predictions_per_second": round(len(rows) / (done - loaded), 2),
               "cli_wall_seconds": round(time.perf_counter() - wall, 2)}
    return {int(r["id"]): r["answer"] for r in rows}, timings


def run_evaluate(args: argparse.Namespace, workdir: Path, split: str) -> tuple[dict[int, str], dict[str, Any]]:
    """pipeline.evaluate (this repo's code, run from ``--cwd`` so the run's relative paths resolve)."""
    out = workdir / "evaluate.json"
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from pipeline.evaluate import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, "--checkpoint", args.checkpoint, "--task", "vqa", "--data",
           str(workdir / "data"), "--split", split, "--batch-size", str(args.batch_size), "--output", str(out),
           "--no-progress"]
    if args.eval_capacity_factor is not None:
        cmd += ["--eval-capacity-factor", str(args.eval_capacity_factor)]
    proc = subprocess.run(cmd, cwd=args.cwd or ".", capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pipeline.evaluate failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    predictions = json.loads(Path(result["predictions"]).read_text())
    return {int(p["question_id"]): p["answer"] for p in predictions}, result["metrics"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="export folder (python -m pipeline.export)")
    p.add_argument("--data", required=True, help="VQA data_prep folder")
    p.add_argument("--checkpoint", required=True, help="the run the export came from (for pipeline.evaluate)")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=100, help="first N questions (0: the whole split)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-capacity-factor", type=float, default=None)
    p.add_argument("--workdir", required=True)
    p.add_argument("--cwd", default=None, help="folder the run's relative paths are relative to")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.model = str(Path(args.model).resolve())
    truth = write_subset(Path(args.data).resolve(), args.split, args.limit, workdir)
    from pipeline.metrics.vqa import vqa_accuracy

    predicted, timings = run_predict(args, workdir)
    evaluated, metrics = run_evaluate(args, workdir, args.split)
    ids = [t["question_id"] for t in truth]
    answers, types = [t["answers"] for t in truth], [t["answer_type"] for t in truth]
    acc_predict = vqa_accuracy([predicted[q] for q in ids], answers, types)["acc"]
    acc_recomputed = vqa_accuracy([evaluated[q] for q in ids], answers, types)["acc"]
    agree = sum(predicted[q] == evaluated[q] for q in ids)
    result = {"questions": len(ids), "batch_size": args.batch_size, "acc_predict": acc_predict,
              "acc_evaluate": metrics["acc"], "acc_evaluate_predictions_rescored": acc_recomputed,
              "answers_agree": agree, **timings, "model": args.model, "checkpoint": args.checkpoint}
    (workdir / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    same = acc_predict == metrics["acc"] and agree == len(ids)
    print("REPRODUCED exactly" if same else "DIFFERENT", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
