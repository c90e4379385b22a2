"""SNLI-VE (visual entailment): image premise + text hypothesis -> entailment / neutral / contradiction.
One fuse pass, the pooled joint output -> Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, C) (the VQA
classifier shape), cross-entropy; metric accuracy overall and per class; predictions
``[{"pair_id", "prediction": label name}]``.

The classes are the training folder's ``classes.json``; a sample's class is its ``label_name`` looked up
there (else its integer ``label``), as for image classification.

Shape letters: B batch, D hidden, C classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.metrics.classification import class_accuracy
from pipeline.metrics.vqa import most_frequent_by_type
from pipeline.tasks.base import LossOutput, SkipSample, Task
from pipeline.tasks.baselines import train_records
from pipeline.tasks.classification import sample_label, training_classes
from pipeline.tasks.downstream_common import (blank_image, blank_text, cross_entropy_loss, image_tensor,
                                              sample_json, tokenize)
from pipeline.tasks.vqa import vqa_head


class SNLIVETask(Task):
    name = "snli_ve"
    fields = ("jpg", "txt", "json")
    manifest_tasks = ("snli_ve",)
    vocab_files = ("classes.json",)
    objectives = {"snli_ve": 1.0}
    headline = "acc"

    def setup(self) -> None:
        self.classes, self.class_index = training_classes(self.ctx, self.name)

    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        return nn.ModuleDict({"snli_ve": vqa_head(self.ctx.model_cfg.hidden_size, len(self.classes))})

    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        meta = sample_json(sample)
        hypothesis = sample.get("txt") or meta.get("hypothesis")
        if not hypothesis:
            raise SkipSample("missing_hypothesis")
        ids, mask = tokenize(self.ctx.tokenizer, [hypothesis], self.ctx.text_len)
        return {"pixel_values": image_tensor(sample.get("jpg"), self.ctx.image_size),
                "input_ids": ids[0], "attention_mask": mask[0],
                "label": torch.tensor(sample_label(sample, self.class_index, train)),
                "pair_id": str(meta.get("pair_id", sample.get("__key__", "")))}

    def padding_sample(self) -> dict[str, Any]:
        ids, mask = blank_text(self.ctx.text_len)
        return {"pixel_values": blank_image(self.ctx.image_size), "input_ids": ids, "attention_mask": mask,
                "label": torch.tensor(0), "pair_id": ""}

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        out = self.model.fuse(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        return self.heads["snli_ve"](out.pooled).float()

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        loss, terms = cross_entropy_loss(self.logits(batch), batch["label"], "snli_ve")
        return LossOutput(self.weights["snli_ve"] * loss, terms)

    @torch.no_grad()
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.logits(batch)
        return {"pred": logits.argmax(dim=1), "label": batch["label"].long(), "pair_id": list(batch["pair_id"])}

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        preds = [int(p) for p in torch.as_tensor(outputs["pred"]).tolist()]
        labels = [int(y) for y in torch.as_tensor(outputs["label"]).tolist()]
        return class_accuracy(preds, labels, self.classes)

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, str]]:
        return [{"pair_id": pair, "prediction": self.classes[int(p)]}
                for pair, p in zip(outputs["pair_id"], torch.as_tensor(outputs["pred"]).tolist())]

    def baseline(self, outputs: dict[str, Any], data_dir: Path) -> tuple[str, dict[str, float]]:
        """Always the majority train label (by label name, mapped to the task's classes)."""
        records = train_records(data_dir)
        if records is None:
            return "majority", {}
        _, majority = most_frequent_by_type(("", str(r.get("label_name"))) for r in records)
        labels = [int(y) for y in outputs["label"].tolist()]
        pred = self.class_index.get(majority, -1)
        return "majority", class_accuracy([pred] * len(labels), labels, self.classes)
