"""``vla_pretrain``: image-text AND audio-text pretraining in one run (VLMo's objectives for each media).

A training micro-batch holds one data source (``pipeline.data.loader`` mixes whole micro-batches, the same
source on every rank), so it is image-text (ITC, ITM, MLM; + cap) or audio-text (ATC, ATM, audio MLM; +
audio_cap; the captioning objectives weigh 0 unless the recipe sets them): the step's
MoE calls are those of its media on every rank. The heads itc, itm, mlm are vl_pretrain's (a vl_pretrain
checkpoint's heads load); atc, atm are the audio ones; the MLM head is shared (tied to the token embeddings).
An evaluation reads one source: its metrics are those of its media (``VLPretrainTask.metrics``).

Shapes: B batch, T log-mel frames, F mel bands, L text length, H/W image side.
"""
from __future__ import annotations

import random
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.model.heads import ITCHead, ITMHead
from pipeline.objectives.pretrain import CAPTION_OBJECTIVES, MEDIA_KEYS, PAIR_OBJECTIVES
from pipeline.tasks.base import SkipSample
from pipeline.tasks.downstream_common import AUDIO_FIELD, AUDIO_MANIFESTS, audio_tensor, blank_audio, blank_image
from pipeline.tasks.pretrain import CAPTION_MANIFESTS, VLPretrainTask, pair_passes

MEDIA_CODES = {"image": 1, "audio": 2}  # eval batches agree on their media across ranks by the max code


class VLAPretrainTask(VLPretrainTask):
    name = "vla_pretrain"
    fields = ("txt",)
    optional_fields = ("jpg", AUDIO_FIELD, "json")  # a sample is an image or a clip; json: the clip's captions
    manifest_tasks = (*CAPTION_MANIFESTS, *AUDIO_MANIFESTS)
    objectives = {**{name: 1.0 for media in ("image", "audio") for name in PAIR_OBJECTIVES[media]},
                  **{CAPTION_OBJECTIVES[media]: 0.0 for media in ("image", "audio")}}  # captioning: off unless set

    @classmethod
    def passes(cls, objectives: dict[str, float], options: Any) -> dict[str, int]:
        """The passes of ONE image-text sample plus those of ONE audio-text sample ("image", "text",
        "image+text", "audio", "audio+text"): each sample is one or the other, in a ratio (the recipe's source
        weights) this method does not see. So FLOPs per sample (and MFU) are an upper bound, exact for
        neither media alone, and the activation estimate is that of a micro-batch of each kind together."""
        passes = pair_passes(objectives, "image")
        for kind, count in pair_passes(objectives, "audio").items():
            passes[kind] = passes.get(kind, 0) + count
        return passes

    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        heads = super().build_heads(model)
        hidden = model.cfg.hidden_size
        heads.update({"atc": ITCHead(hidden), "atm": ITMHead(hidden)})
        return heads

    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        """An image sample as vl_pretrain's; a clip -> its log-mel and one caption (train: a random one of
        the json's ``captions`` when there are any, else txt; eval: the first)."""
        if AUDIO_FIELD not in sample:
            return super().prepare_sample(sample, train)
        captions = audio_captions(sample)
        caption = random.choice(captions) if train else captions[0]
        return {**audio_tensor(sample[AUDIO_FIELD], self.ctx.model_cfg.audio), **self.tokenize(caption)}

    def padding_sample(self) -> dict[str, Any]:
        """Both media's inputs: ``collate`` keeps the keys of the batch's first (real) sample; a batch of
        padding only (a rank out of eval data) takes its media from the other ranks (``eval_media``)."""
        return {"pixel_values": blank_image(self.ctx.image_size), **blank_audio(self.ctx.model_cfg.audio),
                **self.tokenize("")}

    def eval_media(self, batch: dict[str, Any]) -> str:
        """Collective: the media of the eval source, agreed by every rank (a rank with padding only has both
        media's inputs and must make the same model calls as the others)."""
        has = [media for media, keys in MEDIA_KEYS.items() if keys[0] in batch]
        code = torch.tensor([MEDIA_CODES[has[0]] if len(has) == 1 else 0], device=batch["input_ids"].device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
        media = {value: key for key, value in MEDIA_CODES.items()}.get(int(code))
        if media is None:
            raise ValueError("vla_pretrain eval: no rank has a real sample in this batch")
        return media


def audio_captions(sample: dict[str, Any]) -> list[str]:
    """A clip's captions: its json ``captions`` (audio_retrieval: 5) when there are any, else its txt."""
    meta = sample.get("json")
    captions = meta.get("captions") if isinstance(meta, dict) else None
    captions = [c.strip() for c in captions or [] if isinstance(c, str) and c.strip()]
    if not captions and sample.get("txt", "").strip():
        captions = [sample["txt"].strip()]
    if not captions:
        raise SkipSample("empty_text")
    return captions
