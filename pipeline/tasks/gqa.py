"""GQA (balanced) as a VQA-style classifier: the VQA head over the training folder's ``answers.json``,
trained with softmax cross-entropy on the single gold answer; metric: GQA's exact-match accuracy
overall and per ``question_type``; predictions in GQA's submission format
``[{"questionId", "prediction"}]``.

A training sample whose answer is not in the vocabulary is skipped (counted as
``answer_not_in_vocabulary``); at eval it is scored against its gold string, so it counts as wrong.

Shape letters: B batch, A answers.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.metrics.gqa import gqa_accuracy
from pipeline.tasks.base import LossOutput, SkipSample
from pipeline.tasks.downstream_common import cross_entropy_loss, warn_if_unscored
from pipeline.tasks.vqa import VQATask

NO_LABEL = -1  # eval sample with an unknown or absent answer (never a cross-entropy target)


class GQATask(VQATask):
    name = "gqa"
    manifest_tasks = ("gqa",)

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

    def training_loss(self, model: nn.Module, heads: nn.ModuleDict, batch: dict[str, Any]) -> LossOutput:
        logits, out = self._logits(model, heads, batch)
        return cross_entropy_loss(logits, batch["label"], "gqa", out.aux_loss, out.expert_counts)

    @torch.no_grad()
    def eval_outputs(self, model: nn.Module, heads: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, Any]:
        logits, _ = self._logits(model, heads, batch)
        return {"pred": logits.argmax(dim=1), "question_id": list(batch["question_id"]),
                "answer": list(batch["answer"]), "question_type": list(batch["question_type"])}

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        return warn_if_unscored(gqa_accuracy(self.answer_strings(outputs), outputs["answer"],
                                             outputs["question_type"]), self.name)

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, str]]:
        return [{"questionId": str(q), "prediction": a}
                for q, a in zip(outputs["question_id"], self.answer_strings(outputs))]
