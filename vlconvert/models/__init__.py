"""One declarative module per model family. Today: Qwen3-VL dense and Qwen3-VL-MoE (``qwen3vl``)."""

from vlconvert.models.qwen3vl import ModelInfo, Skeleton, build_skeleton, load_config

__all__ = ["ModelInfo", "Skeleton", "build_skeleton", "load_config"]
