"""Pretraining tasks: ``text_mlm`` (text-only MLM warm-up) and ``vl_pretrain`` (ITC + ITM + MLM, VLMo; + the
CoCa-style captioning loss ``cap``, weight 0 unless the recipe sets it).

Losses come from ``pipeline.objectives.pretrain``. Eval masks text with a fixed generator so every eval
sees the same masks. Shapes: B batch, L text length, H/W image side, D hidden, P projection dim.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.heads import ITCHead, ITMHead, MLMHead
from pipeline.objectives.captioning import lm_loss
from pipeline.objectives.pretrain import (CAPTION_OBJECTIVES, IGNORE, PAIR_OBJECTIVES, batch_media, encode_pair,
                                          mask_tokens, media_inputs, mlm_loss, vl_pretrain_losses)
from pipeline.tasks.base import LossOutput, SkipSample, Task, TaskContext
from pipeline.tasks.downstream_common import image_tensor

EVAL_MASK_SEED = 1234
CAPTION_MANIFESTS = ("pairs", "retrieval")  # data_prep folders whose txt is a caption (synth captions: pairs)


@dataclasses.dataclass
class MLMOptions:
    mlm_prob: float = dataclasses.field(default=0.15, metadata={
        "help": "share of the real, non-special text tokens masked for MLM (BERT: 0.15)"})

    def __post_init__(self) -> None:
        if not 0 < self.mlm_prob < 1:
            raise ValueError(f"mlm_prob must be in (0, 1), got {self.mlm_prob}")


def pair_passes(objectives: dict[str, float], media: str = "image", fused: str | None = None) -> dict[str, int]:
    """Model passes per sample of ``pipeline.objectives.pretrain.vl_pretrain_losses`` on ``media``-text pairs
    for the objectives with a non-zero weight (contrastive: media + text; matching: media + text for its
    negatives' similarities, then 3 fused pairs; MLM: 1 fused masked pair; captioning: 1 fused causal pair).
    ``fused``: the fused pass kind (default "{media}+text")."""
    contrastive, matching, mlm = PAIR_OBJECTIVES[media]
    on = {name for name, weight in objectives.items() if weight}
    passes = {media: 1, "text": 1} if on & {contrastive, matching} else {}
    fuse = (3 if matching in on else 0) + (1 if mlm in on else 0) + (1 if CAPTION_OBJECTIVES[media] in on else 0)
    return {**passes, fused or f"{media}+text": fuse} if fuse else passes


def vl_pretrain_passes(objectives: dict[str, float]) -> dict[str, int]:
    """``pair_passes`` of image-text pairs, the fused pass counted as "fuse" (the image-text models)."""
    return pair_passes(objectives, "image", "fuse")


class _TextMixin:
    ctx: TaskContext
    options: MLMOptions

    def tokenize(self, text: str) -> dict[str, torch.Tensor]:
        enc = self.ctx.tokenizer(text, max_length=self.ctx.text_len, padding="max_length", truncation=True,
                                 return_tensors="pt")
        return {"input_ids": enc["input_ids"][0].long(), "attention_mask": enc["attention_mask"][0].long()}

    def mask(self, batch: dict[str, Any], generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.ctx.tokenizer
        return mask_tokens(batch["input_ids"], batch["attention_mask"], tok.all_special_ids, tok.mask_token_id,
                           len(tok), prob=self.options.mlm_prob,
                           generator=generator)

    def eval_generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(EVAL_MASK_SEED)


def _mlm_per_sample(labels_bl: torch.Tensor, hidden_bld: torch.Tensor,
                    head: nn.Module) -> dict[str, torch.Tensor]:
    selected = labels_bl != IGNORE
    logits = head(hidden_bld).float()  # [B, L, V]
    loss = F.cross_entropy(logits.transpose(1, 2), labels_bl.clamp(min=0), reduction="none") * selected
    correct = (logits.argmax(-1) == labels_bl) & selected
    return {"mlm_loss_sum": loss.sum(1), "mlm_correct": correct.sum(1).float(),
            "mlm_count": selected.sum(1).float()}


def _cap_per_sample(model: nn.Module, head: nn.Module, media: str, inputs: tuple[torch.Tensor, ...],
                    batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The captioning loss of an eval batch as per-sample shares whose sums over the gathered samples give the
    token-weighted mean (padding rows, ``valid`` False, are left out of the loss)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    valid_b = batch.get("valid", torch.ones(len(ids), dtype=torch.bool, device=ids.device)).to(ids.device)
    loss_mask = valid_b[:, None].expand_as(mask).long()
    loss, acc = lm_loss(model, head, {media: inputs}, ids, mask, loss_mask)
    count_b = (mask[:, 1:].bool() & valid_b[:, None]).sum(1).float()
    return {"cap_loss_sum": loss.detach().float() * count_b, "cap_correct": acc.float() * count_b,
            "cap_count": count_b}


def _cap_metrics(outputs: dict[str, Any], name: str) -> dict[str, float]:
    count = outputs["cap_count"].sum().clamp(min=1)
    return {f"{name}_loss": float(outputs["cap_loss_sum"].sum() / count),
            f"{name}_acc": float(outputs["cap_correct"].sum() / count)}


def _mlm_metrics(outputs: dict[str, Any], name: str = "mlm") -> dict[str, float]:
    count = outputs["mlm_count"].sum().clamp(min=1)
    return {f"{name}_acc": float(outputs["mlm_correct"].sum() / count),
            f"{name}_loss": float(outputs["mlm_loss_sum"].sum() / count)}


class TextMLMTask(_TextMixin, Task):
    name = "text_mlm"
    fields = ("txt",)
    manifest_tasks = CAPTION_MANIFESTS
    Options = MLMOptions
    objectives = {"mlm": 1.0}

    @classmethod
    def passes(cls, objectives: dict[str, float], options: Any) -> dict[str, int]:
        return {"text": 1}

    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        return nn.ModuleDict({"mlm": MLMHead(model.token_embedding, model.cfg.layer_norm_eps)})

    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        text = sample["txt"].strip()
        if not text:
            raise SkipSample("empty_text")
        return self.tokenize(text)

    def padding_sample(self) -> dict[str, Any]:
        return self.tokenize("")

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        masked, labels = self.mask(batch, None)
        out = self.model.encode_text(masked, batch["attention_mask"])
        loss, acc = mlm_loss(self.heads["mlm"], out.hidden, labels)
        return LossOutput(self.weights["mlm"] * loss, {"mlm": loss.detach(), "mlm_acc": acc})

    @torch.no_grad()
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        masked, labels = self.mask(batch, self.eval_generator(batch["input_ids"].device))
        out = self.model.encode_text(masked, batch["attention_mask"])
        return _mlm_per_sample(labels, out.hidden, self.heads["mlm"])

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        return _mlm_metrics(outputs)


class VLPretrainTask(_TextMixin, Task):
    name = "vl_pretrain"
    fields = ("jpg", "txt")
    manifest_tasks = CAPTION_MANIFESTS
    Options = MLMOptions
    objectives = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "cap": 0.0}

    @classmethod
    def passes(cls, objectives: dict[str, float], options: Any) -> dict[str, int]:
        return vl_pretrain_passes(objectives)

    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        hidden = model.cfg.hidden_size
        return nn.ModuleDict({"itc": ITCHead(hidden), "itm": ITMHead(hidden),
                              "mlm": MLMHead(model.token_embedding, model.cfg.layer_norm_eps)})

    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        text = sample["txt"].strip()
        if not text:
            raise SkipSample("empty_text")
        return {"pixel_values": image_tensor(sample.get("jpg"), self.ctx.image_size), **self.tokenize(text)}

    def padding_sample(self) -> dict[str, Any]:
        size = self.ctx.image_size
        return {"pixel_values": torch.zeros(3, size, size), **self.tokenize("")}

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        batch, weights = dict(batch), self.weights
        if weights[PAIR_OBJECTIVES[batch_media(batch)][2]]:
            batch["mlm_input_ids"], batch["mlm_labels"] = self.mask(batch, None)
        out = vl_pretrain_losses(self.model, self.heads, batch, weights)
        return LossOutput(out["loss"], out["terms"])

    def eval_media(self, batch: dict[str, Any]) -> str:
        """The media modality of an eval batch (images here)."""
        return batch_media(batch)

    @torch.no_grad()
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Per sample, on the batch's media ("image"; "audio" in vla_pretrain): the contrastive embeddings
        (``{media}_emb``, ``text_emb``), ITM on the own text and on the next sample's (a negative) when the
        matching objective weighs > 0, MLM, and the captioning loss when its objective weighs > 0."""
        model, heads, media = self.model, self.heads, self.eval_media(batch)
        contrastive, matching, _ = PAIR_OBJECTIVES[media]
        inputs, ids, mask = media_inputs(batch, media), batch["input_ids"], batch["attention_mask"]
        media_bp, text_bp, scale = heads[contrastive](model.encode({media: inputs}).pooled,
                                                      model.encode_text(ids, mask).pooled)
        itm = {}
        if self.weights[matching]:  # an untrained matching head's accuracy is no metric: skip its two passes
            neg_ids, neg_mask = ids.roll(1, dims=0), mask.roll(1, dims=0)
            fused = encode_pair(model, media, tuple(torch.cat([x, x]) for x in inputs), torch.cat([ids, neg_ids]),
                                torch.cat([mask, neg_mask]))
            pos_logits, neg_logits = heads[matching](fused.pooled).float().chunk(2)
            itm = {"itm_pos_correct": (pos_logits.argmax(-1) == 1).float(),
                   "itm_neg_correct": (neg_logits.argmax(-1) == 0).float()}
        masked, labels = self.mask(batch, self.eval_generator(ids.device))
        fused_mlm = encode_pair(model, media, inputs, masked, mask)
        start, end = fused_mlm.spans["text"]
        cap = (_cap_per_sample(model, heads["mlm"], media, inputs, batch) if self.weights[CAPTION_OBJECTIVES[media]]
               else {})
        return {f"{media}_emb": media_bp, "text_emb": text_bp, "logit_scale": scale.expand(len(ids)), **itm,
                **_mlm_per_sample(labels, fused_mlm.hidden[:, start:end], heads["mlm"]), **cap}

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        """Image outputs: itc_loss, i2t_r1, t2i_r1, itm_acc (when ITM is trained), mlm_acc, mlm_loss (+ cap_loss,
        cap_acc with the captioning objective); audio outputs (``audio_emb``): atc_loss, a2t_r1, t2a_r1, atm_acc
        (when ATM is trained), audio_mlm_acc, audio_mlm_loss (+ audio_cap_loss, audio_cap_acc)."""
        media = "audio" if "audio_emb" in outputs else "image"
        contrastive, matching, mlm = PAIR_OBJECTIVES[media]
        short = media[0]
        emb, text = outputs[f"{media}_emb"].float(), outputs["text_emb"].float()
        sim = emb @ text.t()
        targets = torch.arange(len(sim))
        scale = outputs["logit_scale"].float()[0] if len(sim) else torch.tensor(1.0)
        loss = (F.cross_entropy(scale * sim, targets) + F.cross_entropy(scale * sim.t(), targets)) / 2
        itm = ({f"{matching}_acc": float((outputs["itm_pos_correct"].mean() + outputs["itm_neg_correct"].mean()) / 2)}
               if "itm_pos_correct" in outputs else {})
        return {f"{contrastive}_loss": float(loss),
                f"{short}2t_r1": float((sim.argmax(1) == targets).float().mean()),
                f"t2{short}_r1": float((sim.argmax(0) == targets).float().mean()),
                **itm, **_mlm_metrics(outputs, mlm),
                **(_cap_metrics(outputs, CAPTION_OBJECTIVES[media]) if "cap_count" in outputs else {})}
