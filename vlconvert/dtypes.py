"""Dtypes by name, known without importing torch.

A plan is made of headers and configs, so its dtypes are :class:`DType` values ("bfloat16"), not torch dtypes:
``vlconvert plan`` and ``convert --dry-run`` then start without ``import torch`` (3-4 s with a CUDA build).
A :class:`DType` equals the torch dtype of the same name from either side, so code that compares a plan's dtype
with a tensor's keeps working; code that hands a dtype to torch calls :func:`to_torch`. Every function here
takes either kind.
"""

from __future__ import annotations

from typing import Any

from vlconvert.errors import UserError


class DType(str):
    """A tensor dtype by its torch name (``"bfloat16"``), with its size and kind.

    It equals ``torch.bfloat16`` (either side of ``==``) and prints as it (``str()`` is ``"torch.bfloat16"``),
    but hashes as its name: normalize with :func:`as_dtype` before mixing both kinds as dict keys."""

    itemsize: int
    is_floating_point: bool

    def __new__(cls, name: str, itemsize: int, is_floating_point: bool) -> DType:
        self = super().__new__(cls, name)
        self.itemsize, self.is_floating_point = itemsize, is_floating_point
        return self

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return str.__eq__(self, other)
        return is_torch_dtype(other) and str(other) == f"torch.{str.__str__(self)}"

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = str.__hash__

    def __str__(self) -> str:  # as torch prints its dtypes: messages and written names stay the same
        return f"torch.{str.__str__(self)}"

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __reduce__(self) -> tuple[Any, ...]:
        return (as_dtype, (str.__str__(self),))


def is_torch_dtype(value: object) -> bool:
    kind = type(value)
    return kind.__name__ == "dtype" and kind.__module__ == "torch"


_ALL = [DType(*spec) for spec in [
    ("bfloat16", 2, True), ("float16", 2, True), ("float32", 4, True), ("float64", 8, True),
    ("int8", 1, False), ("uint8", 1, False), ("int16", 2, False), ("int32", 4, False), ("int64", 8, False),
    ("bool", 1, False), ("float8_e4m3fn", 1, True), ("float8_e5m2", 1, True),
    ("uint16", 2, False), ("uint32", 4, False), ("uint64", 8, False)]]
BY_NAME: dict[str, DType] = {str.__str__(d): d for d in _ALL}
BFLOAT16, FLOAT16, FLOAT32 = BY_NAME["bfloat16"], BY_NAME["float16"], BY_NAME["float32"]
FLOAT64, UINT8, INT64 = BY_NAME["float64"], BY_NAME["uint8"], BY_NAME["int64"]

SAFETENSORS: dict[str, DType] = {code: BY_NAME[name] for code, name in [
    ("BF16", "bfloat16"), ("F16", "float16"), ("F32", "float32"), ("F64", "float64"), ("I8", "int8"),
    ("U8", "uint8"), ("I16", "int16"), ("I32", "int32"), ("I64", "int64"), ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")]}
_SAFETENSORS_CODE = {str.__str__(d): code for code, d in SAFETENSORS.items()}

_NAMES = {"bf16": BFLOAT16, "bfloat16": BFLOAT16, "fp16": FLOAT16, "float16": FLOAT16, "half": FLOAT16,
          "fp32": FLOAT32, "float32": FLOAT32, "float": FLOAT32}


def as_dtype(dtype: Any) -> DType:
    """A :class:`DType` from a DType, a torch dtype or a torch name (``"bfloat16"``, ``"torch.bfloat16"``)."""
    if isinstance(dtype, DType):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if (isinstance(dtype, str) or is_torch_dtype(dtype)) and name in BY_NAME:
        return BY_NAME[name]
    raise UserError(f"unsupported dtype {name!r}")


def to_torch(dtype: Any) -> Any:
    """The torch dtype for a :class:`DType` (imports torch); a torch dtype is returned as it is."""
    if is_torch_dtype(dtype):
        return dtype
    import torch

    return getattr(torch, str.__str__(as_dtype(dtype)))


def safetensors_code(dtype: Any) -> str:
    """The safetensors header's name for ``dtype`` (``"BF16"``)."""
    return _SAFETENSORS_CODE[str.__str__(as_dtype(dtype))]


def parse_dtype(name: str | None) -> DType | None:
    """``bf16``/``bfloat16``/``fp32``/... -> DType; ``None`` or ``keep`` -> None (keep source)."""
    if name is None or name in ("keep", "auto", ""):
        return None
    key = name.lower().removeprefix("torch.")
    if key not in _NAMES:
        raise UserError(f"unknown dtype '{name}': use bf16, fp16 or fp32")
    return _NAMES[key]


def dtype_name(dtype: Any) -> str:
    """torch.bfloat16 or DType('bfloat16') -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.") if is_torch_dtype(dtype) else str.__str__(dtype)


def element_size(dtype: Any) -> int:
    """Bytes per element of ``dtype``."""
    return dtype.itemsize
