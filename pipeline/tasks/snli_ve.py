"""SNLI-VE (visual entailment): image premise + text hypothesis -> entailment / neutral / contradiction.
One fuse pass, the pooled joint output -> Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, C) (the VQA
classifier shape), cross-entropy; metric accuracy overall and per class; predictions
``[{"pair_id", "prediction": label name}]``.

The classes are the training folder's ``classes.json``; a sample's class is its ``label_name`` looked up
there (else its integer ``label``), as for image classification.

Shape letters: B batch, D hidden, C classes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.metrics.classification import class_accuracy
from pipeline.tasks.base import LossOutput, SkipSample, Task, TaskContext
from pipeline.tasks.classification import sample_label, training_classes
from pipeline.tasks.downstream_common import (blank_image, blank_text, cross_entropy_loss, image_tensor,
                                              sample_json, tokenize)
from pipeline.tasks.vqa import vqa_head


class SNLIVETask(Task):
    name = "snli_ve"
    fields = ("jpg", "txt", "json")
    manifest_tasks = ("snli_ve",)
    vocab_files = ("classes.json",)

    def __init__(self, ctx: TaskContext):
        super().__init__(ctx)
        self.classes, self.class_index = training_classes(ctx, self.name)

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

    def _logits(self, model: nn.Module, heads: nn.ModuleDict, batch: dict[str, Any]):
        out = model.fuse(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        return heads["snli_ve"](out.pooled).float(), out

    def training_loss(self, model: nn.Module, heads: nn.ModuleDict, batch: dict[str, Any]) -> LossOutput:
        logits, out = self._logits(model, heads, batch)
        return cross_entropy_loss(logits, batch["label"], "snli_ve", out.aux_loss, out.expert_counts)

    @torch.no_grad()
    def eval_outputs(self, model: nn.Module, heads: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, Any]:
        logits, _ = self._logits(model, heads, batch)
        return {"pred": logits.argmax(dim=1), "label": batch["label"].long(), "pair_id": list(batch["pair_id"])}

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        preds = [int(p) for p in torch.as_tensor(outputs["pred"]).tolist()]
        labels = [int(y) for y in torch.as_tensor(outputs["label"]).tolist()]
        return class_accuracy(preds, labels, self.classes)

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, str]]:
        return [{"pair_id": pair, "prediction": self.classes[int(p)]}
                for pair, p in zip(outputs["pair_id"], torch.as_tensor(outputs["pred"]).tolist())]
