"""Rows of a tensor held in memory as bytes, for routes that move bytes and do no arithmetic: no torch.

Most of what a conversion writes lies verbatim in a source file (:class:`~vlconvert.layouts.filebytes.FileSpan`,
copied file to file). The rest must be put together in memory: the columns of a row-parallel matrix a TP rank
holds, a matrix gathered back from its TP ranks, an expert matrix turned from ``[in, out]`` to ``[out, in]``,
vocabulary padding. None of that changes a value, so it is done here on bytes with numpy (0.15 s to import)
instead of torch (1.5 s to import on a small machine, 3.5-4 s with a CUDA build). A cast between bf16, fp16 and
fp32 (:func:`cast`) is done here too, rounding as torch does, and so is adding a constant in fp32 (:func:`add`, a
family's value op). Anything else that computes (a LoRA merge, FP8 dequantization) still takes torch tensors.

A :class:`ByteRows` is a block a writer takes like a tensor block: ``shape``, ``dtype`` (a
:class:`~vlconvert.dtypes.DType`), ``nbytes`` and :func:`raw`. Its memory comes from the process's buffer pool
(:mod:`vlconvert.buffers`) from :data:`~vlconvert.buffers.POOL_MIN` bytes on.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from vlconvert import buffers
from vlconvert.dtypes import BFLOAT16, FLOAT16, FLOAT32, DType, to_torch
from vlconvert.errors import UserError
from vlconvert.lazy import LazyModule, torch

numpy: Any = LazyModule("numpy")


@dataclass(frozen=True, eq=False)
class ByteRows:
    """Rows of a tensor of ``shape`` and ``dtype`` as a C-ordered uint8 array ``data`` of ``[rows, row bytes]``."""

    data: Any  # numpy.ndarray, uint8, 2-D, C-contiguous
    shape: tuple[int, ...]
    dtype: DType

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> ByteRows:
        """Rows ``start:stop`` (a view, no copy)."""
        return ByteRows(self.data[start:stop], (max(0, min(stop, self.shape[0]) - start), *self.shape[1:]), self.dtype)

    def reshape(self, shape: tuple[int, ...]) -> ByteRows:
        """The same bytes seen with another shape of as many elements (a view)."""
        if math.prod(shape) != math.prod(self.shape):
            raise ValueError(f"cannot view {self.shape} as {shape}")
        rows, width = _rows_and_width(tuple(shape), self.dtype)
        return ByteRows(self.data.reshape(rows, width), tuple(shape), self.dtype)

    def to_tensor(self) -> torch.Tensor:
        """The same bytes as a torch tensor (shares the memory): for the few callers that compute."""
        flat = torch.frombuffer(memoryview(self.data.reshape(-1)), dtype=torch.uint8) if self.nbytes else \
            torch.empty((0,), dtype=torch.uint8)
        return flat.view(to_torch(self.dtype)).reshape(self.shape)


def _rows_and_width(shape: tuple[int, ...], dtype: DType) -> tuple[int, int]:
    """(rows, bytes per row) of a tensor of ``shape``: a scalar or 1-D tensor is rows of one element."""
    if not shape:
        return 1, dtype.itemsize
    return shape[0], math.prod(shape[1:]) * dtype.itemsize


def empty(shape: tuple[int, ...], dtype: DType) -> ByteRows:
    """Uninitialised rows (pooled memory for large blocks)."""
    rows, width = _rows_and_width(shape, dtype)
    if rows * width < buffers.POOL_MIN:
        return ByteRows(numpy.empty((rows, width), dtype=numpy.uint8), tuple(shape), dtype)
    data = numpy.frombuffer(buffers.BUFFERS.take(rows * width), dtype=numpy.uint8).reshape(rows, width)
    return ByteRows(data, tuple(shape), dtype)


def zeros(shape: tuple[int, ...], dtype: DType) -> ByteRows:
    """Rows of zeros (vocabulary padding); +0.0 is all zero bytes in every float format."""
    rows, width = _rows_and_width(shape, dtype)
    return ByteRows(numpy.zeros((rows, width), dtype=numpy.uint8), tuple(shape), dtype)


def read(f: io.BufferedReader | io.RawIOBase, start: int, shape: tuple[int, ...], dtype: DType,
         truncated: str) -> ByteRows:
    """Bytes ``start:`` of open file ``f`` as rows of ``shape`` and ``dtype``, read with plain reads into fresh
    (pooled) memory; a file that ends early is one :class:`UserError`, ``truncated``."""
    out = empty(shape, dtype)
    if out.nbytes:
        read_into(f, start, memoryview(out.data.reshape(-1)), truncated)
    return out


def read_into(f: io.BufferedReader | io.RawIOBase, start: int, view: memoryview, truncated: str) -> None:
    """Fill ``view`` with bytes ``start:`` of open file ``f`` (plain reads, no mmap); a file that ends early is one
    :class:`UserError`, ``truncated``."""
    f.seek(start)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise UserError(truncated)
        got += n


def columns(block: ByteRows, start: int, stop: int) -> ByteRows:
    """Columns ``start:stop`` of a 2-D block, contiguous (a row-parallel weight's TP share)."""
    item = block.dtype.itemsize
    out = empty((block.shape[0], stop - start), block.dtype)
    numpy.copyto(out.data, block.data[:, start * item:stop * item])
    return out


def concat_rows(parts: list[ByteRows]) -> ByteRows:
    """Blocks of the same trailing shape one after the other."""
    if len(parts) == 1:
        return parts[0]
    rows = sum(p.shape[0] for p in parts)
    out = empty((rows, *parts[0].shape[1:]), parts[0].dtype)
    at = 0
    for p in parts:
        out.data[at:at + p.shape[0]] = p.data
        at += p.shape[0]
    return out


def concat_columns(parts: list[ByteRows]) -> ByteRows:
    """2-D blocks of the same rows side by side (a row-parallel weight gathered from its TP ranks)."""
    if len(parts) == 1:
        return parts[0]
    cols = sum(p.shape[1] for p in parts)
    out = empty((parts[0].shape[0], cols), parts[0].dtype)
    at = 0
    for p in parts:
        out.data[:, at:at + p.data.shape[1]] = p.data
        at += p.data.shape[1]
    return out


_UINT = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


def transposed(block: ByteRows) -> ByteRows:
    """A 2-D block transposed, contiguous (an expert matrix between ``[in, out]`` and ``[out, in]``)."""
    rows, cols = block.shape
    item = block.dtype.itemsize
    out = empty((cols, rows), block.dtype)
    kind = getattr(numpy, _UINT[item])
    numpy.copyto(out.data.view(kind), block.data.view(kind).T)
    return out


CAST_DTYPES = (BFLOAT16, FLOAT16, FLOAT32)


def can_cast(stored: DType, dtype: DType) -> bool:
    """Whether :func:`cast` converts ``stored`` to ``dtype`` (bf16, fp16 and fp32, either way)."""
    return stored != dtype and stored in CAST_DTYPES and dtype in CAST_DTYPES


def cast(block: ByteRows, dtype: DType) -> ByteRows | None:
    """``block``'s values in float ``dtype`` (bf16, fp16 or fp32), rounded as torch rounds them on the CPU: to the
    nearest value, ties to even; out of range to +-inf; subnormals kept. bf16 is the top half of an fp32, so
    fp32 -> bf16 adds the rounding bias to the 32-bit pattern (``0x7fff`` plus the lowest kept bit) and keeps the top
    16 bits; fp16 is numpy's own float16, which rounds the same way; bf16 <-> fp16 passes through fp32, as torch
    does. None for a block holding a NaN: torch writes NaN bits that differ with the pair of dtypes and the CPU
    (``0xffff``, ``0x7fc0``, ``0x7e00`` ...), so such a block goes to torch and the output stays torch's bytes."""
    if not can_cast(block.dtype, dtype):
        raise ValueError(f"no byte cast from {block.dtype} to {dtype}")
    values = _values(block)
    return None if numpy.isnan(values).any() else _rounded(values, block.shape, dtype)


def add(block: ByteRows, value: float) -> ByteRows | None:
    """``block + value`` in its own dtype, computed as torch's ``(t.float() + value).to(t.dtype)``: in fp32, then
    rounded by :func:`cast`'s rule (a family's value op, e.g. Qwen3.5's zero-centred norm gains). None for a dtype
    other than bf16, fp16 and fp32 and for a block holding a NaN (then torch computes it)."""
    if block.dtype not in CAST_DTYPES:
        return None
    values = _values(block)
    if numpy.isnan(values).any():
        return None
    summed = numpy.add(values, numpy.float32(value), dtype=numpy.float32)  # a new array: the block stays as it was
    return _rounded(summed, block.shape, block.dtype)


def _values(block: ByteRows) -> Any:
    """The block's values as a flat numpy float array: fp32 and fp16 as stored, bf16 widened to fp32 (exact)."""
    flat = numpy.ascontiguousarray(block.data).reshape(-1)
    if block.dtype == FLOAT32:
        return flat.view(numpy.float32)
    if block.dtype == FLOAT16:
        return flat.view(numpy.float16)
    return numpy.left_shift(flat.view(numpy.uint16).astype(numpy.uint32), 16).view(numpy.float32)


def _rounded(values: Any, shape: tuple[int, ...], dtype: DType) -> ByteRows:
    """Float ``values`` (no NaN) as rows of ``shape`` in ``dtype``, rounded to nearest, ties to even."""
    out = empty(shape, dtype)
    target = out.data.reshape(-1)
    if dtype == BFLOAT16:
        bits = values.astype(numpy.float32, copy=False).view(numpy.uint32)
        rounded = numpy.right_shift(bits, 16)
        numpy.bitwise_and(rounded, 1, out=rounded)
        rounded += 0x7FFF
        rounded += bits
        rounded >>= 16
        numpy.copyto(target.view(numpy.uint16), rounded, casting="unsafe")
    else:
        with numpy.errstate(over="ignore"):  # a value out of fp16's range is +-inf, as in torch
            numpy.copyto(target.view(numpy.float16 if dtype == FLOAT16 else numpy.float32), values, casting="unsafe")
    return out


def raw(block: ByteRows) -> Any:
    """The block's bytes as one flat buffer (no copy)."""
    return block.data.reshape(-1)


def is_byte_rows(value: object) -> bool:
    """Whether ``value`` is a :class:`ByteRows`."""
    return isinstance(value, ByteRows)
