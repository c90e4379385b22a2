"""Helpers shared by the rank-side scripts (run under the real `deepspeed` launcher)."""
from __future__ import annotations

import datetime
import os

import torch

from pipeline.run.distributed import enable_stack_dumps, skip_shm_comm_op
from pipeline.model import ModelConfig, MoEConfig

TINY = dict(hidden_size=32, num_layers=4, num_heads=2, image_size=16, patch_size=8, vocab_size=60,
            max_text_len=8, num_fusion_layers=1)


def init_dist() -> tuple[int, int]:
    import deepspeed
    enable_stack_dumps()  # the test helpers' SIGUSR2 on a timeout: where each rank hangs
    torch.set_num_threads(1)
    skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=90))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def tiny_cfg(**moe) -> ModelConfig:
    return ModelConfig(**TINY, moe=MoEConfig(**{"num_experts": 4, "min_capacity": 1, **moe}))


def setup_expert_parallel(model: torch.nn.Module) -> None:
    """What deepspeed.initialize does for MoE modules: create/attach the EP process groups."""
    for module in model.modules():
        if hasattr(module, "set_deepspeed_parallelism"):
            module.set_deepspeed_parallelism()


def batch(b: int, seed: int, real_lengths: list[int]) -> dict[str, torch.Tensor]:
    """Random pixels/ids; text i has real_lengths[i] real tokens ([CLS] first), the rest padding (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (b, 8), generator=g)
    mask = torch.zeros(b, 8, dtype=torch.long)
    for i, length in enumerate(real_lengths):
        mask[i, :length] = 1
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    ids[:, 0] = torch.where(mask[:, 0].bool(), 2, 0)
    return {"pixel_values": torch.randn(b, 3, 16, 16, generator=g), "input_ids": ids, "attention_mask": mask}


def engine_of_run(run_dir: str):
    """(engine in eval mode, its dist info): a run's task rebuilt with its own EP size and engine config (the
    checkpoint's ``ds_config.json``: ZeRO stage and all), its newest complete checkpoint loaded into the engine."""
    import json

    from pipeline.recipe import load_recipe
    from pipeline.run.build import build_engine, build_model, build_task, load_tokenizer
    from pipeline.run.checkpoint import weights_only_loads
    from pipeline.run.distributed import init_distributed
    from pipeline.run.run_dir import RunDir
    from pipeline.tasks import DistInfo

    enable_stack_dumps()
    torch.set_num_threads(1)
    dist = init_distributed()
    run, tag = RunDir.resolve(run_dir)
    recipe = load_recipe(run.saved_recipe(run_dir), ["init_from=null", "init={}"])  # its EP size stays
    task = build_task(recipe, load_tokenizer(recipe.data.tokenizer), DistInfo(dist.rank, dist.world_size),
                      build_model(recipe, recipe.train.seed))
    engine, _ = build_engine(task, recipe, json.loads(run.ds_config_of(tag).read_text()))
    weights_only_loads(engine)
    loaded, _ = engine.load_checkpoint(str(run.checkpoints), tag=tag, load_optimizer_states=False,
                                       load_lr_scheduler_states=False)
    assert loaded is not None, f"DeepSpeed could not load {run.checkpoint(tag)}"
    engine.eval()
    return engine, dist
