"""Task registry: recipe ``task:`` name -> Task class, imported lazily so a task's module loads only
when used. A recipe may also name a task class by import path, ``task: package.module:ClassName`` (a
task defined outside this package, e.g. in a test), without any entry here."""
from __future__ import annotations

import importlib

from pipeline.config_utils import ConfigError
from pipeline.tasks.base import DistInfo, LossOutput, SkipSample, Task, TaskContext

TASKS: dict[str, str] = {
    "text_mlm": "pipeline.tasks.pretrain:TextMLMTask",
    "vl_pretrain": "pipeline.tasks.pretrain:VLPretrainTask",
    "vla_pretrain": "pipeline.tasks.vla_pretrain:VLAPretrainTask",
    "vqa": "pipeline.tasks.vqa:VQATask",
    "retrieval": "pipeline.tasks.retrieval:RetrievalTask",
    "nlvr2": "pipeline.tasks.nlvr2:NLVR2Task",
    "classification": "pipeline.tasks.classification:ClassificationTask",
    "gqa": "pipeline.tasks.gqa:GQATask",
    "snli_ve": "pipeline.tasks.snli_ve:SNLIVETask",
    "audio_retrieval": "pipeline.tasks.audio:AudioRetrievalTask",
    "audio_classification": "pipeline.tasks.audio:AudioClassificationTask",
    "captioning": "pipeline.tasks.captioning:CaptioningTask",
    "audio_captioning": "pipeline.tasks.captioning:AudioCaptioningTask",
}


def get_task_class(name: str) -> type[Task]:
    """The Task class of a registry name or of an import path ``module:Class`` (ConfigError otherwise)."""
    path = TASKS.get(name, name)
    if ":" not in path:
        raise ConfigError(f"unknown task {name!r}; valid tasks are {sorted(TASKS)} or an import path "
                          "'package.module:TaskClass'")
    module_name, cls_name = path.split(":", 1)
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"task {name!r}: cannot import {path} ({exc})") from exc
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task {name!r}: {path} is not a pipeline.tasks.Task subclass")
    return cls


def evaluable_tasks() -> list[str]:
    """Registered tasks with an evaluation of their own (a ``headline`` metric)."""
    return [name for name in TASKS if get_task_class(name).headline is not None]


__all__ = ["TASKS", "DistInfo", "LossOutput", "SkipSample", "Task", "TaskContext", "evaluable_tasks",
           "get_task_class"]
