"""Audio downstream tasks: the image retrieval and classification tasks with clips as the media.

- ``audio_retrieval`` (``AudioRetrievalTask``): Clotho / AudioCaps protocol. Training: ATC (global negatives
  across the DP group) + ATM (hard negatives from ATC similarities) through ``vl_pretrain_losses``. Eval: each
  clip with its first ``captions_per_clip`` (5) captions; ``a2t_r1/5/10`` (a clip counts when its best-ranked
  caption is in the top K), ``t2a_r1/5/10``, ``r_mean``, ``t2a_map10`` (DCASE 2022 task 6B mAP@10,
  ``pipeline.metrics.retrieval.mean_average_precision``), ``num_clips``, ``num_captions``; headline ``t2a_r5``;
  chance baseline. ``atm_rerank`` K > 0 adds the same metrics as ``atm_*`` after re-ranking each query's top-K
  by ATM. Predictions: ``{"audio_to_text": [{"audio_id", "caption_ids"}], "text_to_audio": [{"caption_id",
  "audio_ids"}]}``, top 10, with the shards' ids (``audio_id``; caption ids from AudioCaps' ``audiocap_ids``,
  else ``<audio_id>#<k>``).
- ``audio_classification`` (``AudioClassificationTask``): ESC-50 style; a linear head on the audio pooled
  output, top-1/top-5, classes from the training folder's ``classes.json`` by ``label_name``. Predictions:
  ``[{"key", "top5"}]`` with the clip's ``filename`` as the key (the shard key when there is none).

Clips come as decoded ``flac`` (waveform, rate) and become log-mel features in the loader workers
(``downstream_common.audio_tensor``); a clip without features (wrong rate, shorter than one frame, not finite)
is a SkipSample: counted and skipped by the loader, never a crash. Both tasks need ``audio`` in
``model.modalities`` (retrieval also ``text``).
Shape letters: B batch, K captions per clip, L text length, T log-mel frames, F mel bands.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pipeline.config_utils import ConfigError
from pipeline.metrics.retrieval import AUDIO_DIRECTIONS
from pipeline.tasks.base import TaskContext
from pipeline.tasks.classification import ClassificationTask
from pipeline.tasks.downstream_common import AUDIO_FIELD, AUDIO_MANIFESTS, audio_tensor, blank_audio
from pipeline.tasks.pretrain import pair_passes
from pipeline.tasks.retrieval import RetrievalTask



class AudioMedia:
    """The media pieces of the audio tasks (mixed in before the image task they reuse)."""

    media = "audio"
    name: str
    ctx: TaskContext

    def setup(self) -> None:
        needed = ["audio"] + (["text"] if isinstance(self, RetrievalTask) else [])
        missing = [m for m in needed if m not in self.ctx.model_cfg.modalities]
        if missing:
            raise ConfigError(f"task {self.name}: model.modalities={self.ctx.model_cfg.modalities} lacks {missing}; "
                              f"set model.modalities to include {needed} (a model trained without them cannot "
                              "be fine-tuned for it)")
        super().setup()  # type: ignore[misc]

    def media_tensors(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{"audio_values" [T, F], "audio_lengths" long scalar} of the decoded clip (SkipSample if unusable)."""
        return audio_tensor(sample.get(AUDIO_FIELD), self.ctx.model_cfg.audio)

    def blank_media(self) -> dict[str, torch.Tensor]:
        return blank_audio(self.ctx.model_cfg.audio)


@dataclasses.dataclass
class AudioRetrievalOptions:
    captions_per_clip: int = dataclasses.field(default=5, metadata={
        "help": "captions per clip at eval (Clotho: 5); fewer are padded, more dropped"})
    atm_rerank: int = dataclasses.field(default=0, metadata={
        "help": "re-rank each query's top-K dual-encoder candidates by ATM after evaluation (0 = off)"})

    def __post_init__(self) -> None:
        if self.captions_per_clip < 1 or self.atm_rerank < 0:
            raise ValueError(f"captions_per_clip must be >= 1 and atm_rerank >= 0, got {self.captions_per_clip} "
                             f"and {self.atm_rerank}")


class AudioRetrievalTask(AudioMedia, RetrievalTask):
    name = "audio_retrieval"
    fields = (AUDIO_FIELD, "txt", "json")
    manifest_tasks = AUDIO_MANIFESTS
    Options = AudioRetrievalOptions
    objectives = {"atc": 1.0, "atm": 1.0}
    headline = "t2a_r5"
    directions = AUDIO_DIRECTIONS
    count_metric = "num_clips"
    map_k = 10

    @classmethod
    def passes(cls, objectives: dict[str, float], options: Any) -> dict[str, int]:
        """ATC: clip + text; ATM: also 3 fused clip-text pairs ("audio+text")."""
        return pair_passes(objectives, "audio")

    @property
    def captions_per_item(self) -> int:
        return self.options.captions_per_clip

    @property
    def rerank_top_k(self) -> int:
        return self.options.atm_rerank

    def media_id(self, meta: dict[str, Any], sample: dict[str, Any]) -> str:
        return str(meta.get("audio_id", sample.get("__key__", "")))

    def caption_ids(self, meta: dict[str, Any], media_id: str, count: int) -> list[str]:
        """AudioCaps' ``audiocap_ids`` when they pair one to one with the shard's captions, else ``audio_id#k``."""
        ids, captions = meta.get("audiocap_ids"), meta.get("captions")
        if isinstance(ids, list) and isinstance(captions, list) and len(ids) == len(captions) >= count:
            return [str(i) for i in ids[:count]]
        return [f"{media_id}#{k}" for k in range(count)]

    def stored_media(self, outputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return outputs["audio_values"], outputs["audio_lengths"].long()  # gathered as float


class AudioClassificationTask(AudioMedia, ClassificationTask):
    name = "audio_classification"
    fields = (AUDIO_FIELD, "cls", "json")
    manifest_tasks = ("audio_classification",)

    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        """As the image task's, keyed by the clip's file name (ESC-50 ``filename``) when the shard has one, so
        the predictions name the dataset's clips rather than shard keys."""
        prepared = super().prepare_sample(sample, train)
        meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
        return {**prepared, "key": str(meta.get("filename") or prepared["key"])}
