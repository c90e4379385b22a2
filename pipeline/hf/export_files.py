"""The files ``pipeline.export`` writes next to the weights: label maps, the preprocessor config and the
model card (``README.md``: recipe chain, model shape, evaluation figures, how to load)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline.hf.heads import output_size

MAX_CHAIN = 16  # init_from parents followed at most (a loop of runs would never end)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def label_maps(task: Any, heads: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Head name -> the label of each of its outputs: the task's ``answers`` (VQA, GQA) or ``classes``
    (classification, SNLI-VE) for each classifier head with that many outputs."""
    maps: dict[str, list[str]] = {}
    for attr in ("answers", "classes"):
        labels = getattr(task, attr, None)
        if not isinstance(labels, (list, tuple)) or not labels:
            continue
        for name, spec in heads.items():
            if output_size(spec) == len(labels):
                maps[name] = [str(label) for label in labels]
    return maps


def preprocessor_config(recipe: Any) -> dict[str, Any]:
    """How inputs were prepared in training (pipeline.tasks.downstream_common): RGB, bicubic resize to
    ``image_size``, x / 255, then (x - mean) / std; texts padded / truncated to ``text_len`` tokens; with audio
    the log-mel settings (pipeline.model.audio_features)."""
    from pipeline.model.embeddings import PIXEL_MEAN, PIXEL_STD

    size = recipe.data.image_size
    config: dict[str, Any] = {
        "image_size": size, "size": {"height": size, "width": size}, "do_resize": True, "resample": 3,
        "resample_name": "bicubic", "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(PIXEL_MEAN), "image_std": list(PIXEL_STD), "text_len": recipe.data.text_len,
        "modalities": list(recipe.model.modalities)}
    if "audio" in recipe.model.modalities:
        from pipeline.model.audio_features import FRAME_SECONDS, HOP_SECONDS, MIN_FREQUENCY_HZ, PREEMPHASIS

        config["audio"] = {**dataclasses.asdict(recipe.model.audio), "frame_seconds": FRAME_SECONDS,
                           "hop_seconds": HOP_SECONDS, "min_frequency_hz": MIN_FREQUENCY_HZ,
                           "preemphasis": PREEMPHASIS, "features": "log-mel, (x - mean) / (2 std), AST's"}
    return config


def recipe_chain(run: Any) -> list[tuple[str, str, str | None]]:
    """(run folder, task, problem or None) from ``run`` back through its ``init_from`` parents."""
    from pipeline.recipe import read_yaml
    from pipeline.run.run_dir import RunDir

    chain: list[tuple[str, str, str | None]] = []
    seen: set[Path] = set()
    current: Any = run
    while current is not None and len(chain) < MAX_CHAIN:
        path = current.path.resolve()
        if path in seen:
            chain.append((str(current.path), "?", "loop: already listed"))
            break
        seen.add(path)
        if not current.recipe_path.is_file():
            chain.append((str(current.path), "?", f"no {current.recipe_path.name} (moved or deleted)"))
            break
        data = read_yaml(current.recipe_path)
        chain.append((str(current.path), str(data.get("task")), None))
        parent = data.get("init_from")
        current = RunDir.of(parent) if parent else None
    return chain


def eval_figures(run: Any) -> list[tuple[str, str, float]]:
    """(eval file, metric, value) of every JSON in ``RUN/eval``: ``pipeline.evaluate``'s ``metrics`` or a
    training evaluation's top-level numbers."""
    folder = run.path / "eval"
    rows: list[tuple[str, str, float]] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else data
        rows += [(path.stem, key, float(value)) for key, value in sorted(metrics.items())
                 if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return rows


def moe_card_line(moe: Any) -> str:
    """The model card's MoE line: routing and, for gshard, what capacity drops."""
    if moe.impl == "dropless":
        return (f"- MoE (dropless): {moe.num_experts} experts, top-{moe.top_k}, {moe.score_func} router scores, "
                f"{moe.shared_experts} shared experts; no capacity: every real token gets its experts, padding "
                "is never routed")
    return (f"- MoE: {moe.num_experts} experts, top-{moe.top_k}, eval capacity factor {moe.eval_capacity_factor}, "
            f"drop tokens {moe.drop_tokens}. A token over an expert's capacity gets no expert output; which "
            "tokens those are follows DeepSpeed's order (top-1 with random token selection: DeepSpeed draws "
            "them at random, so only calls where no expert overflows match it exactly). With a capacity "
            "factor >= experts / top-k no token is dropped (`pipeline.export --eval-capacity-factor`)")


def model_card(run: Any, tag: str, recipe: Any, config: Any) -> str:
    moe = recipe.model.moe
    heads = ", ".join(f"{name} ({spec['type']})" for name, spec in (config.heads or {}).items()) or "none"
    lines = [f"# VL-MoE: {recipe.task}", "",
             f"Exported by `python -m pipeline.export` from `{run.path}` checkpoint `{tag}`. Loads without "
             "DeepSpeed; the experts run locally:", "",
             "```python", "from pipeline.hf import VLMoEModel", "",
             "model = VLMoEModel.from_pretrained(\"<this folder>\")",
             "out = model(pixel_values=..., input_ids=..., attention_mask=...)  # out.pooled, out.logits[head]",
             "```", "",
             "## Model", "",
             f"- modalities {', '.join(recipe.model.modalities)}; hidden {recipe.model.hidden_size}, "
             f"{recipe.model.num_layers} blocks, {recipe.model.num_heads} heads",
             moe_card_line(moe),
             f"- heads: {heads}",
             *[f"- labels of `{name}`: {len(labels)} (config.json `label_maps`)"
               for name, labels in (config.label_maps or {}).items()],
             f"- inputs: images {recipe.data.image_size}x{recipe.data.image_size}, texts of {recipe.data.text_len} "
             "tokens (preprocessor_config.json)", "",
             "## Recipe chain", "", "Newest first; each stage started from the weights of the next one.", ""]
    for index, (path, task, problem) in enumerate(recipe_chain(run)):
        lines.append(f"{index + 1}. `{path}` (task {task})" + (f": {problem}" if problem else ""))
    if run.recipe_path.is_file():
        lines += ["", "<details><summary>resolved_recipe.yaml of this run</summary>", "", "```yaml",
                  run.recipe_path.read_text().rstrip(), "```", "", "</details>"]
    lines += ["", "## Evaluation", ""]
    figures = eval_figures(run)
    if figures:
        lines += ["| eval file | metric | value |", "|---|---|---|"]
        lines += [f"| {name} | {metric} | {value:.4g} |" for name, metric, value in figures]
    else:
        lines.append(f"No evaluation figures found in `{run.path / 'eval'}`.")
    return "\n".join(lines) + "\n"
