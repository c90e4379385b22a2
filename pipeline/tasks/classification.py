"""Image classification: a linear classifier on the image CLS of ``encode_image``. Linear probe = freeze the
backbone with the recipe's ``freeze: ['^model\\.']``; full fine-tune = no freeze. Metrics top-1 / top-5.

Shape letters: B batch, D hidden, C classes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.metrics.classification import topk_accuracy
from pipeline.tasks.base import LossOutput, SkipSample, Task, TaskContext
from pipeline.tasks.downstream_common import blank_image, image_tensor, read_json_file, sample_json


def parse_class(value: Any, num_classes: int) -> int:
    if isinstance(value, bytes):
        value = value.decode()
    try:
        label = int(str(value).strip())
    except ValueError:
        raise SkipSample("bad_label") from None
    if not 0 <= label < num_classes:
        raise SkipSample("label_out_of_range")
    return label


class ClassificationTask(Task):
    name = "classification"
    fields = ("jpg", "cls", "json")

    def __init__(self, ctx: TaskContext):
        super().__init__(ctx)
        self.classes: list[str] = read_json_file(ctx.data_dir, "classes.json", "classes", self.name)

    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        d = self.ctx.model_cfg.hidden_size
        return nn.ModuleDict({"classifier": nn.Sequential(nn.LayerNorm(d), nn.Linear(d, len(self.classes)))})

    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        value = sample.get("cls")
        if value is None:
            value = sample_json(sample).get("label")
        return {"pixel_values": image_tensor(sample.get("jpg"), self.ctx.image_size),
                "label": torch.tensor(parse_class(value, len(self.classes)))}

    def padding_sample(self) -> dict[str, Any]:
        return {"pixel_values": blank_image(self.ctx.image_size), "label": torch.tensor(0)}

    def _logits(self, model: nn.Module, heads: nn.ModuleDict, batch: dict[str, Any]):
        out = model.encode_image(batch["pixel_values"])
        return heads["classifier"](out.pooled).float(), out

    def training_loss(self, model: nn.Module, heads: nn.ModuleDict, batch: dict[str, Any]) -> LossOutput:
        logits, out = self._logits(model, heads, batch)
        label = batch["label"].long()
        loss = F.cross_entropy(logits, label)
        acc = (logits.argmax(dim=1) == label).float().mean()
        return LossOutput(loss=loss, terms={"cls_ce": loss.detach(), "cls_acc": acc.detach()},
                          aux_loss=out.aux_loss, expert_counts=out.expert_counts)

    @torch.no_grad()
    def eval_outputs(self, model: nn.Module, heads: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, Any]:
        logits, _ = self._logits(model, heads, batch)
        return {"logits": logits, "label": batch["label"].long()}

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        return topk_accuracy(torch.as_tensor(outputs["logits"]), torch.as_tensor(outputs["label"]), ks=(1, 5))
