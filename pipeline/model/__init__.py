"""VL-MoE model package: configs, the multiway MoE transformer, heads, init and size accounting.

    from pipeline.model import ModelConfig, MoEConfig, VLMoE, EncoderOutput, PIXEL_MEAN, PIXEL_STD
"""
from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model.embeddings import PIXEL_MEAN, PIXEL_STD
from pipeline.model.vlmoe import EncoderOutput, VLMoE

__all__ = ["ModelConfig", "MoEConfig", "VLMoE", "EncoderOutput", "PIXEL_MEAN", "PIXEL_STD"]
