"""Export a trained run as one self-contained folder that loads without DeepSpeed or this repo's launcher.

    python -m pipeline.export --checkpoint runs/demo/vqa --output exports/vqa
    python -m pipeline.export --checkpoint runs/demo/vqa --step 800 --output exports/vqa --max-shard-size 200MB

    from pipeline.hf import VLMoEModel                    # transformers classes, no deepspeed import
    model = VLMoEModel.from_pretrained("exports/vqa")

Any EP size and ZeRO stage: the dense weights and every per-expert file are merged into one EP=1 state
dict (``pipeline.run.checkpoint_merge``). The folder holds ``config.json`` (``VLMoEConfig``: model, task,
heads, label maps), ``model.safetensors`` (sharded with ``model.safetensors.index.json`` above
``--max-shard-size``, by ``save_pretrained``), the tokenizer files, ``preprocessor_config.json`` (image size,
normalisation; audio features when the model has audio) and a model card ``README.md`` (the recipe chain
and the evaluation figures found in the run's ``eval/`` folder).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config_utils import ConfigError

if TYPE_CHECKING:
    from pipeline.run.run_dir import RunDir

log = logging.getLogger("pipeline.export")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN_DIR (newest complete checkpoint) or RUN_DIR/TAG")
    p.add_argument("--step", type=int, default=None, help="export checkpoint step_N of RUN_DIR instead of the newest")
    p.add_argument("--output", required=True, help="folder to write (created; must be empty if it exists)")
    p.add_argument("--max-shard-size", default="2GB",
                   help="largest safetensors file (e.g. 500MB); bigger models are sharded with an index file")
    p.add_argument("--eval-capacity-factor", type=float, default=None,
                   help="set moe.eval_capacity_factor of the exported model (e.g. num_experts / top_k: no token "
                        "is ever dropped); default: the run's")
    return p


def resolve_checkpoint(checkpoint: str, step: int | None) -> tuple[RunDir, str]:
    """(RunDir, tag) of the checkpoint to export; FileNotFoundError naming the path or step looked for."""
    from pipeline.run.run_dir import RunDir

    if step is None:
        return RunDir.resolve(checkpoint)
    run = RunDir.of(checkpoint)
    tag = RunDir.tag_for(step)
    if not run.is_complete(tag):
        have = ", ".join(str(RunDir.step_of(t)) for t in run.complete_tags()) or "none"
        raise FileNotFoundError(f"--checkpoint {checkpoint} --step {step}: no complete checkpoint "
                                f"{run.checkpoint(tag)} (complete steps: {have})")
    return run, tag


def export(checkpoint: str, output: Path, step: int | None = None, max_shard_size: str = "2GB",
           eval_capacity_factor: float | None = None) -> Path:
    """Write the export folder (see the module docstring); returns ``output``."""
    run, tag = resolve_checkpoint(checkpoint, step)  # path mistakes first, before torch loads
    recipe_path = run.saved_recipe(f"--checkpoint {checkpoint}")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"--output {output}: exists and is not an empty folder")
    import dataclasses

    from pipeline.hf.configuration import VLMoEConfig
    from pipeline.hf.export_files import label_maps, model_card, preprocessor_config, write_json
    from pipeline.hf.heads import head_spec
    from pipeline.hf.modeling import VLMoEModel
    from pipeline.model.moe import local_experts
    from pipeline.recipe import load_recipe
    from pipeline.run.build import build_model, build_task, load_tokenizer
    from pipeline.run.checkpoint_merge import check_keys, merge_moe_checkpoint
    from pipeline.tasks import DistInfo

    overrides = ["init_from=null", "init={}", "model.moe.ep_size=1"]
    if eval_capacity_factor is not None:
        overrides.append(f"model.moe.eval_capacity_factor={eval_capacity_factor}")
    recipe = load_recipe(recipe_path, overrides)
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    with local_experts():  # every expert in this process; no DeepSpeed module
        task = build_task(recipe, tokenizer, DistInfo(), build_model(recipe, recipe.train.seed))
    folder = run.checkpoint(tag)
    missing, unexpected = task.load_state_dict(merge_moe_checkpoint(folder), strict=False)
    check_keys(folder, missing, unexpected)
    heads = {name: head_spec(name, head) for name, head in task.heads.items()}
    config = VLMoEConfig(vlmoe=dataclasses.asdict(recipe.model), task=recipe.task, heads=heads,
                         label_maps=label_maps(task, heads), text_len=recipe.data.text_len,
                         image_size=recipe.data.image_size)
    model = VLMoEModel(config)
    model.load_state_dict(task.state_dict(), strict=True)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(output)
    write_json(output / "preprocessor_config.json", preprocessor_config(recipe))
    (output / "README.md").write_text(model_card(run, tag, recipe, config))
    log.info("exported %s (%s) to %s", run.path, tag, output)
    return output


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help exits here, before torch is imported
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.step is not None and args.step < 0:
        print(f"pipeline.export: error: --step must be >= 0, got {args.step}", file=sys.stderr)
        return 2
    try:
        out = export(args.checkpoint, Path(args.output), args.step, args.max_shard_size, args.eval_capacity_factor)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"pipeline.export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
