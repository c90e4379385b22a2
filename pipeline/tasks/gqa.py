"""GQA (balanced) as a VQA-style classifier: the VQA head over the training folder's ``answers.json``,
trained with softmax cross-entropy on the single gold answer; metric: GQA's exact-match accuracy
overall and per ``question_type``; predictions in GQA's submission format
``[{"questionId", "prediction"}]``.

A training sample whose answer is not in the vocabulary is skipped (counted as
``answer_not_in_vocabulary``); at eval it is scored against its gold string, so it counts as wrong.

Shape letters: B batch, A answers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.metrics.gqa import gqa_accuracy
from pipeline.metrics.vqa import baseline_predictions, most_frequent_by_type
from pipeline.tasks.base import LossOutput, NoOptions, SkipSample
from pipeline.tasks.baselines import train_records
from pipeline.tasks.downstream_common import cross_entropy_loss, warn_if_unscored
from pipeline.tasks.vqa import VQATask

NO_LABEL = -1  # eval sample with an unknown or absent answer (never a cross-entropy target)


class GQATask(VQATask):
    name = "gqa"
    manifest_tasks = ("gqa",)
    Options = NoOptions  # VQA's answer-generation options do not apply: GQA has no answer LM
    objectives = {"gqa": 1.0}

    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        meta, inputs = self.question_inputs(sample)
        answer = str(meta.get("answer") or "")
        label = self.answer_index.get(answer, NO_LABEL)
        if train and not answer:
            raise SkipSample("missing_answer")
        if train and label == NO_LABEL:
            raise SkipSample("answer_not_in_vocabulary")
        return {**inputs, "label": torch.tensor(label), "answer": answer,
                "question_id": str(meta.get("question_id", sample.get("__key__", ""))),
                "question_type": str(meta.get("question_type") or "")}

    def padding_sample(self) -> dict[str, Any]:
        return {**self.blank_inputs(), "label": torch.tensor(0), "answer": "", "question_id": "",
                "question_type": ""}

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        loss, terms = cross_entropy_loss(self.logits(batch), batch["label"], "gqa")
        return LossOutput(self.weights["gqa"] * loss, terms)

    @torch.no_grad()
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.logits(batch)
        return {"pred": logits.argmax(dim=1), "question_id": list(batch["question_id"]),
                "answer": list(batch["answer"]), "question_type": list(batch["question_type"])}

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        return warn_if_unscored(gqa_accuracy(self.answer_strings(outputs), outputs["answer"],
                                             outputs["question_type"]), self.name)

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, str]]:
        return [{"questionId": str(q), "prediction": a}
                for q, a in zip(outputs["question_id"], self.answer_strings(outputs))]

    def baseline(self, outputs: dict[str, Any], data_dir: Path) -> tuple[str, dict[str, float]]:
        """The most frequent train answer per question type, scored with exact match."""
        records = train_records(data_dir)
        if records is None:
            return "q-type prior", {}
        table, fallback = most_frequent_by_type(
            (str(r.get("question_type") or ""), str(r["answer"])) for r in records if r.get("answer"))
        preds = baseline_predictions(outputs["question_type"], table, fallback)
        return "q-type prior", gqa_accuracy(preds, outputs["answer"], outputs["question_type"])
