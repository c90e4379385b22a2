"""VQA fine-tuning as in VLMo: a classifier over the answer vocabulary on the joint CLS, trained with
binary cross-entropy against the soft scores (loss x A), predicting the argmax answer string.

The answer vocabulary is the training folder's ``answers.json``; eval scores the predicted string against
the sample's raw human answers, so an eval folder with another vocabulary is scored correctly (answers
the training vocabulary lacks simply score 0).

Shape letters: B batch, L text length, D hidden, A answers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.metrics.vqa import baseline_predictions, question_type_baseline, vqa_accuracy
from pipeline.tasks.base import LossOutput, SkipSample, Task
from pipeline.tasks.baselines import train_records
from pipeline.tasks.downstream_common import (blank_image, blank_text, image_tensor, read_json_file,
                                              sample_json, tokenize, warn_if_unscored)


HEAD = "vqa"  # the classifier's key in ``heads`` (also GQA's: checkpoints name it heads.vqa.*)


def vqa_head(hidden: int, num_answers: int) -> nn.Module:
    """VLMo's VQA classifier: Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, A)."""
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.LayerNorm(2 * hidden), nn.GELU(),
                         nn.Linear(2 * hidden, num_answers))


def soft_target_vector(targets: dict[str, float], answer_index: dict[str, int]) -> torch.Tensor:
    """``{normalised answer: soft score}`` -> [A]; answers outside the vocabulary are dropped."""
    vec = torch.zeros(len(answer_index))
    for answer, score in targets.items():
        idx = answer_index.get(answer)
        if idx is not None:
            vec[idx] = float(score)
    return vec


class VQATask(Task):
    name = "vqa"
    fields = ("jpg", "txt", "json")
    manifest_tasks = ("vqa",)
    vocab_files = ("answers.json",)
    objectives = {"vqa": 1.0}
    headline = "acc"

    def setup(self) -> None:
        self.answers: list[str] = read_json_file(self.ctx.data_dir, "answers.json", "answers", self.name)
        self.answer_index = {a: i for i, a in enumerate(self.answers)}

    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        return nn.ModuleDict({HEAD: vqa_head(self.ctx.model_cfg.hidden_size, len(self.answers))})

    def question_inputs(self, sample: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(the sample's json, {pixel_values, input_ids, attention_mask} of image + question)."""
        meta = sample_json(sample)
        question = sample.get("txt") or meta.get("question")
        if not question:
            raise SkipSample("missing_question")
        ids, mask = tokenize(self.ctx.tokenizer, [question], self.ctx.text_len)
        return meta, {"pixel_values": image_tensor(sample.get("jpg"), self.ctx.image_size),
                      "input_ids": ids[0], "attention_mask": mask[0]}

    def blank_inputs(self) -> dict[str, torch.Tensor]:
        ids, mask = blank_text(self.ctx.text_len)
        return {"pixel_values": blank_image(self.ctx.image_size), "input_ids": ids, "attention_mask": mask}

    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        meta, inputs = self.question_inputs(sample)
        return {
            **inputs, "targets": soft_target_vector(meta.get("targets") or {}, self.answer_index),
            "question_id": int(meta.get("question_id", -1)),
            "answers": list(meta.get("answers") or []),
            "answer_type": str(meta.get("answer_type") or ""),  # empty: no per-type accuracy
            "question_type": str(meta.get("question_type") or "unknown"),
        }

    def padding_sample(self) -> dict[str, Any]:
        return {**self.blank_inputs(), "targets": torch.zeros(len(self.answers)), "question_id": -1,
                "answers": [], "answer_type": "padding", "question_type": "padding"}

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """[B, A] answer logits of one fused pass (image + question)."""
        out = self.model.fuse(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        return self.heads[HEAD](out.pooled).float()

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        logits = self.logits(batch)
        targets = batch["targets"].float()
        # VLMo: mean BCE over B x A, times A (= sum over answers, mean over questions)
        bce = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        score = targets.gather(1, logits.argmax(dim=1, keepdim=True)).mean()
        return LossOutput(self.weights["vqa"] * bce, {"vqa_bce": bce.detach(), "vqa_score": score.detach()})

    @torch.no_grad()
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.logits(batch)
        return {"pred": logits.argmax(dim=1), "question_id": list(batch["question_id"]),
                "answers": list(batch["answers"]), "answer_type": list(batch["answer_type"]),
                "question_type": list(batch["question_type"])}

    def answer_strings(self, outputs: dict[str, Any]) -> list[str]:
        return [self.answers[int(i)] for i in torch.as_tensor(outputs["pred"]).tolist()]

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        return warn_if_unscored(vqa_accuracy(self.answer_strings(outputs), outputs["answers"],
                                             outputs["answer_type"]), self.name)

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"question_id": int(q), "answer": a}
                for q, a in zip(outputs["question_id"], self.answer_strings(outputs))]

    def baseline(self, outputs: dict[str, Any], data_dir: Path) -> tuple[str, dict[str, float]]:
        """The question-only baseline: the most frequent train answer per question type (train split of the
        same data folder), scored with the official accuracy on the evaluated questions."""
        records = train_records(data_dir)
        if records is None:
            return "q-type prior", {}
        table, fallback = question_type_baseline(
            (str(r.get("question_type", "unknown")), r.get("answers") or []) for r in records)
        preds = baseline_predictions(outputs["question_type"], table, fallback)
        return "q-type prior", vqa_accuracy(preds, outputs["answers"], outputs["answer_type"])
