"""Build what a run needs from a recipe: tokenizer, the task (the module holding model + heads), optimizer
param groups (weight decay, head lr multiplier, freeze patterns, MoE groups), the DeepSpeed engine."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config_utils import ConfigError
from pipeline.run.schedule import LrFactor
from pipeline.tasks import DistInfo, Task, TaskContext, get_task_class

log = logging.getLogger(__name__)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"data.tokenizer: {path} is not a folder (make one with `python -m data_prep "
                          "tokenizer`)")
    return AutoTokenizer.from_pretrained(path)


def build_task(recipe: Any, tokenizer: Any, dist: DistInfo, model: nn.Module | None = None) -> Task:
    """The recipe's task holding ``model`` (``build_model``) and its heads: what DeepSpeed wraps. Without a
    model it only prepares samples (data loaders, benchmarks)."""
    if len(tokenizer) > recipe.model.vocab_size:
        raise ConfigError(f"model.vocab_size={recipe.model.vocab_size} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens: set model.vocab_size >= {len(tokenizer)}")
    # the training data's vocabulary sizes the heads; eval data is scored against it, never sizes them
    train_path = Path(recipe.data.train[0].path)
    data_dir = train_path if train_path.is_dir() else None
    task_class = get_task_class(recipe.task)
    if task_class.vocab_files and data_dir is None:
        raise ConfigError(f"data.train[0].path: {train_path} is not a folder; task {recipe.task} reads "
                          f"{', '.join(task_class.vocab_files)} from the training data folder (it sizes the "
                          "heads, also when evaluating on other data)")
    ctx = TaskContext(model_cfg=recipe.model, tokenizer=tokenizer, text_len=recipe.data.text_len,
                      image_size=recipe.data.image_size, data_dir=data_dir,
                      objectives=recipe.objectives, dist=dist,  # resolved by Recipe
                      options=task_class.parse_options(recipe.task_options))
    return task_class(ctx, model)


def build_model(recipe: Any, seed: int) -> nn.Module:
    """The recipe's model: from-scratch init, then ``recipe.init``'s pretrained weights when set. Identical
    dense weights on every rank; each EP rank draws (or upcycles) its own experts."""
    from pipeline.model import VLMoE
    from pipeline.model.init_recipe import apply_init

    torch.manual_seed(seed)
    model = VLMoE(recipe.model)
    if recipe.init.active:
        apply_init(model, recipe.init)
    return model


def apply_freeze(module: nn.Module, patterns: list[str]) -> list[str]:
    """Set requires_grad=False on parameters whose name matches any regex; returns the frozen names."""
    regexes = [re.compile(p) for p in patterns]
    frozen = []
    for name, param in module.named_parameters():
        if any(r.search(name) for r in regexes):
            param.requires_grad_(False)
            frozen.append(name)
    unused = [p for p, r in zip(patterns, regexes) if not any(r.search(n) for n, _ in module.named_parameters())]
    if unused:
        raise ConfigError(f"freeze: pattern(s) {unused} match no parameter (names look like "
                          f"{next(iter(dict(module.named_parameters())))!r})")
    return frozen


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "embedding" in name or "position" in name or name.endswith(".cls") \
        or "logit_scale" in name or "norm" in name or name.endswith(".experts.w3")  # dropless experts' biases


def param_groups(module: Task, optim: Any) -> list[dict[str, Any]]:
    """AdamW groups: (body|heads) x (decay|no decay), heads at lr * head_lr_mult, then split into
    DeepSpeed MoE groups (expert params must sit in their own groups)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    seen: set[int] = set()
    for name, param in module.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        is_head = name.startswith("heads.")
        no_decay = _no_decay(name, param)
        group = groups.setdefault((is_head, no_decay), {
            "name": f"{'heads' if is_head else 'body'}_{'no_decay' if no_decay else 'decay'}",
            "params": [], "lr": optim.lr * (optim.head_lr_mult if is_head else 1.0),
            "weight_decay": 0.0 if no_decay else optim.weight_decay})
        group["params"].append(param)
    return split_params_into_different_moe_groups_for_optimizer(list(groups.values()))


def build_optimizer(module: Task, recipe: Any, ds_config: dict[str, Any]) -> torch.optim.Optimizer:
    optim = recipe.optim
    groups = param_groups(module, optim)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if offload == "cpu" and torch.cuda.is_available():  # CPU-only hosts: no JIT build, plain AdamW
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        except Exception as exc:  # op not buildable here: torch AdamW (zero_force_ds_cpu_optimizer=false)
            log.warning("DeepSpeedCPUAdam unavailable (%s); using torch AdamW with offload", exc)
    return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Any) -> torch.optim.lr_scheduler.LambdaLR:
    s = recipe.schedule
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, LrFactor(recipe.train.steps, s.warmup_steps, s.kind, s.min_lr_ratio))


def build_engine(module: Task, recipe: Any, ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """(engine, lr_scheduler): deepspeed.initialize with our optimizer and schedule."""
    import deepspeed

    from pipeline.run.distributed import skip_shm_comm_op

    skip_shm_comm_op()  # in case deepspeed.initialize creates the process group (a single process)
    optimizer = build_optimizer(module, recipe, ds_config)
    scheduler = build_scheduler(optimizer, recipe)
    engine, _, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    return engine, scheduler
