"""Task registry: recipe ``task:`` name -> Task class, imported lazily so a task's module loads only
when used."""
from __future__ import annotations

import importlib

from pipeline.tasks.base import DistInfo, LossOutput, SkipSample, Task, TaskContext

TASKS: dict[str, str] = {
    "text_mlm": "pipeline.tasks.pretrain:TextMLMTask",
    "vl_pretrain": "pipeline.tasks.pretrain:VLPretrainTask",
    "vqa": "pipeline.tasks.vqa:VQATask",
    "retrieval": "pipeline.tasks.retrieval:RetrievalTask",
    "nlvr2": "pipeline.tasks.nlvr2:NLVR2Task",
    "classification": "pipeline.tasks.classification:ClassificationTask",
    "gqa": "pipeline.tasks.gqa:GQATask",
    "snli_ve": "pipeline.tasks.snli_ve:SNLIVETask",
}


def get_task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks are {sorted(TASKS)}")
    module_name, cls_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


__all__ = ["TASKS", "DistInfo", "LossOutput", "SkipSample", "Task", "TaskContext", "get_task_class"]
