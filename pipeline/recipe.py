"""Stage recipes: typed, validated YAML configs for `pipeline.train` (contract: docs/INTERFACES.md s.4).

A recipe owns the model, data, objectives, optimiser, schedule, batch sizes and step counts; the
ds_config JSON owns engine settings only. Load with ``load_recipe(path, overrides)``; every field
can be overridden with ``--set a.b=c`` (YAML-typed, checked; unknown keys rejected).

When ``init_from`` names an earlier run, ``model:`` may hold only what changes (e.g. ``moe.ep_size``):
it is merged over the model config saved in that run's ``resolved_recipe.yaml``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config_utils import ConfigError, apply_overrides, from_dict, to_dict
from pipeline.model.config import ModelConfig


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    if default is not dataclasses.MISSING and isinstance(default, (list, dict)):
        kw["default_factory"] = lambda d=default: copy.deepcopy(d)
        default = dataclasses.MISSING
    return field(default=default, metadata={"help": help}, **kw)


@dataclasses.dataclass
class SourceConfig:
    path: str = _f(help="data_prep output folder holding manifest.json")
    split: str = _f("train", help="split name in the manifest")
    weight: float = _f(1.0, help="sampling weight when several training sources are mixed")

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ConfigError(f"data source {self.path}: weight must be > 0, got {self.weight}")


@dataclasses.dataclass
class DataConfig:
    train: list[SourceConfig] = _f(help="training sources (resampled shards, mixed by weight)")
    tokenizer: str = _f(help="Hugging Face tokenizer folder (data_prep tokenizer output)")
    eval: SourceConfig | None = _f(None, help="evaluation source, read exactly once per eval")
    image_size: int = _f(64, help="every image becomes image_size x image_size (a multiple of model.patch_size; "
                                  "another size than model.image_size interpolates the position embeddings, e.g. to "
                                  "fine-tune at a higher resolution)")
    text_len: int = _f(32, help="every text is padded/truncated to this many tokens")
    num_workers: int = _f(1, help="DataLoader workers per rank")
    shuffle_buffer: int = _f(1000, help="samples in the training shuffle buffer")
    allow_pipe_urls: bool = _f(False, help="allow 'pipe:' shard URLs (they run shell commands)")
    max_consecutive_failures: int = _f(
        1000, help="training stops with an error naming the source after this many failed reads in a row "
                   "(unreadable/missing shards, corrupt samples; a missing sample of a short shard counts one)")
    max_failure_share: float = _f(
        0.5, help="training stops with an error when more than this share of the last data.failure_window "
                  "reads of a source failed (1.0 = off)")
    failure_window: int = _f(10_000, help="reads (samples, failed shards) over which max_failure_share is measured")
    verify_checksums: bool = _f(False, help="check each shard's sha256 against manifest.json 'checksums' "
                                            "before reading it (once per file version per worker)")

    def __post_init__(self) -> None:
        if not self.train:
            raise ConfigError("data.train: give at least one source")
        if self.image_size <= 0 or self.text_len <= 0:
            raise ConfigError("data.image_size and data.text_len must be > 0")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        if self.max_consecutive_failures < 1 or self.failure_window < 1:
            raise ConfigError(f"data.max_consecutive_failures ({self.max_consecutive_failures}) and "
                              f"data.failure_window ({self.failure_window}) must be >= 1")
        if not 0 < self.max_failure_share <= 1:
            raise ConfigError(f"data.max_failure_share: expected a share in (0, 1], got {self.max_failure_share}")


@dataclasses.dataclass
class OptimConfig:
    lr: float = _f(5.0e-4, help="peak learning rate (AdamW)")
    weight_decay: float = _f(0.05, help="AdamW weight decay (not applied to biases, norms, embeddings)")
    betas: list[float] = _f([0.9, 0.98], help="AdamW betas")
    eps: float = _f(1.0e-8, help="AdamW epsilon")
    head_lr_mult: float = _f(1.0, help="learning-rate multiplier for task heads")
    grad_clip: float = _f(1.0, help="gradient clipping by global norm (0 = off)")

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.head_lr_mult <= 0:
            raise ConfigError("optim.lr and optim.head_lr_mult must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two values in [0, 1), got {self.betas}")
        if self.grad_clip < 0:
            raise ConfigError("optim.grad_clip must be >= 0")


@dataclasses.dataclass
class ScheduleConfig:
    kind: Literal["cosine", "linear", "constant"] = _f("cosine", help="decay after warm-up")
    warmup_steps: int = _f(0, help="linear warm-up steps from 0")
    min_lr_ratio: float = _f(0.0, help="final lr as a fraction of the peak (cosine/linear)")

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("schedule: warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")


@dataclasses.dataclass
class BatchConfig:
    micro_batch_size: int = _f(16, help="samples per rank per forward (fixed: the MoE invariant)")
    grad_accum: int = _f(1, help="micro-batches per optimizer step")
    global_batch_size: int | None = _f(
        None, help="optional check: must equal micro_batch_size * grad_accum * world_size")

    def __post_init__(self) -> None:
        if self.micro_batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("batch.micro_batch_size and batch.grad_accum must be > 0")

    def global_size(self, dp_size: int) -> int:
        return self.micro_batch_size * self.grad_accum * dp_size


@dataclasses.dataclass
class TrainConfig:
    steps: int = _f(300, help="optimizer steps in this stage")
    eval_every: int = _f(100, help="evaluate every N steps (0 = only at the end)")
    save_every: int = _f(100, help="checkpoint every N steps (0 = only at the end)")
    keep_last: int = _f(2, help="complete checkpoints kept")
    log_every: int = _f(10, help="console/TensorBoard interval in steps")
    seed: int = _f(1234, help="seed for weights, data order and masking")
    peak_tflops: float | None = _f(None, help="peak TFLOP/s per rank for MFU; null = measure at start")
    eval_max_batches: int | None = _f(None, help="cap on eval batches per rank (null = full pass)")
    nonfinite_budget: int = _f(3, help="steps in a row with a non-finite loss or gradient norm that are "
                                       "skipped before the run stops with an error (exit 3)")
    routing_images: int = _f(4, help="at each evaluation, TensorBoard images routing/sample_<i> of the first N "
                                     "eval samples (image tasks): the expert of every patch and token "
                                     "(pipeline.routing_pictures); 0 = off")

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.log_every <= 0 or self.keep_last <= 0:
            raise ConfigError("train.steps, train.log_every and train.keep_last must be > 0")
        if self.eval_every < 0 or self.save_every < 0 or self.nonfinite_budget < 0 or self.routing_images < 0:
            raise ConfigError("train.eval_every, train.save_every, train.nonfinite_budget and train.routing_images "
                              "must be >= 0")


@dataclasses.dataclass
class InitConfig:
    """Pretrained weights for this stage's fresh model (pipeline.model.init_recipe); not with init_from."""

    vit: str | None = _f(None, help="Hugging Face ViT folder (config.json + weights): image embeddings, shared "
                                    "attention, norms and FFNs (text/VL FFNs start as copies of its FFN)")
    bert: str | None = _f(None, help="Hugging Face BERT folder with data.tokenizer's vocabulary: text token and "
                                     "position embeddings (BERT blocks are post-LN, ours pre-LN: not copied)")
    upcycle: bool = _f(True, help="with vit: every MoE expert starts as a copy of the ViT FFN it replaces, "
                                  "routers fresh (sparse upcycling); false = experts keep their from-scratch init")
    ast: str | None = _f(None, help="Hugging Face AST folder (ASTModel / ASTForAudioClassification, config.json + "
                                    "weights): audio patch embedding, CLS and positions (model.audio must match "
                                    "its patches, strides and mel bands)")

    def __post_init__(self) -> None:
        if not self.upcycle and self.vit is None:
            raise ConfigError("init.upcycle=false only applies with init.vit (experts upcycled from its FFN)")

    @property
    def active(self) -> bool:
        return self.vit is not None or self.bert is not None or self.ast is not None


@dataclasses.dataclass
class Recipe:
    task: str = _f(help="task registry name (pipeline.tasks.TASKS) or a Task class's import path module:Class")
    data: DataConfig = _f(help="shards, tokenizer, shapes")
    model: ModelConfig = _f(default_factory=ModelConfig, help="the model (pipeline.model.config.ModelConfig); "
                            "with init_from, merged over that run's model")
    init_from: str | None = _f(None, help="RUN_DIR or RUN_DIR/TAG of an earlier stage: weights only")
    init: InitConfig = _f(default_factory=InitConfig, help="pretrained ViT / BERT / AST weights for a fresh model "
                                                             "(first stage; `--set init={}` turns it off)")
    objectives: dict[str, float] = _f({}, help="objective name -> loss weight, only the task's objectives "
                                      "(Task.objectives); empty = the task's defaults, one not named weighs 0")
    task_options: dict[str, Any] = _f({}, help="the task's options (its Options dataclass; unknown keys rejected)")
    freeze: list[str] = _f([], help="regexes over parameter names to freeze")
    optim: OptimConfig = _f(default_factory=OptimConfig, help="optimiser")
    schedule: ScheduleConfig = _f(default_factory=ScheduleConfig, help="learning-rate schedule")
    batch: BatchConfig = _f(default_factory=BatchConfig, help="batch sizes")
    train: TrainConfig = _f(default_factory=TrainConfig, help="steps and intervals")
    supports_ds_configs: list[str] = _f(
        [], help="ds_configs/*.json names this recipe is tested with (empty = any)")

    def __post_init__(self) -> None:
        from pipeline.tasks import get_task_class

        try:
            task_class = get_task_class(self.task)
        except ConfigError as exc:
            raise ConfigError(f"task: {exc}") from exc
        self.objectives = task_class.resolve_objectives(self.objectives)
        task_class.parse_options(self.task_options)  # checked here, typed again where the task is built
        if self.data.text_len > self.model.max_text_len:
            raise ConfigError(f"data.text_len={self.data.text_len} exceeds model.max_text_len="
                              f"{self.model.max_text_len} (text positions are learned up to it)")
        if "image" in self.model.modalities:
            if self.data.image_size % self.model.patch_size:
                raise ConfigError(f"data.image_size={self.data.image_size} is not a multiple of model.patch_size="
                                  f"{self.model.patch_size}")
            problem = self.model.token_merge_problem(self.data.image_size)
            if problem:
                raise ConfigError(f"model: {problem} (data.image_size)")
        if self.init.active and self.init_from:
            raise ConfigError(f"init (init.vit / init.bert / init.ast) and init_from={self.init_from} are both set: "
                              "init_from already gives every weight (the earlier stage's); drop the init section")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path}: file not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping at the top level")
    return data


def build_model_config(model: dict[str, Any]) -> Any:
    """ModelConfig from a plain dict (strict: unknown keys rejected)."""
    from pipeline.model.config import ModelConfig

    return from_dict(ModelConfig, copy.deepcopy(model), "model")


def init_from_shape_error(init_from: str | Path, mismatched: list[str]) -> ConfigError:
    """The error for a recipe whose model cannot load ``init_from``'s weights; ``mismatched`` lists
    "tensor: shape vs shape" items (pipeline.plan before launch, checkpoint.load_weights at load)."""
    from pipeline.run.run_dir import RunDir

    return ConfigError(
        f"init_from {init_from}: {len(mismatched)} tensors of this recipe's model have other shapes than its "
        "checkpoint's, e.g. " + "; ".join(mismatched[:3]) + ". The recipe's model: section is merged over the "
        f"model in {RunDir.of(init_from).recipe_path}; make them agree (patch_size, "
        "patch_embed, hidden_size, num_layers, vocab_size, moe.num_experts, ...)")


def merged_model_dict(data: dict[str, Any]) -> dict[str, Any]:
    """Recipe ``model`` merged over the previous stage's model when ``init_from`` is set."""
    model = copy.deepcopy(data.get("model") or {})
    if not data.get("init_from"):
        return model
    from pipeline.run.run_dir import RunDir

    previous = read_yaml(RunDir.of(data["init_from"]).saved_recipe("init_from")).get("model", {})
    return _deep_merge(previous, model)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The Recipe of a YAML file plus ``--set`` overrides; ConfigError on mistakes."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return recipe_from_dict(data, where=str(path))


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    data = copy.deepcopy(data)
    data["model"] = merged_model_dict(data)  # typed after the merge: a stage may give only what changes
    try:
        return from_dict(Recipe, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
