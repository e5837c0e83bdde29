"""Dtype names across safetensors headers, configs and the command line."""

from __future__ import annotations

import torch

from vlconvert.errors import UserError

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``bf16``/``bfloat16``/``fp32``/... -> torch dtype; ``None`` or ``keep`` -> None (keep source)."""
    if name is None or name in ("keep", "auto", ""):
        return None
    key = name.lower().removeprefix("torch.")
    if key not in _NAMES:
        raise UserError(f"unknown dtype '{name}': use bf16, fp16 or fp32")
    return _NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return dtype.itemsize
