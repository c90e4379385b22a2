"""Convert a ``moe.impl: gshard`` checkpoint into a ``moe.impl: dropless`` one (docs/MOE_DROPLESS.md).

    python -m pipeline.run.convert_moe runs/demo/vl_pretrain --output runs/demo/vl_pretrain_dropless
    python -m pipeline.run.convert_moe runs/demo/vl_pretrain/checkpoints/step_000800 --output OUT

The checkpoint (any EP size) is merged to its EP=1 state (``pipeline.run.checkpoint_merge``) and each MoE FFN
renamed: ``deepspeed_moe.gate.wg.weight -> router.gate.weight``; expert e's ``fc1.weight -> experts.w1[e]``,
``fc2.weight -> experts.w2[e]``, ``cat(fc1.bias, fc2.bias) -> experts.w3[e, 0]``; ``expert_bias`` zeros.
PR-MoE (``moe.use_residual``) has no dropless counterpart and is refused.

OUT is a run folder holding one checkpoint of the same step: ``resolved_recipe.yaml`` (the run's, with
``model.moe.impl: dropless``), and ``checkpoints/step_N/`` with ``mp_rank_00_model_states.pt`` (the whole EP=1
state under ``module``), the recipe and ds_config copies and ``COMPLETE``. ``init_from: OUT`` (a stage at any
EP size), ``pipeline.evaluate OUT`` and ``pipeline.export --checkpoint OUT`` load it; it holds no optimizer
state, so ``--resume`` from it is not possible. Without expert drops (top-1 with an eval capacity factor that
keeps every token; top-2 with ``top2_2nd_expert_sampling: false``) the converted model computes what the
gshard one does (tests/test_moe_dropless_checkpoints.py).
"""
from __future__ import annotations

import logging
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config_utils import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pipeline.run.convert_moe")

GATE = re.compile(r"^(.*)\.deepspeed_moe\.gate\.wg\.weight$")  # a gshard MoE FFN's router: (FFN prefix)
RESIDUAL = re.compile(r"^(.*)\.(mlp|coefficient)\.")  # PR-MoE branches of a gshard FFN


def gshard_to_dropless(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A merged (EP=1) gshard state dict with the keys of the ``moe.impl: dropless`` model (the module
    docstring); every other tensor as is. ConfigError for PR-MoE residual branches; ValueError when an FFN's
    experts are not exactly 0..E-1 with fc1/fc2 weights and biases."""
    import torch

    from pipeline.run.checkpoint_merge import EXPERT_KEY

    prefixes = sorted(m.group(1) for m in map(GATE.match, state) if m)
    residual = sorted(key for key in state if (m := RESIDUAL.match(key)) and m.group(1) in prefixes)
    if residual:
        raise ConfigError(f"PR-MoE residual branches ({', '.join(residual[:4])}{', ...' if len(residual) > 4 else ''}"
                          "): moe.use_residual has no dropless counterpart; convert a run without use_residual")
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {prefix: {} for prefix in prefixes}
    for key, tensor in state.items():
        match = EXPERT_KEY.match(key)
        if match is not None and match.group(1) in experts:
            experts[match.group(1)].setdefault(int(match.group(2)), {})[match.group(3)] = tensor
        elif (gate := GATE.match(key)) is not None:
            out[f"{gate.group(1)}.router.gate.weight"] = tensor
        else:
            out[key] = tensor
    for prefix, by_id in experts.items():
        if set(by_id) != set(range(len(by_id))) or not by_id:
            raise ValueError(f"{prefix}: experts {sorted(by_id)}, expected 0..{max(len(by_id), 1) - 1}")
        ids = range(len(by_id))
        need = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
        odd = [f"{e}: {sorted(set(by_id[e]) ^ need)}" for e in ids if set(by_id[e]) != need]
        if odd:
            raise ValueError(f"{prefix}: experts are not fc1/fc2 MLPs with biases ({'; '.join(odd)})")
        out[f"{prefix}.experts.w1"] = torch.stack([by_id[e]["fc1.weight"] for e in ids])
        out[f"{prefix}.experts.w2"] = torch.stack([by_id[e]["fc2.weight"] for e in ids])
        out[f"{prefix}.experts.w3"] = torch.stack(
            [torch.cat([by_id[e]["fc1.bias"], by_id[e]["fc2.bias"]])[None] for e in ids])
        out[f"{prefix}.expert_bias"] = torch.zeros(len(by_id), dtype=torch.float32)
    return out


def dropless_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The run's saved recipe (a plain dict) for the converted model: ``model.moe.impl: dropless``;
    ConfigError for a recipe that is not gshard or has ``use_residual``."""
    import copy

    recipe = copy.deepcopy(recipe)
    model = recipe.get("model") or {}
    moe = model.get("moe") or {}
    if moe.get("impl", "gshard") != "gshard":
        raise ConfigError(f"model.moe.impl is {moe.get('impl')!r}: only a gshard run converts to dropless")
    if moe.get("use_residual"):
        raise ConfigError("model.moe.use_residual (PR-MoE) has no dropless counterpart")
    moe["impl"] = "dropless"
    model["moe"], recipe["model"] = moe, model
    return recipe


def convert(checkpoint: str | Path, output: Path) -> Path:
    """Write the converted run folder ``output`` (module docstring) from ``checkpoint`` (RUN or RUN/TAG);
    returns its checkpoint folder."""
    import torch
    import yaml

    from pipeline.recipe import read_yaml
    from pipeline.run.checkpoint_merge import DENSE_FILE, merge_moe_checkpoint
    from pipeline.run.run_dir import DS_CONFIG, RECIPE, RunDir, require_empty_output

    run, tag = RunDir.resolve(checkpoint)
    require_empty_output(output)
    recipe = dropless_recipe(read_yaml(run.saved_recipe(f"convert_moe {checkpoint}")))
    state = gshard_to_dropless(merge_moe_checkpoint(run.checkpoint(tag)))
    target = RunDir(output)
    folder = target.checkpoint(tag)
    folder.mkdir(parents=True)
    text = yaml.safe_dump(recipe, sort_keys=False)
    target.recipe_path.write_text(text)
    (folder / RECIPE).write_text(text)
    ds_config = run.ds_config_of(tag)
    if ds_config.is_file():
        shutil.copy2(ds_config, folder / DS_CONFIG)
        shutil.copy2(ds_config, output / DS_CONFIG)
    torch.save({"module": state}, folder / DENSE_FILE)
    target.mark_complete(tag, RunDir.step_of(tag))
    log.info("converted %s (%s) to dropless: %s", run.path, tag, folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    from pipeline.run.run_dir import run_folder_command

    return run_folder_command("python -m pipeline.run.convert_moe", __doc__, convert, argv)


if __name__ == "__main__":
    sys.exit(main())
