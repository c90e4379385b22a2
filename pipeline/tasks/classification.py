"""Image classification: a linear classifier on the image CLS of ``encode_image``. Linear probe = freeze the
backbone with the recipe's ``freeze: ['^model\\.']``; full fine-tune = no freeze. Metrics top-1 / top-5.

The classes are the training folder's ``classes.json``. A sample's class is its ``label_name`` looked up
there (so an eval folder with another class list is scored against the training classes; a name the
training data never had is skipped in training and counts as wrong at eval), or the integer ``cls`` when
the sample has no name. Predictions: the top-5 class names with softmax scores per sample.

``ClassificationTask`` is written for any media modality (class attribute ``media``: its batch keys are
``pipeline.objectives.pretrain.MEDIA_KEYS``); ``pipeline.tasks.audio_classification`` is the audio one.

Shape letters: B batch, D hidden, C classes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.metrics.classification import topk_accuracy
from pipeline.objectives.pretrain import media_inputs
from pipeline.tasks.base import LossOutput, SkipSample, Task, TaskContext
from pipeline.tasks.downstream_common import blank_image, cross_entropy_loss, image_tensor, read_json_file

UNKNOWN_LABEL = -1  # an eval sample whose class is not a training class: counted wrong, never indexed
PREDICTION_TOP_K = 5


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


def training_classes(ctx: TaskContext, task: str) -> tuple[list[str], dict[str, int]]:
    """The training folder's ``classes.json`` (names in label order) and name -> index."""
    classes: list[str] = read_json_file(ctx.data_dir, "classes.json", "classes", task)
    return classes, {str(c): i for i, c in enumerate(classes)}


def sample_label(sample: dict[str, Any], class_index: dict[str, int], train: bool) -> int:
    """The training-class index of a sample: by ``json.label_name`` when present, else ``cls``. Unknown
    classes raise SkipSample in training and give ``UNKNOWN_LABEL`` at eval."""
    meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
    name = meta.get("label_name")
    try:
        if name is not None:
            if str(name) not in class_index:
                raise SkipSample("label_not_in_training_classes")
            return class_index[str(name)]
        value = sample.get("cls")
        return parse_class(meta.get("label") if value is None else value, len(class_index))
    except SkipSample as skip:
        if train or skip.reason == "bad_label":
            raise
        return UNKNOWN_LABEL


class ClassificationTask(Task):
    name = "classification"
    fields = ("jpg", "cls", "json")
    manifest_tasks = ("classification",)
    vocab_files = ("classes.json",)
    objectives = {"cls": 1.0}
    headline = "top1"
    #: the media modality classified (its pooled output feeds the classifier)
    media: ClassVar[str] = "image"

    @classmethod
    def passes(cls, objectives: dict[str, float], options: Any) -> dict[str, int]:
        return {cls.media: 1}

    # media-specific pieces (the audio task overrides these)
    def media_tensors(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"pixel_values": image_tensor(sample.get("jpg"), self.ctx.image_size)}

    def blank_media(self) -> dict[str, torch.Tensor]:
        return {"pixel_values": blank_image(self.ctx.image_size)}

    def setup(self) -> None:
        self.classes, self.class_index = training_classes(self.ctx, self.name)

    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        d = self.ctx.model_cfg.hidden_size
        return nn.ModuleDict({"classifier": nn.Sequential(nn.LayerNorm(d), nn.Linear(d, len(self.classes)))})

    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        return {**self.media_tensors(sample), "label": torch.tensor(sample_label(sample, self.class_index, train)),
                "key": str(sample.get("__key__", ""))}

    def padding_sample(self) -> dict[str, Any]:
        return {**self.blank_media(), "label": torch.tensor(0), "key": ""}

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        pooled = self.model.encode({self.media: media_inputs(batch, self.media)}).pooled
        return self.heads["classifier"](pooled).float()

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        loss, terms = cross_entropy_loss(self.logits(batch), batch["label"], "cls")
        return LossOutput(self.weights["cls"] * loss, terms)

    @torch.no_grad()
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.logits(batch)
        return {"logits": logits, "label": batch["label"].long(), "key": list(batch["key"])}

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        return topk_accuracy(torch.as_tensor(outputs["logits"]), torch.as_tensor(outputs["label"]), ks=(1, 5))

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """``[{"key", "top5": [{"class", "score"}]}]``: the top-5 classes by softmax probability."""
        probs = torch.as_tensor(outputs["logits"]).float().softmax(dim=1)
        top = probs.topk(min(PREDICTION_TOP_K, probs.shape[1]), dim=1)
        return [{"key": key, "top5": [{"class": self.classes[c], "score": round(s, 6)}
                                      for c, s in zip(idx, scores)]}
                for key, idx, scores in zip(outputs["key"], top.indices.tolist(), top.values.tolist())]

    def baseline(self, outputs: dict[str, Any], data_dir: Path) -> tuple[str, dict[str, float]]:
        """Chance level: K / classes."""
        c = outputs["logits"].shape[1]
        return "chance", {"top1": 1 / c, "top5": min(5, c) / c}
