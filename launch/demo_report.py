"""Collect the demo's evaluation results into one ``metrics.json`` and print the final table.

    python -m launch.demo_report --demo-dir runs/demo

Reads the JSON files ``pipeline.evaluate`` wrote (``DEMO/eval/{vqa,retrieval,captioning,audio_retrieval}.json``),
leads each task's entry with its task class's ``headline`` metric and writes ``DEMO/metrics.json``:
``{"vqa": {"accuracy", "baseline", ...}, "retrieval": {"t2i_r1", "t2i_r5", ..., "baseline_t2i_r5"}, ...}``.
Exits non-zero if an evaluation file is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# the files launch/demo.sh has pipeline.evaluate write (DEMO/eval/<stem>.json)
DEMO_EVALS = ("vqa", "retrieval", "captioning", "audio_retrieval")
ALIASES = {"acc": "accuracy"}  # a headline metric's key in metrics.json when it differs from the metric's


def headline_of(eval_result: dict, path: Path) -> str:
    """The headline metric of the task that ``path`` (a ``pipeline.evaluate`` result) evaluated."""
    from pipeline.tasks import get_task_class

    headline = get_task_class(eval_result["task"]).headline
    if headline is None:
        raise ValueError(f"{path}: task {eval_result['task']!r} has no headline metric (no evaluation of its own)")
    return headline


def summarize(eval_result: dict, headline: str, alias: str) -> dict[str, float]:
    """Flatten one ``pipeline.evaluate`` result into the demo's metrics entry (fractions, not %)."""
    metrics = dict(eval_result["metrics"])
    baseline = eval_result.get("baseline", {}).get("metrics", {})
    out = {alias: metrics[headline]} if headline in metrics else {}
    out.update({k: v for k, v in metrics.items() if k != headline or alias == headline})
    if headline in baseline:
        out["baseline"] = baseline[headline]
    out["baseline_name"] = eval_result.get("baseline", {}).get("name", "")
    for key, value in baseline.items():
        out[f"baseline_{key}"] = value
    return out


def build_report(demo_dir: Path) -> dict[str, dict]:
    report = {}
    for stem in DEMO_EVALS:
        path = demo_dir / "eval" / f"{stem}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run `make demo` (or pipeline.evaluate) first")
        result = json.loads(path.read_text())
        headline = headline_of(result, path)
        report[result["task"]] = summarize(result, headline, ALIASES.get(headline, headline))
    return report


def heldout_rows(demo_dir: Path) -> list[dict]:
    """The demo's held-out questions answered by the export (``DEMO/heldout``: samples.jsonl from
    ``data_prep extract``, answers.jsonl from ``pipeline.predict``), matched by id; [] when absent."""
    samples, answers = demo_dir / "heldout" / "samples.jsonl", demo_dir / "heldout" / "answers.jsonl"
    if not (samples.is_file() and answers.is_file()):
        return []
    truth = {line["id"]: line for line in map(json.loads, samples.read_text().splitlines())}
    rows = []
    for answer in map(json.loads, answers.read_text().splitlines()):
        sample = truth.get(answer["id"], {})
        answers_given = sample.get("truth", {}).get("answers") or []
        rows.append({"id": answer["id"], "question": sample.get("question", ""),
                     "truth": max(set(answers_given), key=answers_given.count) if answers_given else "",
                     "answer": answer.get("answer", answer.get("error", "")),
                     "score": (answer.get("answers") or [{}])[0].get("score"), "generated": answer.get("generated")})
    return rows


def format_heldout(rows: list[dict], demo_dir: Path) -> list[str]:
    lines = ["", f"held-out questions through the export ({demo_dir / 'export' / 'vqa'}, no DeepSpeed):"]
    for row in rows:
        score = f" ({row['score']:.2f})" if isinstance(row["score"], float) else ""
        lines.append(f"  {row['question']}  truth: {row['truth']}  predicted: {row['answer']}{score}  "
                     f"generated: {row['generated']}")
    pictures = sorted((demo_dir / "explain").glob("routing_*.png"))
    if pictures:
        lines.append(f"routing pictures (expert per image patch, per MoE layer): {pictures[0].parent}/"
                     f"{{{','.join(p.name for p in pictures)}}}")
    return lines


def format_report(report: dict[str, dict], demo_dir: Path) -> str:
    rows = [("task", "metric", "score", "baseline")]
    for task, values in report.items():
        for key, value in values.items():
            if key.startswith("baseline") or key.startswith("num_") or not isinstance(value, float):
                continue
            base = values.get("baseline") if key == "accuracy" else values.get(f"baseline_{key}")
            rows.append((task, key, f"{100 * value:.1f}", f"{100 * base:.1f}" if base is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.extend(format_heldout(heldout_rows(demo_dir), demo_dir))
    lines.append("")
    lines.append(f"metrics: {demo_dir / 'metrics.json'}")
    lines.append(f"tensorboard: tensorboard --logdir {demo_dir}  (one subfolder per stage)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.demo_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("runs/demo"), help="the demo's output folder")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.demo_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (args.demo_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report, args.demo_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
