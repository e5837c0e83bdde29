"""Byte ranges of files: exact reads into fresh (pooled) tensor memory, and spans writers copy verbatim."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

from vlconvert import buffers, rowbytes
from vlconvert.dtypes import DType, element_size
from vlconvert.errors import UserError
from vlconvert.lazy import torch
from vlconvert.rowbytes import ByteRows


def read_exact(f: io.BufferedReader | io.RawIOBase, start: int, nbytes: int, truncated: str) -> torch.Tensor:
    """Bytes ``start:start+nbytes`` of open file ``f`` as a fresh uint8 tensor, with plain reads (no mmap:
    resident memory stays the range's size); a file that ends early is one :class:`UserError`, ``truncated``."""
    out = buffers.empty((nbytes,), torch.uint8)
    if nbytes:
        rowbytes.read_into(f, start, memoryview(out.numpy()), truncated)
    return out


def read_bytes(f: io.BufferedReader | io.RawIOBase, start: int, nbytes: int, truncated: str) -> bytes:
    """Bytes ``start:start+nbytes`` of open file ``f`` (small ranges: a record's ``data.pkl``), no torch."""
    f.seek(start)
    data = f.read(nbytes)
    if len(data) < nbytes:
        raise UserError(truncated)
    return data


@dataclass(frozen=True)
class FileSpan:
    """Rows of a tensor that lie in a file exactly as a writer would store them (C order, little-endian):
    ``shape`` and ``dtype`` at bytes ``offset:offset+nbytes`` of ``path``. Readers hand these out for
    rows they can copy verbatim, and writers copy them file to file (``OutputFile.copy_range``)
    instead of reading them into memory and writing them out again."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: DType

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)

    def rows(self, start: int, stop: int) -> FileSpan:
        """Rows ``start:stop`` of this span (first dimension)."""
        row = math.prod(self.shape[1:]) * element_size(self.dtype)
        return FileSpan(self.path, self.offset + start * row, (stop - start, *self.shape[1:]), self.dtype)

    def reshape(self, shape: tuple[int, ...]) -> FileSpan:
        """The same bytes seen with another shape of as many elements."""
        if math.prod(shape) != math.prod(self.shape):
            raise ValueError(f"cannot view {self.shape} as {shape}")
        return FileSpan(self.path, self.offset, tuple(shape), self.dtype)


def block_nbytes(block: torch.Tensor | ByteRows | FileSpan) -> int:
    """Bytes of a block a writer is given: a tensor or :class:`ByteRows` in memory, or a :class:`FileSpan`."""
    return block.nbytes if isinstance(block, (FileSpan, ByteRows)) else block.numel() * block.element_size()


def block_buffer(block: torch.Tensor | ByteRows | FileSpan):
    """What a writer writes for a block: a :class:`FileSpan` as it is (copied file to file), else the block's
    bytes as one flat buffer (no copy for a contiguous tensor)."""
    if isinstance(block, FileSpan):
        return block
    if isinstance(block, ByteRows):
        return rowbytes.raw(block)
    return block.contiguous().reshape(-1).view(torch.uint8).numpy()
