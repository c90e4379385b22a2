"""Image-text retrieval (COCO / Flickr30k Karpathy) as in VLMo: fine-tune the dual encoder with ITC
(global negatives across the DP group) and the joint encoder with ITM (hard negatives from ITC
similarities); evaluate R@1/5/10 both ways over the whole split with the 5-captions-per-image protocol,
optionally re-ranking each query's top-k candidates with ITM (``itm_rerank``).

``RetrievalTask`` is written for any media modality (class attribute ``media``, the pair objectives of
``pipeline.objectives.pretrain.PAIR_OBJECTIVES``); ``pipeline.tasks.audio_retrieval`` is the audio one. Below,
"image" stands for the media item.

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
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from pipeline.metrics.retrieval import (IMAGE_DIRECTIONS, chance_map, chance_recall, mean_average_precision,
                                        retrieval_recall)
from pipeline.model.heads import ITCHead, ITMHead
from pipeline.objectives.pretrain import MEDIA_KEYS, PAIR_OBJECTIVES, encode_pair, media_inputs, vl_pretrain_losses
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
    #: the media modality retrieved with text: its batch keys (``MEDIA_KEYS``), its contrastive and matching
    #: heads/objectives (``PAIR_OBJECTIVES``), ``{media}_emb`` / ``{media}_id`` outputs and prediction keys
    media: ClassVar[str] = "image"
    #: metric name prefixes (media -> text, text -> media), the count metric, and the text -> media mAP@K
    #: (None: not reported)
    directions: ClassVar[tuple[str, str]] = IMAGE_DIRECTIONS
    count_metric: ClassVar[str] = "num_images"
    map_k: ClassVar[int | None] = None

    @classmethod
    def passes(cls, objectives: dict[str, float], options: Any) -> dict[str, int]:
        return vl_pretrain_passes(objectives)

    @property
    def captions_per_item(self) -> int:
        return self.options.captions_per_image

    @property
    def rerank_top_k(self) -> int:
        return self.options.itm_rerank

    @property
    def pair_heads(self) -> tuple[str, str]:
        """(contrastive, matching) head names: itc/itm for images, atc/atm for audio."""
        contrastive, matching, _ = PAIR_OBJECTIVES[self.media]
        return contrastive, matching

    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        d = self.ctx.model_cfg.hidden_size
        contrastive, matching = self.pair_heads
        return nn.ModuleDict({contrastive: ITCHead(d), matching: ITMHead(d)})

    # media-specific pieces (the audio task overrides these)
    def media_tensors(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The media inputs of one decoded sample (``MEDIA_KEYS[media]``)."""
        return {"pixel_values": image_tensor(sample.get("jpg"), self.ctx.image_size)}

    def blank_media(self) -> dict[str, torch.Tensor]:
        return {"pixel_values": blank_image(self.ctx.image_size)}

    def media_id(self, meta: dict[str, Any], sample: dict[str, Any]) -> str:
        return str(meta.get("image_id", sample.get("__key__", "")))

    def caption_ids(self, meta: dict[str, Any], media_id: str, count: int) -> list[str]:
        return caption_ids(meta, media_id, count)

    def stored_media(self, outputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """The media inputs kept in the gathered outputs for the re-rank (gathered tensors are float)."""
        return tuple(outputs[key] for key in MEDIA_KEYS[self.media])

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
        media = self.media_tensors(sample)
        if train:
            ids, mask = tokenize(self.ctx.tokenizer, [random.choice(captions)], self.ctx.text_len)
            return {**media, "input_ids": ids[0], "attention_mask": mask[0]}
        k = self.captions_per_item
        captions = captions[:k]
        ids, mask = blank_text(self.ctx.text_len, k)
        real_ids, real_mask = tokenize(self.ctx.tokenizer, captions, self.ctx.text_len)
        ids[:len(captions)], mask[:len(captions)] = real_ids, real_mask
        valid = torch.zeros(k, dtype=torch.bool)
        valid[:len(captions)] = True
        meta = sample_json(sample)
        media_id = self.media_id(meta, sample)
        ids_k = self.caption_ids(meta, media_id, len(captions))
        return {**media, "input_ids": ids, "attention_mask": mask, "caption_valid": valid,
                f"{self.media}_id": media_id, "caption_ids": ids_k + [""] * (k - len(captions))}

    def padding_sample(self) -> dict[str, Any]:
        k = self.captions_per_item
        ids, mask = blank_text(self.ctx.text_len, k)
        return {**self.blank_media(), "input_ids": ids, "attention_mask": mask,
                "caption_valid": torch.zeros(k, dtype=torch.bool), f"{self.media}_id": "", "caption_ids": [""] * k}

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        """ITC and ITM with hard negatives (audio: ATC, ATM), as in pretraining (without MLM)."""
        out = vl_pretrain_losses(self.model, self.heads, batch, self.weights)
        return LossOutput(out["loss"], out["terms"])

    @torch.no_grad()
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        media, ids, mask = media_inputs(batch, self.media), batch["input_ids"], batch["attention_mask"]
        b, k, length = ids.shape
        contrastive = self.heads[self.pair_heads[0]]
        media_emb = contrastive.embed_image(self.model.encode({self.media: media}).pooled)
        text_emb = contrastive.embed_text(self.model.encode_text(ids.reshape(b * k, length),
                                                                 mask.reshape(b * k, length)).pooled)
        out = {f"{self.media}_emb": media_emb, "text_emb": text_emb.reshape(b, k, -1),
               "caption_valid": batch["caption_valid"].bool(), f"{self.media}_id": list(batch[f"{self.media}_id"]),
               "caption_ids": list(batch["caption_ids"])}
        if self.rerank_top_k:  # the re-rank fuses candidate pairs of the gathered split
            out.update({key: batch[key] for key in MEDIA_KEYS[self.media]}, input_ids=ids, attention_mask=mask)
        return out

    def similarity(self, outputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, T] cosine similarities, [T] image index of each caption) over the gathered split."""
        text_emb, text_image = flatten_captions(outputs["text_emb"], outputs["caption_valid"])
        return outputs[f"{self.media}_emb"].float() @ text_emb.float().t(), text_image

    def ranking_metrics(self, sim: torch.Tensor, text_image: torch.Tensor) -> dict[str, float]:
        """R@K both ways, their mean and (with ``map_k``) the text -> media mAP@K of a similarity matrix."""
        out = retrieval_recall(sim, text_image, directions=self.directions)
        if self.map_k:
            out[f"{self.directions[1]}_map{self.map_k}"] = mean_average_precision(sim, text_image, self.map_k)
        return out

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        sim, text_image = self.similarity(outputs)
        return {**self.ranking_metrics(sim, text_image), self.count_metric: float(sim.shape[0]),
                "num_captions": float(sim.shape[1])}

    def baseline(self, outputs: dict[str, Any], data_dir: Path) -> tuple[str, dict[str, float]]:
        """Chance level of R@K (and mAP@K) for the split's image and caption counts."""
        count = len(outputs[f"{self.media}_emb"])
        chance = chance_recall(count, self.captions_per_item, directions=self.directions)
        if self.map_k:
            chance[f"{self.directions[1]}_map{self.map_k}"] = chance_map(count, self.map_k)
        return "chance", chance

    def extra_metrics(self, outputs: dict[str, Any], batch_size: int, progress: Any = None) -> dict[str, float]:
        """With ``itm_rerank`` K > 0: the ``itm_*`` recalls after re-ranking each query's top-K by ITM (audio:
        ``atm_rerank``, ``atm_*``)."""
        if not self.rerank_top_k:
            return {}
        return self.itm_rerank(outputs, self.rerank_top_k, batch_size, progress)

    def predictions(self, outputs: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """Ranked ids: ``{"image_to_text": [{"image_id", "caption_ids": top-10}], "text_to_image":
        [{"caption_id", "image_ids": top-10}]}``, best first, by dual-encoder similarity (audio:
        ``audio_to_text`` / ``audio_id``, ``text_to_audio`` / ``audio_ids``)."""
        sim, _ = self.similarity(outputs)
        m = self.media
        valid = outputs["caption_valid"].bool().tolist()
        captions = [c for ids, ok in zip(outputs["caption_ids"], valid) for c, v in zip(ids, ok) if v]
        items = list(outputs[f"{m}_id"])
        top_txt = sim.topk(min(PREDICTION_TOP_K, sim.shape[1]), dim=1).indices.tolist()
        top_item = sim.topk(min(PREDICTION_TOP_K, sim.shape[0]), dim=0).indices.t().tolist()
        return {f"{m}_to_text": [{f"{m}_id": items[i], "caption_ids": [captions[t] for t in row]}
                                 for i, row in enumerate(top_txt)],
                f"text_to_{m}": [{"caption_id": captions[t], f"{m}_ids": [items[i] for i in row]}
                                 for t, row in enumerate(top_item)]}

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
        return {f"{self.pair_heads[1]}_{k}": v for k, v in self.ranking_metrics(reranked, text_image).items()}

    def _score_pairs(self, outputs: dict[str, Any], pair_list: list[tuple[int, int]], batch_size: int,
                     progress: Any) -> torch.Tensor:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        media = self.stored_media(outputs)
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
            fused = encode_pair(self.model, self.media, tuple(x[img_idx] for x in media), ids[txt_idx],
                                mask[txt_idx])
            logits = self.heads[self.pair_heads[1]](fused.pooled).float()
            local.append(logits[:, 1] - logits[:, 0])
            if progress is not None:
                progress.update(1)
        local_t = torch.cat(local) if local else torch.zeros(0)
        if world > 1:
            parts = [torch.empty_like(local_t) for _ in range(world)]
            dist.all_gather(parts, local_t.contiguous())
            local_t = torch.cat(parts)
        return local_t[:len(pair_list)]
