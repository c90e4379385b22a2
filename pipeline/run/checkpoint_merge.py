"""Merge a DeepSpeed MoE checkpoint (any EP size) into one plain state dict that loads into an EP=1 model.

DeepSpeed writes the dense weights to ``mp_rank_00_model_states.pt`` (key ``module``, experts left out)
and every expert of every MoE layer to ``layer_{L}_expert_{G}_mp_rank_00_model_states.pt``, its keys
already renamed to the **global** expert id G (``...deepspeed_experts.{G}...``). With EP=1 every expert is
local and local id == global id, so the union of those files is exactly an EP=1 state dict.
Dropless FFNs (``moe.impl: dropless``, DeepSpeed ``AutoEPMoELayer`` files) hold one expert each as
``{prefix}experts.w{1,2,3}.{G}``; they are stacked in global order into the EP=1 tensors
``{prefix}experts.w{1,2,3}`` [E, ...] (``pipeline.model.dropless``).
``zero_to_fp32.py`` and universal checkpoints do not handle MoE (DeepSpeed issues #4497, #5716).

    run, tag = RunDir.resolve("runs/demo/vqa")                  # newest complete checkpoint
    state = merge_moe_checkpoint(run.checkpoint(tag))
"""
from __future__ import annotations

import logging
import pickle
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from pipeline.config_utils import ConfigError

log = logging.getLogger(__name__)

DENSE_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
EXPERTS = ".deepspeed_moe.experts.deepspeed_experts."  # DeepSpeed MoE layer -> its expert list
EXPERT_KEY = re.compile(rf"^(.*){re.escape(EXPERTS)}(\d+)\.(.*)$")  # (MoE module, expert id, parameter)
FUSED_EXPERT_FILE_KEY = re.compile(r"^(.*)\.experts\.(w[123])\.(\d+)$")  # dropless: (FFN, tensor, global id)
FUSED_EXPERT_KEY = re.compile(r"^(.*)\.experts\.(w[123])$")  # dropless EP=1 / local tensor: (FFN, tensor)
MODALITY_TYPE = "modality_type.weight"  # VLMoE: one row per modality, in model.modalities order
MODALITY_KEY = re.compile(r"^(?:model\.)?(?:embeddings|blocks\.\d+\.ffn)\.(\w+)\.")  # a modality's own tensors
EMBEDDING_KEY = re.compile(r"^(?:model\.)?embeddings\.(\w+)\.")
SUMMARY_KEY = re.compile(r"^(?:model\.)?summary\.\w+$")  # model.summary_tokens of a grid modality


def modality_of(key: str) -> str | None:
    """The modality (or FFN key: "vl", "shared") whose own tensor ``key`` is: its embedding or its FFNs."""
    match = MODALITY_KEY.match(key)
    return match.group(1) if match else None


def state_modalities(state: dict[str, Any]) -> list[str]:
    """The modalities of a VLMoE state dict, in the model's order (its embeddings' registration order)."""
    return list(dict.fromkeys(m.group(1) for m in map(EMBEDDING_KEY.match, state) if m))


def modality_rows(saved: torch.Tensor, saved_modalities: list[str], current: torch.Tensor,
                  modalities: list[str]) -> torch.Tensor | None:
    """``modality_type`` weights for ``modalities`` [M, D]: each saved modality's row copied by NAME, a new
    modality's row kept from ``current`` (its fresh init). None when they cannot map (a saved modality the
    model lacks, another hidden size, a row count that is not one per modality)."""
    if (set(saved_modalities) - set(modalities) or saved.shape != (len(saved_modalities), *current.shape[1:])
            or current.shape[0] != len(modalities)):
        return None
    rows = current.detach().clone()
    for index, modality in enumerate(modalities):
        if modality in saved_modalities:
            rows[index] = saved[saved_modalities.index(modality)]
    return rows


def expert_key(moe_module: str, expert_id: int, parameter: str) -> str:
    """The name of expert ``expert_id``'s ``parameter`` in MoE module ``moe_module`` (EXPERT_KEY's inverse)."""
    return f"{moe_module}{EXPERTS}{expert_id}.{parameter}"


def safe_load(path: Path, allowed: list[type] | None = None, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors, plain containers and numbers only (plus the classes in
    ``allowed``), so a crafted file cannot run code. ConfigError naming the file and the refused global."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"it refers to {found.group(1)}" if found else str(exc).splitlines()[0]
        raise ConfigError(f"{path}: refused to load: not a weights-only checkpoint ({what}); loading it "
                          "could run code. Only tensors and plain data load (torch.load weights_only=True)"
                          ) from None


def merge_moe_checkpoint(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Dense weights + every per-expert file -> one state dict with global expert ids (EP=1 names).
    Checks that each MoE module has experts 0..E-1 with nothing missing or duplicated; dropless experts
    (``...experts.w1.{G}``) are stacked into ``...experts.w1`` [E, ...]."""
    checkpoint_dir = Path(checkpoint_dir)
    dense = safe_load(checkpoint_dir / DENSE_FILE)
    state: dict[str, torch.Tensor] = dict(dense["module"] if "module" in dense else dense)
    experts: dict[str, set[int]] = defaultdict(set)
    fused: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    files = sorted(p for p in checkpoint_dir.iterdir() if EXPERT_FILE.match(p.name))
    for path in files:
        for key, tensor in safe_load(path).items():
            m = EXPERT_KEY.match(key)
            f = FUSED_EXPERT_FILE_KEY.match(key) if m is None else None
            if m is None and f is None:
                raise ValueError(f"{path}: key {key!r} is not an expert parameter")
            if key in state or (f is not None and int(f.group(3)) in fused[f.group(1), f.group(2)]):
                raise ValueError(f"{path}: {key!r} appears twice in the checkpoint")
            if f is not None:
                fused[f.group(1), f.group(2)][int(f.group(3))] = tensor
                continue
            experts[m.group(1)].add(int(m.group(2)))
            state[key] = tensor
    for module, ids in experts.items():
        if ids != set(range(len(ids))):
            raise ValueError(f"{checkpoint_dir}: {module} has experts {sorted(ids)}, expected 0..{len(ids) - 1}")
    state.update(stack_fused_experts(fused, checkpoint_dir))
    log.info("merged %s: %d dense tensors + %d expert files (%d MoE modules)", checkpoint_dir,
             len(state) - sum(1 for k in state if EXPERT_KEY.match(k) or FUSED_EXPERT_KEY.match(k)), len(files),
             len(experts) + len({module for module, _ in fused}))
    return state


def stack_fused_experts(fused: dict[tuple[str, str], dict[int, torch.Tensor]], source: str | Path
                        ) -> dict[str, torch.Tensor]:
    """{(FFN prefix, "w1"|"w2"|"w3"): {global id: one expert's tensor}} -> {``prefix.experts.w1``: [E, ...]}.
    ValueError when an FFN's ids are not exactly 0..E-1 or its w1/w2/w3 disagree on E."""
    out: dict[str, torch.Tensor] = {}
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for (module, weight), by_id in sorted(fused.items()):
        if set(by_id) != set(range(len(by_id))):
            raise ValueError(f"{source}: {module}.experts.{weight} has experts {sorted(by_id)}, "
                             f"expected 0..{len(by_id) - 1}")
        out[f"{module}.experts.{weight}"] = torch.stack([by_id[i] for i in range(len(by_id))])
        counts[module][weight] = len(by_id)
    for module, per_weight in counts.items():
        if set(per_weight) != {"w1", "w2", "w3"} or len(set(per_weight.values())) != 1:
            raise ValueError(f"{source}: {module}: dropless expert tensors {per_weight} (expected w1, w2 and w3 "
                             "for the same experts)")
    return out


def check_keys(source: str | Path, missing: list[str], unexpected: list[str], may_differ: str | None = None
               ) -> None:
    """ConfigError naming the model tensors ``source`` lacks (``missing``) and the tensors it holds that the
    model has not (``unexpected``); keys starting with ``may_differ`` (e.g. "heads.") are let through."""
    missing = [k for k in missing if not (may_differ and k.startswith(may_differ))]
    unexpected = [k for k in unexpected if not (may_differ and k.startswith(may_differ))]
    if missing or unexpected:
        allowed = f" (only tensors under {may_differ!r} may differ)" if may_differ else ""
        raise ConfigError(f"{source}: the checkpoint does not match the model{allowed}: "
                          f"{len(missing)} model tensors missing from it ({summarize_keys(missing)}), "
                          f"{len(unexpected)} checkpoint tensors the model has not ({summarize_keys(unexpected)}). "
                          "Was it saved by a run of another model or task?")


def summarize_keys(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "") if keys else "-"

