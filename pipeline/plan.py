"""Plan a stage before launching it: sizes, FLOPs and memory per rank, and the checks that would make
the launch fail (batch arithmetic, ZeRO-3 with MoE, EP not dividing experts/world size, a model whose tensor
shapes differ from those of its ``init_from`` checkpoint, and the run's inputs: ``pipeline.run.preflight``).

    python -m pipeline.plan --recipe launch/recipes/vl_pretrain.yaml --ds-config ds_configs/zero2_bf16.json \
        --world-size 8 [--ep-size 4] [--set model.num_layers=12 ...] [--json]

Exit status 2 with the reasons on stderr when the settings are impossible or an input is unusable
(``--skip-input-checks`` sizes a config whose data is not on this machine). Memory per rank is an estimate
for the device the ranks run on (``--device auto|cpu|cuda``; auto: cuda when torch sees a GPU): model states
(dense params partitioned over the data-parallel ranks = all ranks, expert params over their
expert-data-parallel group = world / ep) + activations, 34*N*D + 5*heads*N^2 bytes per layer per sample and
model pass (Korthikanti et al. 2022, 16-bit, no recomputation). CUDA: DeepSpeed's ZeRO estimator formula
(accelerator memory). CPU (host memory, peak resident set): bytes per parameter measured on CPU ranks
(``CPU_STATE_BYTES``, bench/bench_state_bytes.py), activations in their element size plus
``CPU_ACTIVATION_EXTRA_BYTES_PER_SAMPLE`` and a fixed ``CPU_RANK_OVERHEAD_BYTES`` (bench/bench_memory.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from typing import Any

from pipeline.config_utils import ConfigError

GIB = 1024**3
TRAIN_FLOPS_PER_FORWARD = 3.0  # forward + backward (twice the forward's matmuls)
# Model-state bytes per parameter on a CPU rank, a + b / dp, by (precision, ZeRO stage); dp = the ranks the
# parameter is partitioned over. Measured by bench/bench_state_bytes.py (peak resident set - baseline; torch
# AdamW, DeepSpeed 0.19.8, gloo; BENCHMARKS.md "Memory per rank vs pipeline.plan"): on CPU the model is built
# in host memory and DeepSpeed flattens it into a second buffer, so the build, the flat copies, gradients,
# Adam m and v and AdamW's step temporaries all count. fp16 uses the bf16 row. Repeats vary by up to
# 4 bytes/param (fp32 ZeRO-1 at dp 2: 23.7-28.0 over three runs).
CPU_STATE_BYTES: dict[tuple[str, int], tuple[float, float]] = {
    ("fp32", 0): (23.7, 0.0), ("fp32", 1): (22.5, 11.0), ("fp32", 2): (14.2, 19.7),
    ("bf16", 0): (24.3, 0.0), ("bf16", 1): (7.9, 27.7), ("bf16", 2): (9.6, 24.3),
}
# CPU ranks (bench/bench_memory.py; vl_pretrain demo micro-batch 16 vs 1 and large 8 vs 1, ZeRO-2 fp32):
# activations per sample = the 16-bit transformer-layer estimate x element bytes / 2, plus ~6 MiB the estimate
# leaves out (demo 5.3, large 6.4: conv stem, embeddings, vocabulary logits); the fixed part above model states
# and activations (allocator, autograd and communication buffers) measured 0.04-0.21 GiB: 0.15 GiB taken.
CPU_ACTIVATION_EXTRA_BYTES_PER_SAMPLE = 6 * 2**20
CPU_RANK_OVERHEAD_BYTES = int(0.15 * GIB)


def task_passes(recipe: Any) -> dict[str, int]:
    """Model passes per training sample of ``recipe``'s task for its objectives and options."""
    from pipeline.tasks import get_task_class

    task_class = get_task_class(recipe.task)
    return task_class.passes(recipe.objectives, task_class.parse_options(recipe.task_options))  # resolved by Recipe


def train_flops_per_sample(recipe: Any, size: Any = None) -> float:
    """Forward + backward FLOPs of one training sample (``size``: ``size_of(recipe)`` when known)."""
    return TRAIN_FLOPS_PER_FORWARD * (size or size_of(recipe)).forward_flops_per_sample


def size_of(recipe: Any, model_cfg: Any = None) -> Any:
    """Sizes of ``recipe``'s model (or of ``model_cfg``, e.g. its dense baseline) for its task's samples."""
    model_cfg = model_cfg or recipe.model
    from pipeline.model.accounting import count_parameters

    image_size = recipe.data.image_size if "image" in model_cfg.modalities else None
    return count_parameters(model_cfg, image_size=image_size, text_len=recipe.data.text_len,
                            passes=task_passes(recipe))


def dense_baseline(model_cfg: Any) -> Any:
    moe = dataclasses.replace(model_cfg.moe, every=0, layers=[], ep_size=1)
    return dataclasses.replace(model_cfg, moe=moe)


def resolve_device(device: str) -> str:
    """"cpu" or "cuda" for ``device`` ("auto": cuda when torch sees a GPU)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda")
    return device


def model_state_bytes(dense: int, experts: int, ep_size: int, world: int, stage: int, prec: str,
                      offload: bool, device: str = "cuda") -> dict[str, float]:
    """Bytes per rank of weights, gradients and optimizer states (AdamW, mixed precision = fp32 master), dense
    params over the ``world`` data-parallel ranks, ``experts`` (all experts' params) as ``experts / ep_size``
    per rank over their ``world // ep_size`` expert-data-parallel ranks. ``device`` "cuda": accelerator memory
    by DeepSpeed's estimator; "cpu": host memory by the measured ``CPU_STATE_BYTES`` (offload changes nothing
    there: the optimizer states are in host memory either way)."""

    def per_rank(params: float, dp: int) -> float:
        if device == "cpu":
            a, b = CPU_STATE_BYTES[("fp32" if prec == "fp32" else "bf16", stage)]
            return params * (a + b / dp)
        if stage == 2 and prec != "fp32":  # the accelerator-memory figure of DeepSpeed's own estimator,
            # deepspeed/runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs (0.19.8): 2 bytes
            # of 16-bit weights, plus 16-bit grads, fp32 grads, master weights, Adam m and v (2+4+4+8) / dp
            return int(2 * params) if offload else int(2 * params) + int(18 * params / dp)
        # same accounting as DeepSpeed's: mixed precision = 16-bit weights + grads, then fp32 grads,
        # master weights, Adam m and v (4+4+8); fp32 training = weights, grads, m, v (4+4+8)
        weights, grads, rest = (2, 2, 16) if prec != "fp32" else (4, 4, 8)
        if offload:
            rest = 0
        if stage == 0:
            return params * (weights + grads + rest)
        if stage == 1:
            return params * (weights + grads) + params * rest / dp
        return params * weights + params * (grads + rest) / dp

    local_experts = experts / ep_size
    return {"dense": per_rank(dense, world), "experts": per_rank(local_experts, world // ep_size)}


def layer_tokens(recipe: Any, modalities: list[str]) -> list[dict[str, int]]:
    """Tokens of each modality (in sequence order) entering each block in a pass over ``modalities``: images of
    ``data.image_size``, fewer image tokens after each token merge (``ModelConfig.merged_after``)."""
    cfg = recipe.model
    per_modality = {"image": cfg.lead_tokens + (recipe.data.image_size // cfg.patch_size) ** 2,
                    "text": recipe.data.text_len, "audio": cfg.lead_tokens + cfg.audio.num_patches}
    return cfg.block_tokens({m: per_modality[m] for m in modalities})


def activation_bytes(recipe: Any, passes: dict[str, int]) -> float:
    """Activation bytes per rank of one micro-batch through ``passes`` ({kind: count}; a kind is a modality,
    modalities joined by '+', or "fuse": pipeline.model.accounting.pass_modalities)."""
    from pipeline.model.accounting import pass_modalities
    from pipeline.model.sparse_attention import attention_pairs

    model_cfg = recipe.model
    kinds = pass_modalities(model_cfg, list(passes))
    d, heads = model_cfg.hidden_size, model_cfg.num_heads
    total = 0
    for kind, count in passes.items():
        # Korthikanti et al. 2022: 34 s d + 5 a s^2 per layer; s^2 = the (query, key) pairs attention computes
        total += count * sum(34 * sum(tokens.values()) * d + 5 * heads * attention_pairs(model_cfg, i, tokens)
                             for i, tokens in enumerate(layer_tokens(recipe, kinds[kind])))
    return float(total * recipe.batch.micro_batch_size)


def all_to_all_bytes(recipe: Any, passes: dict[str, int], world_size: int, ranks_per_node: int, prec: str,
                     grad_accum: int) -> dict[str, Any] | None:
    """Expected expert-parallel all-to-all bytes one rank sends per optimizer step (dispatch and combine, in
    the forward and the backward), split into those to ranks of its own node and to other nodes, under
    uniform routing; None without expert parallelism. Rows per MoE call: dropless sends one row per route
    (K per real token, padding counted here as real: an upper bound); gshard sends its fixed [E, C, D]
    buffers (C = capacity, about capacity_factor * K * tokens / E). EP groups are consecutive ranks
    (DeepSpeed's layout), so an EP group spans ceil(ep / ranks_per_node) nodes."""
    from pipeline.model.accounting import pass_modalities

    model_cfg, moe = recipe.model, recipe.model.moe
    if moe.ep_size == 1 or not model_cfg.moe_layers:
        return None
    tokens = sum(count * sum(layer_tokens(recipe, pass_modalities(model_cfg, [kind])[kind])[i].values())
                 for kind, count in passes.items() for i in model_cfg.moe_layers)  # summed over the MoE layers
    factor = moe.top_k if moe.impl == "dropless" else moe.top_k * moe.capacity_factor
    rows = tokens * factor * recipe.batch.micro_batch_size * grad_accum
    element = 4 if prec == "fp32" else 2
    total = 4 * rows * model_cfg.hidden_size * element  # dispatch + combine, forward + backward
    ep, per_node = moe.ep_size, max(1, min(ranks_per_node, world_size))
    same_node = min(ep, per_node)  # EP peers on this rank's node, itself included
    nodes = -(-ep // per_node)
    limited = moe.impl == "dropless" and moe.expert_groups is not None
    nodes_per_group = -(-nodes // moe.expert_groups) if limited else nodes  # a group within one node, or spanning
    max_nodes = min(nodes, moe.top_k, moe.max_groups_per_token * nodes_per_group if limited else nodes)
    return {"bytes_per_step": total, "to_own_node_bytes": total * (same_node - 1) / ep,
            "to_other_nodes_bytes": total * (ep - same_node) / ep, "ep_nodes": nodes,
            "max_nodes_per_token": max_nodes, "ranks_per_node": per_node}


def make_plan(recipe: Any, engine: dict[str, Any], world_size: int, ranks_per_node: int = 8,
              device: str = "auto") -> dict[str, Any]:
    from pipeline.run.ds_config import build_ds_config, precision, zero_stage

    ds_config = build_ds_config(recipe, engine, world_size)
    model_cfg = recipe.model
    size = size_of(recipe)
    dense = size_of(recipe, dense_baseline(model_cfg))
    stage, prec = zero_stage(engine), precision(engine)
    offload = engine.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    device = resolve_device(device)
    states = model_state_bytes(size.total_params - size.expert_params, size.expert_params,
                               model_cfg.moe.ep_size, world_size, stage, prec, offload, device)
    passes = task_passes(recipe)
    acts = activation_bytes(recipe, passes)
    if device == "cpu":
        extra = CPU_ACTIVATION_EXTRA_BYTES_PER_SAMPLE * recipe.batch.micro_batch_size
        acts = acts * (2 if prec == "fp32" else 1) + extra
    overhead = CPU_RANK_OVERHEAD_BYTES if device == "cpu" else 0
    train_flops = train_flops_per_sample(recipe, size)
    comm = all_to_all_bytes(recipe, passes, world_size, ranks_per_node, prec,
                            ds_config.get("gradient_accumulation_steps", 1))
    return {
        "task": recipe.task, "world_size": world_size, "ep_size": model_cfg.moe.ep_size, "zero_stage": stage,
        "precision": prec, "cpu_offload": offload, "moe_layers": model_cfg.moe_layers,
        "num_experts": model_cfg.moe.num_experts, "global_batch": ds_config["train_batch_size"],
        "total_params": size.total_params, "expert_params": size.expert_params,
        "active_params_per_token": size.active_params_per_token,
        "dense_baseline_params": dense.total_params,
        "dense_baseline_active_params_per_token": dense.active_params_per_token,
        "active_vs_dense": size.active_params_per_token / dense.active_params_per_token,
        "total_vs_dense": size.total_params / dense.total_params,
        "train_flops_per_sample": train_flops,
        "train_flops_per_step": train_flops * ds_config["train_batch_size"],
        "params_per_rank": (size.total_params - size.expert_params) + size.expert_params / model_cfg.moe.ep_size,
        "device": device,
        "model_states_gib_per_rank": (states["dense"] + states["experts"]) / GIB,
        "activations_gib_per_rank_est": acts / GIB,
        "runtime_overhead_gib_per_rank": overhead / GIB,
        "memory_per_rank_bytes": int(states["dense"] + states["experts"] + acts + overhead),
        "moe_impl": model_cfg.moe.impl,
        "all_to_all": comm,
        "attention": _attention_summary(recipe, size),
    }


def _attention_summary(recipe: Any, size: Any) -> dict[str, Any]:
    """The attention option and the forward FLOPs it saves against dense attention in every block."""
    cfg = recipe.model
    summary: dict[str, Any] = {"kind": cfg.attention}
    if cfg.attention != "dense":
        dense = size_of(recipe, dataclasses.replace(cfg, attention="dense"))
        summary.update(window=cfg.attention_window, shift=cfg.attention_shift,
                       dense_blocks=list(cfg.attention_global_layers), summary_tokens=cfg.summary_tokens,
                       forward_flops_vs_dense_attention=size.forward_flops_per_sample / dense.forward_flops_per_sample)
    return summary


def format_plan(plan: dict[str, Any]) -> str:
    def m(x: float) -> str:
        return f"{x / 1e6:,.1f}M"

    return "\n".join([
        f"task {plan['task']}: {plan['world_size']} ranks, EP {plan['ep_size']}, ZeRO-{plan['zero_stage']} "
        f"{plan['precision']}{' + CPU offload' if plan['cpu_offload'] else ''}, global batch {plan['global_batch']}",
        f"MoE layers {plan['moe_layers']} x {plan['num_experts']} experts",
        f"total params        {m(plan['total_params'])} ({plan['total_vs_dense']:.2f}x dense "
        f"{m(plan['dense_baseline_params'])}); experts {m(plan['expert_params'])}",
        f"active per token    {m(plan['active_params_per_token'])} ({plan['active_vs_dense']:.3f}x dense "
        f"{m(plan['dense_baseline_active_params_per_token'])})",
        f"train FLOPs/sample  {plan['train_flops_per_sample'] / 1e9:,.2f} GFLOP "
        f"({plan['train_flops_per_step'] / 1e12:,.2f} TFLOP per step)",
        f"params per rank     {m(plan['params_per_rank'])}",
        f"memory per rank     {plan['memory_per_rank_bytes'] / GIB:.2f} GiB on {plan['device']} (estimate): model "
        f"states {plan['model_states_gib_per_rank']:.2f} GiB + activations {plan['activations_gib_per_rank_est']:.2f}"
        f" GiB" + (f" + runtime {plan['runtime_overhead_gib_per_rank']:.2f} GiB"
                   if plan["runtime_overhead_gib_per_rank"] else ""),
        *_format_attention(plan),
        *_format_all_to_all(plan),
    ])


def _format_attention(plan: dict[str, Any]) -> list[str]:
    att = plan.get("attention") or {"kind": "dense"}
    if att["kind"] == "dense":
        return ["attention           dense in every block"]
    shift = ", shifted on odd blocks" if att["shift"] else ""
    summary = f", {att['summary_tokens']} summary tokens" if att.get("summary_tokens") else ""
    return [f"attention           {att['kind']}: window {att['window']}{shift}{summary}, dense blocks "
            f"{att['dense_blocks']}; "
            f"forward FLOPs {att['forward_flops_vs_dense_attention']:.2f}x the same model with dense attention"]


def _format_all_to_all(plan: dict[str, Any]) -> list[str]:
    comm = plan.get("all_to_all")
    if not comm:
        return []
    return [f"EP all-to-all/rank  {comm['bytes_per_step'] / 2**20:,.1f} MiB per step ({plan['moe_impl']}, uniform "
            f"routing, rows it keeps included): {comm['to_own_node_bytes'] / 2**20:,.1f} MiB within the node, "
            f"{comm['to_other_nodes_bytes'] / 2**20:,.1f} MiB to other nodes; an EP group spans "
            f"{comm['ep_nodes']} node(s) of {comm['ranks_per_node']} ranks, a token's experts span at most "
            f"{comm['max_nodes_per_token']} node(s) (group limits cap the nodes a token reaches, not the bytes: "
            "one row per route)"]


def init_from_model(init_from: str) -> Any:
    """The ModelConfig ``init_from``'s run was trained with (its resolved_recipe.yaml)."""
    from pipeline.recipe import build_model_config, read_yaml
    from pipeline.run.run_dir import RunDir

    return build_model_config(read_yaml(RunDir.of(init_from).saved_recipe("init_from")).get("model", {}))


def init_from_mismatches(model_cfg: Any, init_from: str | None) -> list[str]:
    """Model tensors whose shapes differ between ``model_cfg`` and the model ``init_from`` was trained with
    (its resolved_recipe.yaml), both built on the meta device: such a fine-tune cannot load its weights."""
    if not init_from:
        return []
    from pipeline.model.accounting import build_meta_model
    from pipeline.run.checkpoint_merge import MODALITY_TYPE, modality_rows

    previous = init_from_model(init_from)
    old, new = build_meta_model(previous).state_dict(), build_meta_model(model_cfg).state_dict()
    return [f"{key}: init_from {list(old[key].shape)} vs this recipe {list(tensor.shape)}"
            for key, tensor in new.items() if key in old and old[key].shape != tensor.shape
            and not (key == MODALITY_TYPE  # an added modality: rows copied by name (checkpoint.load_weights)
                     and modality_rows(old[key], previous.modalities, tensor, model_cfg.modalities) is not None)]


def check_task_modalities(recipe: Any) -> None:
    """ConfigError when the task's passes need a modality the model lacks (e.g. an audio task on a model
    without 'audio' in model.modalities): sizing it, building it or its first batch would fail."""
    passes = task_passes(recipe)
    have = recipe.model.modalities
    lacking = sorted({m for kind in passes if kind != "fuse" for m in kind.split("+") if m not in have})
    if lacking:
        audio = " and an audio: block sized for the clips" if "audio" in lacking else ""
        raise ConfigError(f"task {recipe.task!r} runs {sorted(passes)} passes, which need modalities {lacking} "
                          f"missing from model.modalities {list(have)}: add them (e.g. --set "
                          f"\"model.modalities=[{', '.join(list(have) + lacking)}]\"){audio}, or take the model "
                          "from an init_from run that has them")


def check_init_from(recipe: Any) -> None:
    from pipeline.recipe import init_from_shape_error

    if recipe.init_from and recipe.model.moe_layers:
        previous = init_from_model(recipe.init_from)
        old, new = previous.moe.impl, recipe.model.moe.impl
        if previous.moe_layers and old != new:
            how = (f"convert it first: python -m pipeline.run.convert_moe {recipe.init_from} --output NEW_RUN, then "
                   "init_from: NEW_RUN" if (old, new) == ("gshard", "dropless") else
                   f"there is no {old} -> {new} converter: keep model.moe.impl={old}")
            raise ConfigError(f"init_from {recipe.init_from}: its experts are model.moe.impl={old} tensors and this "
                              f"recipe's model has impl={new} (other parameter names); {how}")
    mismatched = init_from_mismatches(recipe.model, recipe.init_from)
    if mismatched:
        raise init_from_shape_error(recipe.init_from, mismatched)


def checked_plan(recipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The plan, or one ConfigError listing every problem found: the run's inputs (``pipeline.run.preflight``,
    unless ``--skip-input-checks``), then the first of init_from shapes / engine / batch arithmetic."""
    from pipeline.run.ds_config import load_engine_json
    from pipeline.run.preflight import check_run_inputs, require_no_problems

    problems = [] if args.skip_input_checks else check_run_inputs(recipe)
    plan: dict[str, Any] = {}
    try:
        check_task_modalities(recipe)
        check_init_from(recipe)
        plan = make_plan(recipe, load_engine_json(args.ds_config), args.world_size, args.ranks_per_node,
                         args.device)
    except ConfigError as exc:
        problems.append(str(exc))
    require_no_problems(problems, args.recipe)
    return plan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="stage recipe YAML (launch/recipes/*.yaml)")
    parser.add_argument("--ds-config", required=True, help="engine settings JSON (ds_configs/*.json)")
    parser.add_argument("--world-size", type=int, required=True, help="total ranks (GPUs x nodes)")
    parser.add_argument("--ep-size", type=int, default=None, help="override model.moe.ep_size")
    parser.add_argument("--ranks-per-node", type=int, default=8,
                        help="ranks (GPUs) per node, for the all-to-all split within / across nodes (default 8)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="what the ranks run on, for the memory estimate: cpu (host memory, measured "
                             "coefficients) or cuda (DeepSpeed's estimator); auto: cuda when torch sees a GPU")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set model.num_layers=12 (repeatable)")
    parser.add_argument("--skip-input-checks", action="store_true",
                        help="size the config only: do not check data folders, tokenizer and init_from "
                             "checkpoint (e.g. planning a cluster run on a laptop)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.recipe import load_recipe

    logging.basicConfig(level=logging.WARNING, format="pipeline.plan: %(levelname)s: %(message)s")  # preflight's

    overrides = list(args.overrides) + ([f"model.moe.ep_size={args.ep_size}"] if args.ep_size else [])
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout; stdout is the plan only
            recipe = load_recipe(args.recipe, overrides)
            plan = checked_plan(recipe, args)
    except ConfigError as exc:
        print(f"pipeline.plan: configuration error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
