"""The contract between the training/eval loop and a task (pretraining objective set or downstream task).

A Task is the ``nn.Module`` that holds the model (``self.model``) and the task's heads (``self.heads``):
DeepSpeed wraps it and ``engine(batch)`` is the training loss. It also turns decoded shard samples into
fixed-shape tensors and owns its typed options, objectives, evaluation outputs, metrics, baseline and
headline metric. The loop (``pipeline.train`` / ``pipeline.evaluate``) owns everything distributed:
loaders, the DeepSpeed engine, gathering eval outputs across ranks, padding.

Shape letters: B batch, L text length, C channels, H/W image size, D hidden, V vocab, A answers.
"""
from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from pipeline.config_utils import ConfigError, from_dict


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


@dataclasses.dataclass
class TaskContext:
    """Everything a task needs to build heads and prepare samples."""

    model_cfg: Any  # pipeline.model.config.ModelConfig
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    text_len: int  # every text is padded/truncated to exactly this many tokens
    image_size: int  # every image becomes exactly image_size x image_size
    data_dir: Path | None  # the first TRAINING folder: its answers.json / classes.json size the heads
    objectives: dict[str, float]  # objective name -> loss weight (``Task.resolve_objectives``)
    dist: DistInfo = dataclasses.field(default_factory=DistInfo)
    options: Any = None  # the task's ``Options`` (``Task.parse_options`` of the recipe's task_options)


class LossOutput(NamedTuple):
    """A training step's loss WITHOUT the MoE aux loss (the model records that itself: ``model.moe_stats``)."""

    loss: torch.Tensor  # weighted sum of the task's terms
    terms: dict[str, torch.Tensor]  # each unweighted loss term / accuracy, detached, for logging


def promote_scalar_params(module: nn.Module) -> list[str]:
    """0-dim parameters (e.g. a logit scale) -> shape [1]: DeepSpeed's initial broadcast views every
    parameter as bytes, which fails for 0-dim tensors. Broadcasting keeps the maths unchanged."""
    names = []
    for owner_name, owner in module.named_modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(owner, name, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
                names.append(f"{owner_name}.{name}".lstrip("."))
    return names


@dataclasses.dataclass
class NoOptions:
    """A task without options: ``task_options`` must be empty."""


class Task(nn.Module, ABC):
    """Base class of every task. Registered by name in ``pipeline.tasks.TASKS`` or named in a recipe by
    import path (``task: package.module:ClassName``).

    Parameter names are ``model.*`` and ``heads.*`` (checkpoints rely on them). Built without a model
    (``model=None``) a task only prepares samples (data loaders, benchmarks) and has no heads.
    DataLoader workers are forked and keep a reference to the task (and so to the model): fine on Linux,
    where nothing is pickled."""

    name: ClassVar[str]
    #: shard fields the task reads (webdataset extensions), e.g. ("jpg", "txt", "json")
    fields: ClassVar[tuple[str, ...]]
    #: fields decoded only when a sample has them, e.g. fields=("txt",), optional_fields=("jpg", "flac") for a
    #: task that reads images or audio; a missing ``fields`` entry is SkipSample("missing_<field>")
    optional_fields: ClassVar[tuple[str, ...]] = ()
    #: data_prep manifest ``task`` values whose folders this task can read
    manifest_tasks: ClassVar[tuple[str, ...]]
    #: files the task reads from the training folder (``ctx.data_dir``), e.g. ("answers.json",)
    vocab_files: ClassVar[tuple[str, ...]] = ()
    #: the recipe's ``task_options`` (a dataclass, built strictly: unknown keys are an error)
    Options: ClassVar[type] = NoOptions
    #: objective name -> default loss weight; the recipe's ``objectives`` may name only these
    objectives: ClassVar[dict[str, float]]
    #: the metric a report leads with; None = no evaluation of its own (pretraining: fine-tune it first)
    headline: ClassVar[str | None] = None

    def __init__(self, ctx: TaskContext, model: nn.Module | None = None):
        super().__init__()
        self.ctx = ctx
        self.setup()
        self.model = model
        self.heads = self.build_heads(model) if model is not None else nn.ModuleDict()
        promote_scalar_params(self)

    # ------------------------------------------------------------------------- recipe (class level)
    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> Any:
        """The recipe's ``task_options`` as ``cls.Options`` (ConfigError naming unknown keys and valid ones)."""
        if options and not dataclasses.fields(cls.Options):
            raise ConfigError(f"task_options: task {cls.name} takes no options, got {sorted(options)}")
        return from_dict(cls.Options, dict(options or {}), "task_options")

    @classmethod
    def resolve_objectives(cls, weights: dict[str, float]) -> dict[str, float]:
        """The recipe's ``objectives`` over every objective of the task: empty = the task's defaults; an
        objective the recipe does not name weighs 0. Unknown names or negative weights: ConfigError."""
        unknown = sorted(set(weights) - set(cls.objectives))
        if unknown:
            raise ConfigError(f"objectives: unknown objective(s) {unknown} for task {cls.name}; valid "
                              f"objectives are {sorted(cls.objectives)}")
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative:
            raise ConfigError(f"objectives: weights must be >= 0, got {negative}")
        if not weights:
            return {k: float(v) for k, v in cls.objectives.items()}
        return {k: float(weights.get(k, 0.0)) for k in cls.objectives}

    @classmethod
    def passes(cls, objectives: dict[str, float], options: Any) -> dict[str, int]:
        """Model passes per training sample, ``{"image": n, "text": n, "fuse": n}`` (FLOPs, activations)."""
        return {"fuse": 1}

    # ------------------------------------------------------------------------------ module side
    def setup(self) -> None:
        """Task state read from ``self.ctx`` before the heads are built (e.g. the answer vocabulary)."""

    @property
    def options(self) -> Any:
        return self.ctx.options

    @property
    def weights(self) -> dict[str, float]:
        """Loss weight of every objective of the task (``resolve_objectives`` of the context's)."""
        return self.resolve_objectives(self.ctx.objectives)

    @abstractmethod
    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        """Heads for this task; may tie weights to ``model`` (e.g. MLM decoder to token embeddings)."""

    @abstractmethod
    def forward(self, batch: dict[str, Any]) -> LossOutput:
        """Forward pass(es) and the training loss for one micro-batch."""

    @abstractmethod
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Per-sample eval outputs: tensors with leading dim B (gathered across ranks and filtered by
        ``valid`` by the loop) or lists of length B (gathered as objects)."""

    # ------------------------------------------------------------------------------ samples
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

    # ------------------------------------------------------------------------------ evaluation
    @abstractmethod
    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        """Metrics from all gathered eval outputs (all ranks, padding removed). Runs on every rank."""

    def extra_metrics(self, outputs: dict[str, Any], batch_size: int, progress: Any = None) -> dict[str, float]:
        """Evaluation the task does after the gathered outputs, driven by its options (collective: every
        rank calls it; batches of exactly ``batch_size``). Default: none."""
        return {}

    def baseline(self, outputs: dict[str, Any], data_dir: Path) -> tuple[str, dict[str, float]]:
        """(name, metrics with the task's metric names) of the reference figure printed next to each score
        for the gathered ``outputs`` of ``data_dir``'s evaluated split. Default: none."""
        return "none", {}

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
