"""vlconvert: convert Qwen3-VL checkpoints between HF, DCP and Megatron layouts; repair tokenizers."""

__version__ = "0.1.0"
