"""A run folder's layout (docs/INTERFACES.md s.5), and the one rule that turns what a user names (``RUN``,
``RUN/TAG`` or ``RUN/checkpoints/TAG``) into a run and a checkpoint.

    RUN/resolved_recipe.yaml        the recipe as trained (the next stage's init_from merges over its model)
    RUN/ds_config.json              the engine config as trained
    RUN/checkpoints/step_000100/    DeepSpeed files + run_state.json + rng/ + COMPLETE (written last)
    RUN/eval/step_000100.json       a training-time evaluation (+ step_000100_predictions.*)
    RUN/resumes.jsonl               one line per resume
    RUN/tensorboard/, RUN/train_log.jsonl   scalars (TensorBoard; one JSON line per log interval)
    RUN/FINISHED                    the final checkpoint's tag, after the final save and evaluation

A checkpoint folder without ``COMPLETE`` is never picked: "latest" is the newest complete one by step number
(DeepSpeed's own ``latest`` file is never written). Paths only: no torch, no DeepSpeed.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Callable

from pipeline.config_utils import ConfigError

RECIPE = "resolved_recipe.yaml"
DS_CONFIG = "ds_config.json"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
TAG_RE = re.compile(r"^step_(\d+)$")


@dataclasses.dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # ------------------------------------------------------------------------------------ files
    @property
    def recipe_path(self) -> Path:
        return self.path / RECIPE

    @property
    def ds_config_path(self) -> Path:
        return self.path / DS_CONFIG

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def finished_path(self) -> Path:
        return self.path / "FINISHED"

    @property
    def resumes_path(self) -> Path:
        return self.path / "resumes.jsonl"

    @property
    def tensorboard_path(self) -> Path:
        return self.path / "tensorboard"

    @property
    def train_log_path(self) -> Path:
        return self.path / "train_log.jsonl"

    def eval_path(self, name: str) -> Path:
        """``RUN/eval/NAME.json``: NAME is a checkpoint tag (training) or ``TASK_SPLIT_TAG`` (pipeline.evaluate)."""
        return self.path / "eval" / f"{name}.json"

    def predictions_stem(self, name: str) -> Path:
        """``RUN/eval/NAME_predictions``: the task adds its submission file's suffix."""
        return self.path / "eval" / f"{name}_predictions"

    def saved_recipe(self, what: str) -> Path:
        """``recipe_path``; ConfigError naming ``what`` (the field or flag that named this run) without one."""
        if not self.recipe_path.is_file():
            raise ConfigError(f"{what}: {self.path} is not a run folder (no {RECIPE} found)")
        return self.recipe_path

    def mark_finished(self, step: int) -> None:
        """What launch/pipeline.sh waits for before starting the next stage."""
        self.finished_path.write_text(self.tag_for(step) + "\n")

    # ------------------------------------------------------------------------------ checkpoints
    @staticmethod
    def tag_for(step: int) -> str:
        return f"step_{step:06d}"

    @staticmethod
    def step_of(tag: str) -> int:
        match = TAG_RE.match(tag)
        if match is None:
            raise ValueError(f"{tag!r} is not a checkpoint tag (step_N)")
        return int(match.group(1))

    def checkpoint(self, tag: str) -> Path:
        return self.checkpoints / tag

    def is_complete(self, tag: str) -> bool:
        return (self.checkpoint(tag) / COMPLETE).is_file()

    def mark_complete(self, tag: str, step: int) -> None:
        """Written last, once every rank's files of ``tag`` are on disk."""
        (self.checkpoint(tag) / COMPLETE).write_text(f"{step}\n")

    def complete_tags(self) -> list[str]:
        """Tags of complete checkpoints, oldest first (by step number)."""
        return sorted((tag for tag in self._tags() if self.is_complete(tag)), key=self.step_of)

    def latest(self) -> str | None:
        """The newest complete checkpoint's tag, or None."""
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def ds_config_of(self, tag: str) -> Path:
        """The engine config checkpoint ``tag`` was trained with: its own copy, else the run's."""
        copy = self.checkpoint(tag) / DS_CONFIG
        return copy if copy.is_file() else self.ds_config_path

    def prune(self, keep_last: int) -> None:
        """Remove complete checkpoints but the newest ``keep_last`` (0: keep all), and incomplete leftovers
        older than the newest complete one (a newer incomplete one may still be being written)."""
        complete = self.complete_tags()
        doomed = complete[:-keep_last] if keep_last > 0 else []
        newest = self.step_of(complete[-1]) if complete else -1
        doomed += [tag for tag in self._tags() if self.step_of(tag) < newest and not self.is_complete(tag)]
        for tag in doomed:
            shutil.rmtree(self.checkpoint(tag), ignore_errors=True)

    def _tags(self) -> list[str]:
        if not self.checkpoints.is_dir():
            return []
        return [p.name for p in self.checkpoints.iterdir() if TAG_RE.match(p.name)]

    # ------------------------------------------------------------------------------- resolution
    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        """The run folder of ``RUN``, ``RUN/TAG``, ``RUN/checkpoints/TAG`` or ``RUN/checkpoints``."""
        return cls._split(Path(path))[0]

    @classmethod
    def resolve(cls, path: str | Path) -> tuple[RunDir, str]:
        """(run, tag) of a complete checkpoint: ``RUN`` (or ``RUN/checkpoints``) -> its newest complete one;
        ``RUN/TAG`` or ``RUN/checkpoints/TAG`` -> that one. FileNotFoundError naming what was looked for."""
        run, tag = cls._split(Path(path))
        if tag is None:
            tag = run.latest()
            if tag is None:
                absent = "" if run.path.is_dir() else f" ({run.path} does not exist)"
                raise FileNotFoundError(f"{path}: no complete checkpoint under {run.checkpoints}{absent}")
        elif not run.is_complete(tag):
            folder = run.checkpoint(tag)
            why = f"no {COMPLETE} marker in {folder}" if folder.is_dir() else f"no folder {folder}"
            raise FileNotFoundError(f"{path}: not a complete checkpoint ({why})")
        return run, tag

    @classmethod
    def _split(cls, path: Path) -> tuple[RunDir, str | None]:
        """(run, tag named in ``path`` or None). ``RUN/checkpoints/TAG`` is a checkpoint (it holds a copy of
        the recipe); elsewhere a folder that holds a run's files is a run, whatever its name."""
        holds_a_run = (path / CHECKPOINTS).is_dir() or (path / RECIPE).is_file()
        if TAG_RE.match(path.name) and (not holds_a_run or path.parent.name == CHECKPOINTS):
            parent = path.parent
            return cls(parent.parent if parent.name == CHECKPOINTS else parent), path.name
        if path.name == CHECKPOINTS and not holds_a_run:
            return cls(path.parent), None
        return cls(path), None


def require_empty_output(output: Path) -> None:
    """ConfigError unless ``output`` (a run folder a command is about to write) is absent or an empty folder."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"--output {output}: exists and is not an empty folder")


def run_folder_command(prog: str, doc: str, convert: Callable[[str, Path], Path], argv: list[str] | None,
                       hint: str = "") -> int:
    """The command line of a tool that writes a new run folder from a run's checkpoint (``convert_moe``,
    ``universal``): ``PROG RUN_OR_CKPT --output DIR``; ``doc``'s first paragraph is the description, the rest the
    epilog. Prints ``wrote FOLDER`` (+ ``hint``) and returns 0, or the error and 2."""
    import argparse
    import logging
    import sys

    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog="\n\n".join(doc.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT", help="RUN_DIR (newest complete checkpoint) or RUN_DIR/TAG")
    p.add_argument("--output", required=True, help="run folder to write (created; must be empty if it exists)")
    args = p.parse_args(argv)  # --help exits here, before torch is imported
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        folder = convert(args.checkpoint, Path(args.output))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {folder}{hint}", flush=True)
    return 0
