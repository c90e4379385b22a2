"""``VLMoEConfig``: everything needed to rebuild an exported model without its run folder: the transformer
(``ModelConfig`` as a dict, experts local: ``moe.ep_size`` 1), the task it was trained for, its heads
(``pipeline.hf.heads`` specs) and their label maps (e.g. VQA's answers), the text length and image size."""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class VLMoEConfig(PretrainedConfig):
    model_type = "vlmoe"

    vlmoe: dict | None = None  # pipeline.model.config.ModelConfig as a dict (None: the defaults)
    task: str | None = None  # the pipeline.tasks name the heads were trained for, e.g. "vqa"
    heads: dict | None = None  # head name -> spec (pipeline.hf.heads.head_spec)
    label_maps: dict | None = None  # head name -> the label of each output (VQA: the answers)
    text_len: int = 32  # tokens per text the model was trained with (padded / truncated to it)
    image_size: int = 64  # image side in pixels the model was trained with

    def model_config(self) -> Any:
        """The transformer's ``ModelConfig`` (expert parallelism off: every expert is local)."""
        import dataclasses

        from pipeline.config_utils import from_dict
        from pipeline.model.config import ModelConfig

        cfg = from_dict(ModelConfig, dict(self.vlmoe or {}), "config.json vlmoe")
        return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, ep_size=1))
