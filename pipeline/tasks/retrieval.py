"""Image-text retrieval (COCO / Flickr30k Karpathy) as in VLMo: fine-tune the dual encoder with ITC
(global negatives across the DP group) and the joint encoder with ITM (hard negatives from ITC
similarities); evaluate R@1/5/10 both ways over the whole split with the 5-captions-per-image protocol,
optionally re-ranking each query's top-k candidates with ITM (``itm_rerank``).

Training samples: image + one caption drawn from its captions. Eval samples: image + its first
``captions_per_image`` captions, ``input_ids`` [K, L] with ``caption_valid`` [K] marking real ones.
Shape letters: B batch, K captions per image, L text length, P projection dim, N images, T captions.
Options (``task_options``): ``captions_per_image`` (5), ``itm_rerank`` (0: off; K re-ranks each query's
top-K by ITM after the gathered outputs, which then keep the eval inputs).
Predictions: each image's top-10 caption ids and each caption's top-10 image ids, with the shards' ids
(``image_id``; caption ids from ``sentids`` when the shard has them, else ``<image_id>#<k>``).
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.metrics.retrieval import chance_recall, retrieval_recall
from pipeline.model.heads import ITCHead, ITMHead
from pipeline.objectives.pretrain import vl_pretrain_losses
from pipeline.tasks.base import LossOutput, SkipSample, Task
from pipeline.tasks.downstream_common import blank_image, blank_text, image_tensor, sample_json, tokenize
from pipeline.tasks.pretrain import vl_pretrain_passes


PREDICTION_TOP_K = 10


def caption_ids(meta: dict[str, Any], image_id: str, count: int) -> list[str]:
    """Ids of an image's first ``count`` captions: the shard's ``sentids`` (Karpathy) or ``image_id#k``."""
    sentids = meta.get("sentids")
    if isinstance(sentids, list) and len(sentids) >= count:
        return [str(s) for s in sentids[:count]]
    return [f"{image_id}#{k}" for k in range(count)]


def flatten_captions(text_emb_bkp: torch.Tensor, caption_valid_bk: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K, P] caption embeddings + [N, K] validity -> ([T, P] real captions, [T] their image index)."""
    n, k = caption_valid_bk.shape
    valid = caption_valid_bk.bool().reshape(-1)
    image_index = torch.arange(n).repeat_interleave(k)[valid]
    return text_emb_bkp.reshape(n * k, -1)[valid], image_index


@dataclasses.dataclass
class RetrievalOptions:
    captions_per_image: int = dataclasses.field(default=5, metadata={
        "help": "captions per image at eval (the 5-captions protocol); fewer are padded, more dropped"})
    itm_rerank: int = dataclasses.field(default=0, metadata={
        "help": "re-rank each query's top-K dual-encoder candidates by ITM after evaluation (0 = off)"})

    def __post_init__(self) -> None:
        if self.captions_per_image < 1 or self.itm_rerank < 0:
            raise ValueError(f"captions_per_image must be >= 1 and itm_rerank >= 0, got {self.captions_per_image} "
                             f"and {self.itm_rerank}")


class RetrievalTask(Task):
    name = "retrieval"
    fields = ("jpg", "txt", "json")
    manifest_tasks = ("retrieval",)
    Options = RetrievalOptions
    objectives = {"itc": 1.0, "itm": 1.0}
    headline = "t2i_r5"

    @classmethod
    def passes(cls, objectives: dict[str, float], options: Any) -> dict[str, int]:
        return vl_pretrain_passes(objectives)

    @property
    def captions_per_image(self) -> int:
        return self.options.captions_per_image

    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        d = self.ctx.model_cfg.hidden_size
        return nn.ModuleDict({"itc": ITCHead(d), "itm": ITMHead(d)})

    def _captions(self, sample: dict[str, Any]) -> list[str]:
        meta = sample_json(sample)
        captions = [c for c in (meta.get("captions") or []) if isinstance(c, str) and c.strip()]
        if not captions and sample.get("txt"):
            captions = [sample["txt"]]
        if not captions:
            raise SkipSample("no_caption")
        return captions

    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        captions = self._captions(sample)
        pixels = image_tensor(sample.get("jpg"), self.ctx.image_size)
        if train:
            ids, mask = tokenize(self.ctx.tokenizer, [random.choice(captions)], self.ctx.text_len)
            return {"pixel_values": pixels, "input_ids": ids[0], "attention_mask": mask[0]}
        k = self.captions_per_image
        captions = captions[:k]
        ids, mask = blank_text(self.ctx.text_len, k)
        real_ids, real_mask = tokenize(self.ctx.tokenizer, captions, self.ctx.text_len)
        ids[:len(captions)], mask[:len(captions)] = real_ids, real_mask
        valid = torch.zeros(k, dtype=torch.bool)
        valid[:len(captions)] = True
        meta = sample_json(sample)
        image_id = str(meta.get("image_id", sample.get("__key__", "")))
        ids_k = caption_ids(meta, image_id, len(captions))
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask, "caption_valid": valid,
                "image_id": image_id, "caption_ids": ids_k + [""] * (k - len(captions))}

    def padding_sample(self) -> dict[str, Any]:
        k = self.captions_per_image
        ids, mask = blank_text(self.ctx.text_len, k)
        return {"pixel_values": blank_image(self.ctx.image_size), "input_ids": ids, "attention_mask": mask,
                "caption_valid": torch.zeros(k, dtype=torch.bool), "image_id": "", "caption_ids": [""] * k}

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        """ITC and ITM with hard negatives, as in pretraining (without MLM)."""
        out = vl_pretrain_losses(self.model, self.heads, batch, self.weights)
        return LossOutput(out["loss"], out["terms"])

    @torch.no_grad()
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        pixels, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        b, k, length = ids.shape
        image_emb = self.heads["itc"].embed_image(self.model.encode_image(pixels).pooled)
        text_emb = self.heads["itc"].embed_text(self.model.encode_text(ids.reshape(b * k, length),
                                                                       mask.reshape(b * k, length)).pooled)
        out = {"image_emb": image_emb, "text_emb": text_emb.reshape(b, k, -1),
               "caption_valid": batch["caption_valid"].bool(), "image_id": list(batch["image_id"]),
               "caption_ids": list(batch["caption_ids"])}
        if self.options.itm_rerank:  # the re-rank fuses candidate pairs of the gathered split
            out.update(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        return out

    @staticmethod
    def similarity(outputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, T] cosine similarities, [T] image index of each caption) over the gathered split."""
        text_emb, text_image = flatten_captions(outputs["text_emb"], outputs["caption_valid"])
        return outputs["image_emb"].float() @ text_emb.float().t(), text_image

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        sim, text_image = self.similarity(outputs)
        return {**retrieval_recall(sim, text_image), "num_images": float(sim.shape[0]),
                "num_captions": float(sim.shape[1])}

    def baseline(self, outputs: dict[str, Any], data_dir: Path) -> tuple[str, dict[str, float]]:
        """Chance level of R@K for the split's image and caption counts."""
        return "chance", chance_recall(len(outputs["image_emb"]), self.captions_per_image)

    def extra_metrics(self, outputs: dict[str, Any], batch_size: int, progress: Any = None) -> dict[str, float]:
        """With ``itm_rerank`` K > 0: the ``itm_*`` recalls after re-ranking each query's top-K by ITM."""
        if not self.options.itm_rerank:
            return {}
        return self.itm_rerank(outputs, self.options.itm_rerank, batch_size, progress)

    def predictions(self, outputs: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """Ranked ids: ``{"image_to_text": [{"image_id", "caption_ids": top-10}], "text_to_image":
        [{"caption_id", "image_ids": top-10}]}``, best first, by dual-encoder similarity."""
        sim, _ = self.similarity(outputs)
        valid = outputs["caption_valid"].bool().tolist()
        captions = [c for ids, ok in zip(outputs["caption_ids"], valid) for c, v in zip(ids, ok) if v]
        images = list(outputs["image_id"])
        top_txt = sim.topk(min(PREDICTION_TOP_K, sim.shape[1]), dim=1).indices.tolist()
        top_img = sim.topk(min(PREDICTION_TOP_K, sim.shape[0]), dim=0).indices.t().tolist()
        return {"image_to_text": [{"image_id": images[i], "caption_ids": [captions[t] for t in row]}
                                  for i, row in enumerate(top_txt)],
                "text_to_image": [{"caption_id": captions[t], "image_ids": [images[i] for i in row]}
                                  for t, row in enumerate(top_img)]}

    @torch.no_grad()
    def itm_rerank(self, outputs: dict[str, Any], top_k: int, batch_size: int,
                   progress: Any = None) -> dict[str, float]:
        """Re-rank each query's top-k dual-encoder candidates by ITM (match logit margin + similarity),
        VLMo/ALBEF style. Needs the eval inputs in ``outputs`` (kept when ``itm_rerank`` > 0). Every rank
        scores its share of the (identical) pair list in batches of exactly ``batch_size`` (the MoE
        fixed-shape invariant) and all ranks gather all scores; candidates outside a query's top-k keep
        their rank order below every re-ranked one."""
        sim, text_image = self.similarity(outputs)
        n_img, n_txt = sim.shape
        k_i2t, k_t2i = min(top_k, n_txt), min(top_k, n_img)
        pairs = set()
        top_txt = sim.topk(k_i2t, dim=1).indices  # [N, k]
        top_img = sim.topk(k_t2i, dim=0).indices  # [k, T]
        pairs.update((i, int(t)) for i in range(n_img) for t in top_txt[i])
        pairs.update((int(i), t) for t in range(n_txt) for i in top_img[:, t])
        pair_list = sorted(pairs)
        scores = self._score_pairs(outputs, pair_list, batch_size, progress)
        reranked = sim - sim.max() + sim.min() - 1e4  # everything not re-ranked sits below, order kept
        for (i, t), s in zip(pair_list, scores.tolist()):
            reranked[i, t] = s + sim[i, t]
        return {f"itm_{k}": v for k, v in retrieval_recall(reranked, text_image).items()}

    def _score_pairs(self, outputs: dict[str, Any], pair_list: list[tuple[int, int]], batch_size: int,
                     progress: Any) -> torch.Tensor:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        pixels = outputs["pixel_values"]
        valid = outputs["caption_valid"].bool().reshape(-1)
        ids = outputs["input_ids"].reshape(-1, outputs["input_ids"].shape[-1])[valid].long()
        mask = outputs["attention_mask"].reshape(-1, outputs["attention_mask"].shape[-1])[valid].long()
        per_rank = -(-len(pair_list) // world)
        per_rank = -(-per_rank // batch_size) * batch_size
        mine = pair_list[rank * per_rank:(rank + 1) * per_rank]
        mine = mine + [pair_list[0]] * (per_rank - len(mine))
        local = []
        for start in range(0, per_rank, batch_size):
            chunk = mine[start:start + batch_size]
            img_idx = torch.tensor([p[0] for p in chunk])
            txt_idx = torch.tensor([p[1] for p in chunk])
            fused = self.model.fuse(pixels[img_idx], ids[txt_idx], mask[txt_idx])
            logits = self.heads["itm"](fused.pooled).float()
            local.append(logits[:, 1] - logits[:, 0])
            if progress is not None:
                progress.update(1)
        local_t = torch.cat(local) if local else torch.zeros(0)
        if world > 1:
            parts = [torch.empty_like(local_t) for _ in range(world)]
            dist.all_gather(parts, local_t.contiguous())
            local_t = torch.cat(parts)
        return local_t[:len(pair_list)]
