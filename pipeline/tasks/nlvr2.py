"""NLVR2 as in VLMo: two fuse passes (img0 + sentence, img1 + sentence), their joint CLS vectors
concatenated -> Linear(2D, 2D) -> LayerNorm -> GELU -> Linear(2D, 2); cross-entropy on true/false.

Shape letters: B batch, L text length, D hidden.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.metrics.nlvr2 import nlvr2_metrics
from pipeline.tasks.base import LossOutput, SkipSample, Task
from pipeline.tasks.baselines import train_records
from pipeline.tasks.downstream_common import (blank_image, blank_text, cross_entropy_loss, image_tensor, sample_json,
                                              tokenize)


def parse_label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise SkipSample("bad_label")


class NLVR2Task(Task):
    name = "nlvr2"
    fields = ("img0.jpg", "img1.jpg", "txt", "json")
    manifest_tasks = ("nlvr2",)
    objectives = {"nlvr2": 1.0}
    headline = "acc"

    @classmethod
    def passes(cls, objectives: dict[str, float], options: Any) -> dict[str, int]:
        return {"fuse": 2}  # one per image of the pair

    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        d = self.ctx.model_cfg.hidden_size
        return nn.ModuleDict({"nlvr2": nn.Sequential(nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(),
                                                     nn.Linear(2 * d, 2))})

    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        meta = sample_json(sample)
        sentence = sample.get("txt") or meta.get("sentence")
        if not sentence:
            raise SkipSample("missing_sentence")
        ids, mask = tokenize(self.ctx.tokenizer, [sentence], self.ctx.text_len)
        return {"pixel_values0": image_tensor(sample.get("img0.jpg"), self.ctx.image_size),
                "pixel_values1": image_tensor(sample.get("img1.jpg"), self.ctx.image_size),
                "input_ids": ids[0], "attention_mask": mask[0],
                "label": torch.tensor(int(parse_label(meta.get("label")))),
                "identifier": str(meta.get("identifier", sample.get("__key__", "")))}

    def padding_sample(self) -> dict[str, Any]:
        ids, mask = blank_text(self.ctx.text_len)
        return {"pixel_values0": blank_image(self.ctx.image_size), "pixel_values1": blank_image(self.ctx.image_size),
                "input_ids": ids, "attention_mask": mask, "label": torch.tensor(0), "identifier": "pad-0-0-0"}

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        out0 = self.model.fuse(batch["pixel_values0"], batch["input_ids"], batch["attention_mask"])
        out1 = self.model.fuse(batch["pixel_values1"], batch["input_ids"], batch["attention_mask"])
        return self.heads["nlvr2"](torch.cat([out0.pooled, out1.pooled], dim=-1)).float()

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        loss, terms = cross_entropy_loss(self.logits(batch), batch["label"], "nlvr2")
        return LossOutput(self.weights["nlvr2"] * loss, terms)

    @torch.no_grad()
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.logits(batch)
        return {"pred": logits.argmax(dim=1), "label": batch["label"].long(),
                "identifier": list(batch["identifier"])}

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        preds = [bool(p) for p in torch.as_tensor(outputs["pred"]).tolist()]
        labels = [bool(y) for y in torch.as_tensor(outputs["label"]).tolist()]
        return nlvr2_metrics(preds, labels, list(outputs["identifier"]))

    def baseline(self, outputs: dict[str, Any], data_dir: Path) -> tuple[str, dict[str, float]]:
        """Always the majority train label."""
        records = train_records(data_dir)
        if records is None:
            return "majority", {}
        labels = [str(r.get("label")).lower() == "true" for r in records]
        majority = sum(labels) * 2 >= len(labels)
        truth = [bool(y) for y in outputs["label"].tolist()]
        return "majority", nlvr2_metrics([majority] * len(truth), truth, outputs["identifier"])

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, str]]:
        """``[{"identifier", "prediction": "True"|"False"}]``, the rows of the submission CSV."""
        return [{"identifier": ident, "prediction": str(bool(p))}
                for ident, p in zip(outputs["identifier"], torch.as_tensor(outputs["pred"]).tolist())]

    def write_predictions(self, outputs: dict[str, Any], path_stem: Path) -> Path:
        """NLVR2's submission CSV (what ``nlvr2/eval/metrics.py`` reads): ``identifier,prediction`` lines,
        no header, prediction ``True`` / ``False``."""
        path = Path(f"{path_stem}.csv")
        path.write_text("".join(f"{r['identifier']},{r['prediction']}\n" for r in self.predictions(outputs)))
        return path
