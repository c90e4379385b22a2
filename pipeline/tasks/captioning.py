"""Captioning: ``captioning`` (images: COCO / Flickr30k Karpathy, synth shapes) and ``audio_captioning`` (clips:
Clotho, AudioCaps, synth sounds). A prefix-LM over the multiway transformer (VLMo/BEiT-3): media tokens see
each other, caption tokens are causal, and the LM head is the pretraining MLM head tied to the token
embedding (head key "mlm", so ``init_from`` a vl_pretrain / vla_pretrain run carries it over).

Data: the retrieval folders (``retrieval`` / ``pairs``; ``audio_retrieval`` / ``audio_pairs``): a sample's
captions are its json ``captions`` (else its txt). Training: media + one caption drawn at random among them
(so every caption is used over the epochs), loss ``pipeline.objectives.captioning.lm_loss`` on
"[CLS] caption [SEP]" (objective ``cap``; audio ``audio_cap``). Eval: ``generate`` from "[CLS]" with the task
options, decoded without special tokens; every caption of the sample is a reference. Metrics:
``pipeline.metrics.captioning.caption_metrics`` (BLEU-1..4, ROUGE-L, CIDEr-D[, METEOR]), the item count and,
on synth data, the scene facts a caption must name (``facts_color_shape``, ``facts_pitch_timbre``). Baseline:
the most frequent caption of the same folder's train split given to every item. Predictions: the official
results format ``[{"image_id", "caption"}]`` (audio: ``[{"audio_id", "file_name"?, "caption"}]``).

Shape letters: B batch, L text length, T generated tokens.
"""
from __future__ import annotations

import collections
import dataclasses
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from data_prep.synth_sounds import NOUNS, PITCH_WORDS
from pipeline.config_utils import ConfigError
from pipeline.metrics.captioning import caption_metrics
from pipeline.model.generation import DecodeOptions, generate
from pipeline.model.heads import MLMHead
from pipeline.objectives.captioning import lm_loss
from pipeline.objectives.pretrain import CAPTION_OBJECTIVES, media_inputs
from pipeline.tasks.audio import AudioMedia
from pipeline.tasks.base import LossOutput, SkipSample, Task
from pipeline.tasks.baselines import train_records
from pipeline.tasks.downstream_common import AUDIO_FIELD, AUDIO_MANIFESTS, blank_image, image_tensor, tokenize

BASELINE = "most frequent caption"


@dataclasses.dataclass
class CaptioningOptions:
    num_beams: int = dataclasses.field(default=1, metadata={
        "help": "beam size of the eval decoding (1 = greedy)"})
    max_new_tokens: int = dataclasses.field(default=0, metadata={
        "help": "most generated tokens, [SEP] included (0 = data.text_len - 1: the longest caption trained on)"})
    min_new_tokens: int = dataclasses.field(default=1, metadata={
        "help": "[SEP] is forbidden before this many generated tokens (1: never an empty caption)"})
    length_penalty: float = dataclasses.field(default=1.0, metadata={
        "help": "beam search: score = sum log p / length ** length_penalty (> 1 favours longer captions)"})

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 0 or self.min_new_tokens < 0:
            raise ValueError(f"num_beams must be >= 1, max_new_tokens and min_new_tokens >= 0, got {self.num_beams}, "
                             f"{self.max_new_tokens} and {self.min_new_tokens}")
        if self.max_new_tokens and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) > max_new_tokens ({self.max_new_tokens})")


# ---- scene facts (synth data) ------------------------------------------------------------------------
def caption_words(caption: str) -> list[str]:
    """Lower-case words of a caption (punctuation and hyphens split: "high-pitched" -> high, pitched)."""
    return re.findall(r"[a-z0-9]+", caption.lower())


def names_any(words: list[str], phrases: Iterable[str]) -> bool:
    """Whether one of ``phrases`` occurs in ``words`` as a run of whole words."""
    for phrase in phrases:
        target = caption_words(phrase)
        if any(words[i:i + len(target)] == target for i in range(len(words) - len(target) + 1)):
            return True
    return False


def names_object(caption: str, obj: dict[str, Any]) -> bool:
    """A one-object scene's caption names the object's colour AND shape (shapes world: ``scene`` entries)."""
    words = caption_words(caption)
    return names_any(words, [str(obj.get("color"))]) and names_any(words, [str(obj.get("shape"))])


def names_event(caption: str, event: dict[str, Any]) -> bool:
    """A one-event clip's caption names the event's pitch AND timbre in any of the sound world's words
    (``data_prep.synth_sounds``: "deep" is low, "beep" a tone, "burst of noise" noise...)."""
    words = caption_words(caption)
    nouns = [noun for pair in NOUNS.get(event.get("timbre"), ()) for noun in pair]
    return names_any(words, PITCH_WORDS.get(event.get("pitch"), ())) and names_any(words, nouns)


def fact_metrics(captions: list[str], facts: list[Any], media: str) -> dict[str, float]:
    """Share of the one-object scenes (audio: one-event clips) whose caption names what must be named, and
    their count; {} when no item has such facts (real data)."""
    check, name, count = ((names_event, "facts_pitch_timbre", "num_one_event_clips") if media == "audio"
                          else (names_object, "facts_color_shape", "num_one_object_scenes"))
    single = [(c, f[0]) for c, f in zip(captions, facts) if isinstance(f, list) and len(f) == 1]
    if not single:
        return {}
    return {name: sum(check(c, f) for c, f in single) / len(single), count: float(len(single))}


def most_frequent_caption(records: Iterable[dict[str, Any]]) -> str | None:
    """The caption met most often in json records (``captions`` or ``caption``); ties: the first met."""
    counts: collections.Counter[str] = collections.Counter()
    for record in records:
        counts.update(record_captions(record))
    return counts.most_common(1)[0][0] if counts else None


def record_captions(meta: dict[str, Any], txt: Any = None) -> list[str]:
    """A sample's captions: its json ``captions`` (retrieval: usually 5), else ``caption``, else its txt."""
    captions = [c.strip() for c in meta.get("captions") or [] if isinstance(c, str) and c.strip()]
    for single in (meta.get("caption"), txt):
        if not captions and isinstance(single, str) and single.strip():
            captions = [single.strip()]
    return captions


# ---- the task ----------------------------------------------------------------------------------------
class CaptioningTask(Task):
    name = "captioning"
    fields = ("jpg",)
    optional_fields = ("txt", "json")  # the captions: json ``captions`` (retrieval), else txt (pairs)
    manifest_tasks = ("retrieval", "pairs")
    Options = CaptioningOptions
    objectives = {"cap": 1.0}
    headline = "cider_d"
    #: the media modality described (``MEDIA_KEYS``), its id key in the json, the count metric, the facts key
    media: ClassVar[str] = "image"
    id_key: ClassVar[str] = "image_id"
    count_metric: ClassVar[str] = "num_images"
    facts_key: ClassVar[str] = "scene"

    @classmethod
    def passes(cls, objectives: dict[str, float], options: Any) -> dict[str, int]:
        """One fused media + caption pass per sample."""
        return {"fuse": 1}

    def setup(self) -> None:
        if "text" not in self.ctx.model_cfg.modalities:
            raise ConfigError(f"task {self.name}: model.modalities={self.ctx.model_cfg.modalities} lacks 'text'")
        longest = self.ctx.text_len - 1
        if self.options is not None and self.options.max_new_tokens > longest:
            raise ConfigError(f"task_options.max_new_tokens={self.options.max_new_tokens} > data.text_len - 1 "
                              f"= {longest} (the [CLS] prompt and the caption share text_len positions)")

    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        return nn.ModuleDict({"mlm": MLMHead(model.token_embedding, model.cfg.layer_norm_eps)})

    @property
    def objective(self) -> str:
        return CAPTION_OBJECTIVES[self.media]

    # media-specific pieces (the audio task overrides these; AudioMedia gives media_tensors / blank_media)
    def media_tensors(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"pixel_values": image_tensor(sample.get("jpg"), self.ctx.image_size)}

    def blank_media(self) -> dict[str, torch.Tensor]:
        return {"pixel_values": blank_image(self.ctx.image_size)}

    def item_fields(self, meta: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
        """The eval sample's id (json ``image_id``, else the shard key) and its scene facts (None: none)."""
        return {self.id_key: meta.get(self.id_key, sample.get("__key__", "")), "facts": meta.get(self.facts_key)}

    def blank_item(self) -> dict[str, Any]:
        return {self.id_key: "", "facts": None}

    # samples
    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
        captions = record_captions(meta, sample.get("txt"))
        if not captions:
            raise SkipSample("no_caption")
        media = self.media_tensors(sample)
        if train:
            ids, mask = tokenize(self.ctx.tokenizer, [random.choice(captions)], self.ctx.text_len)
            return {**media, "input_ids": ids[0], "attention_mask": mask[0]}
        return {**media, **self.item_fields(meta, sample), "references": captions}

    def padding_sample(self) -> dict[str, Any]:
        return {**self.blank_media(), **self.blank_item(), "references": []}

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        inputs = media_inputs(batch, self.media)
        loss, acc = lm_loss(self.model, self.heads["mlm"], {self.media: inputs}, batch["input_ids"],
                            batch["attention_mask"])
        return LossOutput(self.weights[self.objective] * loss, {self.objective: loss.detach(),
                                                               f"{self.objective}_acc": acc})

    # evaluation
    def decode_options(self) -> DecodeOptions:
        o = self.options
        return DecodeOptions(num_beams=o.num_beams, max_new_tokens=o.max_new_tokens or self.ctx.text_len - 1,
                             min_new_tokens=o.min_new_tokens, length_penalty=o.length_penalty)

    @torch.no_grad()
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Generate from "[CLS]" for every sample (padding included: every rank steps the same batches)."""
        tok = self.ctx.tokenizer
        inputs = media_inputs(batch, self.media)
        b = inputs[0].shape[0]
        prompt = torch.full((b, 1), tok.cls_token_id, dtype=torch.long, device=inputs[0].device)
        out = generate(self.model, self.heads["mlm"], {self.media: inputs}, prompt, torch.ones_like(prompt),
                       eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, options=self.decode_options())
        captions = [c.strip() for c in tok.batch_decode(out.tokens.tolist(), skip_special_tokens=True)]
        return {"caption": captions, "references": list(batch["references"]),
                **{key: list(batch[key]) for key in self.blank_item()}}

    def score(self, captions: list[str], outputs: dict[str, Any]) -> dict[str, float]:
        """The metrics of ``captions`` (one per evaluated item, in ``outputs`` order) against the references.
        Items sharing an id (a pairs folder listing an image twice) are one item with all their references."""
        predictions: dict[str, str] = {}
        references: dict[str, list[str]] = {}
        for item, caption, refs in zip(outputs[self.id_key], captions, outputs["references"]):
            predictions.setdefault(str(item), caption)
            references.setdefault(str(item), []).extend(refs)
        return {**caption_metrics(predictions, references), self.count_metric: float(len(predictions)),
                **fact_metrics(captions, outputs["facts"], self.media)}

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        return self.score(outputs["caption"], outputs)

    def baseline(self, outputs: dict[str, Any], data_dir: Path) -> tuple[str, dict[str, float]]:
        """The most frequent caption of ``data_dir``'s train split, given to every evaluated item."""
        records = train_records(data_dir)
        caption = most_frequent_caption(records) if records is not None else None
        if caption is None:
            return BASELINE, {}
        return BASELINE, self.score([caption] * len(outputs["caption"]), outputs)

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """``[{"image_id", "caption"}]`` (COCO caption results)."""
        return [{self.id_key: item, "caption": caption} for item, caption in zip(outputs[self.id_key],
                                                                                  outputs["caption"])]


class AudioCaptioningTask(AudioMedia, CaptioningTask):
    name = "audio_captioning"
    fields = (AUDIO_FIELD,)
    manifest_tasks = AUDIO_MANIFESTS
    objectives = {CAPTION_OBJECTIVES["audio"]: 1.0}
    id_key = "audio_id"
    count_metric = "num_clips"
    facts_key = "events"

    @classmethod
    def passes(cls, objectives: dict[str, float], options: Any) -> dict[str, int]:
        return {"audio+text": 1}

    def item_fields(self, meta: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
        """Also the clip's ``file_name`` (Clotho; None when the json has none)."""
        return {**super().item_fields(meta, sample), "file_name": meta.get("file_name")}

    def blank_item(self) -> dict[str, Any]:
        return {**super().blank_item(), "file_name": None}

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """``[{"audio_id", "file_name" (when known), "caption"}]``."""
        return [{"audio_id": item, **({"file_name": name} if name else {}), "caption": caption}
                for item, name, caption in zip(outputs["audio_id"], outputs["file_name"], outputs["caption"])]
