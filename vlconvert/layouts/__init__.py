"""One module per on-disk format: HF safetensors, PyTorch DCP, Megatron legacy. No model knowledge here."""
