"""The contract between the training/eval loop and a task (pretraining objective set or downstream task).

A Task turns decoded shard samples into fixed-shape tensors, owns its heads, computes its training loss
and its evaluation outputs and metrics. The loop (``pipeline.train`` / ``pipeline.evaluate``) owns
everything distributed: loaders, DeepSpeed engine, gathering eval outputs across ranks, padding.

Shape letters: B batch, L text length, C channels, H/W image size, D hidden, V vocab, A answers.
"""
from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


class SkipSample(Exception):
    """Raised by ``Task.prepare_sample`` for a sample that must be skipped; ``reason`` is counted."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class DistInfo:
    """Distributed facts handed to tasks (never read from env vars inside tasks)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # data-parallel process group for gathers in losses (None = default/world)


@dataclasses.dataclass
class TaskContext:
    """Everything a task needs to build heads and prepare samples."""

    model_cfg: Any  # pipeline.model.config.ModelConfig
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    text_len: int  # every text is padded/truncated to exactly this many tokens
    image_size: int  # every image becomes exactly image_size x image_size
    data_dir: Path | None  # the first TRAINING folder: its answers.json / classes.json size the heads
    objectives: dict[str, float]  # objective name -> loss weight (e.g. {"itc": 1, "itm": 1, "mlm": 1})
    dist: DistInfo = dataclasses.field(default_factory=DistInfo)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # task-specific recipe options


@dataclasses.dataclass
class LossOutput:
    loss: torch.Tensor  # weighted sum of the task's terms, WITHOUT the MoE aux loss
    terms: dict[str, torch.Tensor]  # each unweighted loss term / accuracy, detached, for logging
    aux_loss: torch.Tensor  # sum of MoE aux losses of every model call in this step
    expert_counts: dict[str, torch.Tensor]  # "layer{L}/{modality}" -> [E] token counts, summed over calls


class Task(ABC):
    """Base class of every task; subclasses register themselves in ``pipeline.tasks.TASKS``."""

    name: ClassVar[str]
    #: shard fields the task reads (webdataset extensions), e.g. ("jpg", "txt", "json")
    fields: ClassVar[tuple[str, ...]]
    #: data_prep manifest ``task`` values whose folders this task can read
    manifest_tasks: ClassVar[tuple[str, ...]]
    #: files the task reads from the training folder (``ctx.data_dir``), e.g. ("answers.json",)
    vocab_files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: TaskContext):
        self.ctx = ctx

    @abstractmethod
    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        """Heads for this task; may tie weights to ``model`` (e.g. MLM decoder to token embeddings)."""

    @abstractmethod
    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        """Decoded shard sample (PIL.Image RGB for image fields, str for txt, dict for json, int for cls)
        -> dict of fixed-shape tensors (and plain ints/strs for ids). Pure; raise SkipSample if unusable."""

    @abstractmethod
    def padding_sample(self) -> dict[str, Any]:
        """A sample with the same keys and shapes as ``prepare_sample`` output, used to pad the last
        eval batch; the loop marks it ``valid=False`` so it never reaches the metrics."""

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack tensors, list everything else. Adds nothing; the loop adds ``valid`` [B] bool."""
        batch: dict[str, Any] = {}
        for key in samples[0]:
            values = [s[key] for s in samples]
            batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        return batch

    @abstractmethod
    def training_loss(self, model: nn.Module, heads: nn.ModuleDict, batch: dict[str, Any]) -> LossOutput:
        """Forward pass(es) and the task loss for one micro-batch."""

    @abstractmethod
    def eval_outputs(self, model: nn.Module, heads: nn.ModuleDict, batch: dict[str, Any]) -> dict[str, Any]:
        """Per-sample eval outputs: tensors with leading dim B (gathered across ranks and filtered by
        ``valid`` by the loop) or lists of length B (gathered as objects)."""

    @abstractmethod
    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        """Metrics from all gathered eval outputs (all ranks, padding removed). Runs on every rank."""

    def predictions(self, outputs: dict[str, Any]) -> Any | None:
        """Optional official-format predictions (e.g. VQA results list), JSON-able; None if none."""
        return None

    def write_predictions(self, outputs: dict[str, Any], path_stem: Path) -> Path | None:
        """Write ``predictions(outputs)`` in the benchmark's submission format to ``path_stem`` + the
        format's suffix; returns the path, or None when the task has no predictions. Default: JSON."""
        predictions = self.predictions(outputs)
        if predictions is None:
            return None
        path = Path(f"{path_stem}.json")
        path.write_text(json.dumps(predictions))
        return path
