"""The reference figure printed next to each downstream score by ``pipeline.evaluate``.

- vqa: the question-only baseline, most frequent train answer per question type (train split of the
  same data folder), scored with the official accuracy on the evaluated questions.
- retrieval: chance level of R@K for the split's image and caption counts.
- nlvr2: always answering the majority train label.
- classification: chance level (K / classes).
- gqa: the most frequent train answer per question type, scored with exact match.
- snli_ve: always answering the majority train label (by label name, mapped to the task's classes).
"""
from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.metrics.classification import class_accuracy
from pipeline.metrics.gqa import gqa_accuracy
from pipeline.metrics.nlvr2 import nlvr2_metrics
from pipeline.metrics.retrieval import chance_recall
from pipeline.metrics.vqa import (baseline_predictions, most_frequent_by_type, question_type_baseline,
                                  vqa_accuracy)

log = logging.getLogger(__name__)
BASELINE_SPLIT = "train"


def split_json_records(data_dir: Path, split: str) -> Iterator[dict[str, Any]]:
    """The ``<key>.json`` records of one split, read straight from the tars (images are not decoded)."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(data_dir / shard) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    yield json.load(tar.extractfile(member))


def has_split(data_dir: Path, split: str) -> bool:
    path = data_dir / "manifest.json"
    return path.is_file() and split in json.loads(path.read_text()).get("splits", {})


def baseline_for(task_name: str, task: Any, outputs: dict[str, Any], data_dir: Path
                 ) -> tuple[str, dict[str, float]]:
    """(baseline name, metrics of the baseline with the task's metric names)."""
    if task_name == "retrieval":
        k = task.captions_per_image
        return "chance", chance_recall(len(outputs["image_emb"]), k)
    if task_name == "classification":
        c = outputs["logits"].shape[1]
        return "chance", {"top1": 1 / c, "top5": min(5, c) / c}
    if not has_split(data_dir, BASELINE_SPLIT):
        log.warning("%s has no %s split: no baseline", data_dir, BASELINE_SPLIT)
        return "baseline", {}
    records = split_json_records(data_dir, BASELINE_SPLIT)
    if task_name == "vqa":
        table, fallback = question_type_baseline(
            (str(r.get("question_type", "unknown")), r.get("answers") or []) for r in records)
        preds = baseline_predictions(outputs["question_type"], table, fallback)
        return "q-type prior", vqa_accuracy(preds, outputs["answers"], outputs["answer_type"])
    if task_name == "nlvr2":
        labels = [str(r.get("label")).lower() == "true" for r in records]
        majority = sum(labels) * 2 >= len(labels)
        truth = [bool(y) for y in outputs["label"].tolist()]
        return "majority", nlvr2_metrics([majority] * len(truth), truth, outputs["identifier"])
    if task_name == "gqa":
        table, fallback = most_frequent_by_type(
            (str(r.get("question_type") or ""), str(r["answer"])) for r in records if r.get("answer"))
        preds = baseline_predictions(outputs["question_type"], table, fallback)
        return "q-type prior", gqa_accuracy(preds, outputs["answer"], outputs["question_type"])
    if task_name == "snli_ve":
        _, majority = most_frequent_by_type(("", str(r.get("label_name"))) for r in records)
        labels = [int(y) for y in outputs["label"].tolist()]
        pred = task.class_index.get(majority, -1)
        return "majority", class_accuracy([pred] * len(labels), labels, task.classes)
    return "baseline", {}
