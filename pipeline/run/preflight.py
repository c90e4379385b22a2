"""Checks of a run's inputs that take seconds before a launch instead of hours into it: data folders,
splits, shards, the kind of data a task can read, its vocabulary files, the tokenizer and ``init_from``.

    problems = check_run_inputs(recipe)        # [] when every input is usable
    require_no_problems(problems, "launch/recipes/vqa.yaml")  # or one ConfigError listing them all

Called by ``pipeline.plan`` (which the launch scripts run before the launcher), by rank 0 of
``pipeline.train`` at start-up, and by ``pipeline.evaluate`` (``eval_input_problems``) before any rank
work. Reads manifests and small JSON files and loads the tokenizer; never starts a process group.
What a task reads comes from its class: ``fields``, ``manifest_tasks`` (missing: any manifest task) and
``vocab_files`` (missing: none; the list is the JSON key named like the file, ``answers.json`` ->
``answers``). The vocabulary always comes from the first training folder, ``data.train[0]``.
Audio folders: clips written at another rate than ``model.audio.sample_rate`` are a problem (the loader would
skip every clip); clips longer than ``model.audio.max_frames`` covers are a warning (``input_warnings``, logged
by ``check_run_inputs``), read from the per-clip JSON of the split's first shard.
"""
from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path
from typing import Any

from pipeline.config_utils import ConfigError

logger = logging.getLogger(__name__)

MAX_LISTED = 3  # missing shard files named in one message
SAMPLED_CLIPS = 256  # clips of a split's first shard whose lengths the max_frames warning reads


def check_run_inputs(recipe: Any) -> list[str]:
    """Every problem with the inputs of ``recipe`` (one line each, naming field, path and what is valid)."""
    from pipeline.model.init_recipe import check_init
    from pipeline.tasks import get_task_class

    task_cls = get_task_class(recipe.task)
    allow_pipe = recipe.data.allow_pipe_urls
    problems = []
    for index, source in enumerate(recipe.data.train):
        problems += source_problems(f"data.train[{index}]", source.path, source.split, task_cls, allow_pipe)
    if recipe.data.eval is not None:
        problems += source_problems("data.eval", recipe.data.eval.path, recipe.data.eval.split, task_cls,
                                    allow_pipe)
    problems += vocab_problems(task_cls, recipe.data.train[0].path, "data.train[0]")
    problems += modality_problems(recipe, task_cls)
    problems += audio_rate_problems(recipe_sources(recipe), recipe.model)
    problems += tokenizer_problems(recipe.data.tokenizer, recipe.model.vocab_size)
    problems += init_from_problems(recipe.init_from)
    problems += check_init(recipe)
    for warning in input_warnings(recipe):
        logger.warning("%s", warning)
    return problems


def input_warnings(recipe: Any) -> list[str]:
    """Inputs that work but waste something (one line each): clips longer than ``model.audio.max_frames``."""
    fix = ("it must stay the init_from run's (its audio positions are learned for that many frames): set it "
           "in the stage trained from scratch") if recipe.init_from else "set it (more audio tokens per clip)"
    return clip_length_warnings(recipe_sources(recipe), recipe.model, fix)


def eval_input_problems(recipe: Any, task: str, data: str, split: str) -> list[str]:
    """Problems of ``pipeline.evaluate --task TASK --data DATA --split SPLIT`` on a run whose resolved
    recipe is ``recipe``: the task it was trained for, the data and split, its vocabulary and tokenizer."""
    from pipeline.tasks import get_task_class

    if recipe.task != task:
        return [f"--task {task}: the checkpoint was trained for task {recipe.task!r}; use --task {recipe.task} "
                f"(or the checkpoint of a {task} run)"]
    task_cls = get_task_class(task)
    fixed = "the run's model was trained for that many frames (its audio positions are learned for them)"
    for warning in clip_length_warnings([("--data", data, split)], recipe.model, fixed):
        logger.warning("%s", warning)
    return (source_problems("--data/--split", data, split, task_cls, recipe.data.allow_pipe_urls)
            + audio_rate_problems([("--data", data, split)], recipe.model, trained=True)
            + vocab_problems(task_cls, recipe.data.train[0].path, "data.train[0] of the run's resolved_recipe.yaml")
            + tokenizer_problems(recipe.data.tokenizer, recipe.model.vocab_size))


def require_no_problems(problems: list[str], what: str) -> None:
    """Raise one ConfigError listing ``problems`` (if any) of ``what`` (a recipe path, a command)."""
    if problems:
        raise ConfigError(f"{what}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


# --------------------------------------------------------------------------------------- data sources
def source_problems(field: str, path: str, split: str, task_cls: Any, allow_pipe_urls: bool) -> list[str]:
    """A data_prep folder (manifest, split, shards, task kind, fields) or a webdataset URL spec."""
    if Path(path).is_dir():
        return folder_problems(field, Path(path), split, task_cls)
    return url_problems(field, path, allow_pipe_urls)


def folder_problems(field: str, folder: Path, split: str, task_cls: Any) -> list[str]:
    where = f"{field}.path={folder}"
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        inner = sorted(p.name for p in folder.iterdir() if (p / "manifest.json").is_file())
        hint = f"; its sub-folders {inner} are: use one of them" if inner else \
            " (one written by `python -m data_prep COMMAND --output DIR`)"
        return [f"{where}: no manifest.json, so not a data_prep output folder{hint}"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{where}: {manifest_path} is not valid JSON ({exc}); rerun the data_prep command"]
    problems = kind_problems(where, manifest, task_cls)
    splits = manifest.get("splits") or {}
    if split not in splits:
        return problems + [f"{field}.split={split!r}: not in {manifest_path}; its splits are {sorted(splits)}"]
    entry = splits[split]
    if not entry.get("num_samples"):
        problems.append(f"{field}.split={split!r}: {manifest_path} lists 0 samples for it; pick another split "
                        f"of {sorted(s for s in splits if splits[s].get('num_samples'))} or rerun data_prep")
    missing = [name for name in entry.get("shards", []) if not (folder / name).is_file()]
    if missing or not entry.get("shards"):
        problems.append(f"{field}.split={split!r}: {len(missing)} of {len(entry.get('shards', []))} shard files "
                        f"missing in {folder} (e.g. {missing[:MAX_LISTED]}); copy them or rerun data_prep")
    return problems


def kind_problems(where: str, manifest: dict[str, Any], task_cls: Any) -> list[str]:
    """The manifest's ``task`` and ``fields`` against what ``task_cls`` reads."""
    problems = []
    readable = getattr(task_cls, "manifest_tasks", None)
    kind = manifest.get("task")
    if readable is not None and kind not in readable:
        problems.append(f"{where}: holds {kind!r} data (manifest.json task), which recipe task "
                        f"{task_cls.name!r} cannot read; it reads data_prep folders of task {list(readable)}")
    fields = manifest.get("fields")
    lacking = [f for f in task_cls.fields if fields is not None and f not in fields]
    if lacking:
        problems.append(f"{where}: its samples lack field(s) {lacking} that task {task_cls.name!r} reads "
                        f"(manifest.json fields {fields}, the task needs {list(task_cls.fields)})")
    return problems


def modality_problems(recipe: Any, task_cls: Any) -> list[str]:
    """A source of audio data (manifest task ``audio_*``) read by a task that reads audio fields needs
    "audio" in ``model.modalities`` (else the first audio micro-batch fails inside the model, on every rank)."""
    from pipeline.data.loader import AUDIO_EXTS

    reads_audio = set(task_cls.fields) | set(getattr(task_cls, "optional_fields", ()))
    if "audio" in recipe.model.modalities or not reads_audio & set(AUDIO_EXTS):
        return []
    sources = [(f"data.train[{i}]", s) for i, s in enumerate(recipe.data.train)]
    sources += [("data.eval", recipe.data.eval)] if recipe.data.eval is not None else []
    problems = []
    for field, source in sources:
        try:
            kind = json.loads((Path(source.path) / "manifest.json").read_text()).get("task")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue  # not a data_prep folder: folder_problems / url_problems say so
        if isinstance(kind, str) and kind.startswith("audio"):
            problems.append(f"{field}.path={source.path}: holds {kind!r} data (audio clips) but model.modalities "
                            f"is {list(recipe.model.modalities)}: add 'audio' (and an audio: block sized for the "
                            "clips) to the recipe's model, or drop this source")
    return problems


# --------------------------------------------------------------------------------------- audio clips
def recipe_sources(recipe: Any) -> list[tuple[str, str, str]]:
    """(field, path, split) of every data source of ``recipe``: ``data.train[i]``, then ``data.eval``."""
    sources = [(f"data.train[{i}]", s.path, s.split) for i, s in enumerate(recipe.data.train)]
    return sources + ([("data.eval", recipe.data.eval.path, recipe.data.eval.split)] if recipe.data.eval else [])


def audio_manifests(sources: list[tuple[str, str, str]], model_cfg: Any) -> list[tuple[str, Path, str, dict]]:
    """(field, folder, split, manifest) of the data_prep folders of audio clips among ``sources``, when the
    model reads audio (without it ``modality_problems`` speaks)."""
    if "audio" not in model_cfg.modalities:
        return []
    found = []
    for field, path, split in sources:
        try:
            manifest = json.loads((Path(path) / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue  # not a data_prep folder: folder_problems / url_problems say so
        if isinstance(manifest, dict) and str(manifest.get("task", "")).startswith("audio"):
            found.append((field, Path(path), split, manifest))
    return found


def audio_rate_problems(sources: list[tuple[str, str, str]], model_cfg: Any, trained: bool = False) -> list[str]:
    """Clips written (``data_prep ... --sample-rate``, manifest.json ``options.sample_rate``) at another rate
    than ``model.audio.sample_rate``: the loader would skip each of them as ``audio_rate_*``. ``trained``: the
    model is a finished run's (evaluation), so only the data can change."""
    want, problems = model_cfg.audio.sample_rate, []
    for field, folder, _, manifest in audio_manifests(sources, model_cfg):
        rate = (manifest.get("options") or {}).get("sample_rate")
        if not isinstance(rate, int) or rate == want:
            continue
        other_model = (" (the rate the run's model was trained at)" if trained else
                       f", or set model.audio.sample_rate={rate} (a model trained at {want} Hz then sees other "
                       "features)")
        problems.append(f"{field}.path={folder}: its clips are {rate} Hz (manifest.json options.sample_rate, data_prep "
                        f"--sample-rate {rate}) but model.audio.sample_rate is {want}, so the loader would skip every "
                        f"clip (audio_rate_{rate}_not_{want}): rerun the data_prep command with --sample-rate {want} "
                        f"into another --output folder{other_model}")
    return problems


def clip_length_warnings(sources: list[tuple[str, str, str]], model_cfg: Any, fix: str) -> list[str]:
    """Sources whose clips (the first ``SAMPLED_CLIPS`` of the split's first shard) run past the seconds
    ``model.audio.max_frames`` covers: the loader keeps only the start of each. ``fix``: how to raise it."""
    from pipeline.model.audio_features import FRAME_SECONDS, HOP_SECONDS, num_frames

    cfg = model_cfg.audio
    covered = FRAME_SECONDS + (cfg.max_frames - 1) * HOP_SECONDS
    warnings = []
    for field, folder, split, manifest in audio_manifests(sources, model_cfg):
        cap = (manifest.get("options") or {}).get("max_seconds")
        shards = ((manifest.get("splits") or {}).get(split) or {}).get("shards") or []
        if (isinstance(cap, (int, float)) and cap <= covered) or not shards:
            continue  # data_prep already cut every clip to what the model covers
        seconds = clip_seconds(folder / shards[0], SAMPLED_CLIPS)
        longer = [s for s in seconds if num_frames(round(s * cfg.sample_rate), cfg.sample_rate) > cfg.max_frames]
        if not longer:
            continue
        cut = sum(s - covered for s in longer) / sum(seconds)
        needed = num_frames(round(max(longer) * cfg.sample_rate), cfg.sample_rate)
        warnings.append(f"{field}.path={folder}: {len(longer)} of the first {len(seconds)} clips of split "
                        f"{split!r} ({shards[0]}) are longer than the {covered:.2f} s that model.audio.max_frames="
                        f"{cfg.max_frames} covers (longest {max(longer):.2f} s): the model sees only their start, "
                        f"{cut:.0%} of the audio is never used; model.audio.max_frames={needed} covers them all: "
                        f"{fix}")
    return warnings


def clip_seconds(shard: Path, limit: int) -> list[float]:
    """``audio.<ext>.seconds`` of the per-clip JSON of the first ``limit`` samples of a local ``shard``."""
    seconds: list[float] = []
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if len(seconds) >= limit:
                    break
                if not member.name.endswith(".json"):
                    continue
                audio = json.loads(tar.extractfile(member).read()).get("audio") or {}
                seconds += [float(v["seconds"]) for v in audio.values() if isinstance(v, dict) and "seconds" in v][:1]
    except (OSError, tarfile.TarError, json.JSONDecodeError, AttributeError, TypeError, ValueError):
        pass  # an unreadable shard: folder_problems or the loader's failure budget speak
    return seconds


def url_problems(field: str, spec: str, allow_pipe_urls: bool) -> list[str]:
    """A webdataset URL spec (``dir/train-{000000..000009}.tar``, ``a.tar::b.tar``): local files must exist."""
    from urllib.parse import urlparse

    from webdataset.shardlists import expand_urls

    from pipeline.data.loader import url_scheme_problem

    urls = list(expand_urls(spec))
    refused = [problem for problem in (url_scheme_problem(u, allow_pipe_urls) for u in urls) if problem]
    if refused:
        return [f"{field}.path: {refused[0]}"]
    local = [u.removeprefix("file:") for u in urls if urlparse(u).scheme.lower() in ("", "file")]
    if urls == [spec] and local and not Path(local[0]).exists():
        return [f"{field}.path={spec}: does not exist; give a data_prep output folder (with manifest.json) "
                "or a webdataset URL spec such as DIR/train-{000000..000009}.tar"]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        return [f"{field}.path={spec}: {len(missing)} of {len(urls)} shard files do not exist "
                f"(e.g. {missing[:MAX_LISTED]})"]
    return []


# ------------------------------------------------------------------------ vocabulary, tokenizer, init
def vocab_problems(task_cls: Any, train_path: str, field: str) -> list[str]:
    """``task_cls.vocab_files`` in the training folder, each holding a non-empty list under its stem."""
    problems = []
    for name in getattr(task_cls, "vocab_files", ()):
        path, key = Path(train_path) / name, Path(name).stem
        if not path.is_file():
            problems.append(f"{field}.path={train_path}: no {name}; task {task_cls.name!r} takes its "
                            f"vocabulary from the first training folder (written by data_prep {task_cls.name})")
            continue
        try:
            values = json.loads(path.read_text()).get(key)
        except (json.JSONDecodeError, AttributeError) as exc:
            problems.append(f"{path}: not a JSON object with a {key!r} list ({exc}); rerun data_prep")
            continue
        if not isinstance(values, list) or not values:
            problems.append(f"{path}: {key!r} must be a non-empty list, got {values!r:.60}; rerun data_prep "
                            f"(e.g. a lower --min-answer-count) or point {field} at another folder")
    return problems


def tokenizer_problems(path: str, vocab_size: int) -> list[str]:
    """The tokenizer folder loads with AutoTokenizer and fits ``model.vocab_size``."""
    if not Path(path).is_dir():
        return [f"data.tokenizer={path}: not a folder; make one with `python -m data_prep tokenizer --shards "
                "DATA_DIR ... --output DIR`"]
    from transformers import AutoTokenizer

    try:
        size = len(AutoTokenizer.from_pretrained(path))
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for broken folders
        return [f"data.tokenizer={path}: cannot be loaded by AutoTokenizer.from_pretrained "
                f"({type(exc).__name__}: {str(exc)[:200]})"]
    if size > vocab_size:
        return [f"model.vocab_size={vocab_size} is smaller than the {size} tokens of data.tokenizer={path}: "
                f"set model.vocab_size >= {size}"]
    return []


def init_from_problems(init_from: str | None) -> list[str]:
    """``init_from`` names a run (or checkpoint) with a complete checkpoint to take weights from."""
    if not init_from:
        return []
    from pipeline.run.run_dir import RunDir

    try:
        RunDir.resolve(init_from)
    except FileNotFoundError as exc:
        return [f"init_from={init_from}: {exc}; finish that stage first or point init_from at a run folder "
                "with a complete checkpoint"]
    return []
