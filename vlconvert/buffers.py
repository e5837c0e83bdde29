"""Reusable memory for the large blocks a conversion reads and re-orients (expert matrices, row blocks).

A conversion allocates the same few sizes over and over (a 235B expert matrix is 24 MiB, read then
transposed, hundreds of times). Freed in another order than allocated, and handed between threads,
they leave holes in glibc's heap that it keeps: the 235B slice peaked at about 1000 MiB for a live set
under 500 MiB. Fresh pages for every block instead (glibc's mmap threshold) cost 4-6 s of page faults
on the slice. So blocks of :data:`POOL_MIN` bytes or more come from here: each is a ``bytearray``
wrapped by ``torch.frombuffer``, and it is handed out again only once no tensor, view or numpy array
refers to it any more (every one of them holds a reference to the ``bytearray`` through its storage).
"""

from __future__ import annotations

import math
import sys
import threading

from vlconvert.dtypes import DType, to_torch
from vlconvert.lazy import torch

POOL_MIN = 8 * 2**20  # smaller blocks come from torch.empty
KEEP = 32  # buffers kept per size; more live at once are allocated as usual and not kept


def _references(buf: bytearray) -> int:
    return sys.getrefcount(buf)


def _idle_references() -> int:
    """What :func:`_references` says for a buffer only the pool holds, seen from :meth:`BufferPool._take`."""
    bucket = [bytearray(1)]
    for buf in bucket:
        return _references(buf)
    raise AssertionError


class BufferPool:
    """Buffers by size, reused when nothing refers to them."""

    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self._buffers: dict[int, list[bytearray]] = {}
        self._lock = threading.Lock()
        self._idle = _idle_references()

    def _take(self, nbytes: int) -> bytearray:
        with self._lock:
            bucket = self._buffers.setdefault(nbytes, [])
            for buf in bucket:
                if _references(buf) <= self._idle:
                    return buf
            buf = bytearray(nbytes)
            if len(bucket) < self.keep:
                bucket.append(buf)
            return buf

    def take(self, nbytes: int) -> bytearray:
        """A buffer of ``nbytes`` (kept for reuse from :data:`POOL_MIN` bytes on); its contents are undefined."""
        return self._take(nbytes) if nbytes >= POOL_MIN else bytearray(nbytes)

    def empty(self, shape: tuple[int, ...], dtype: DType) -> torch.Tensor:
        """An uninitialised tensor (pooled from :data:`POOL_MIN` bytes on)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < POOL_MIN:
            return torch.empty(shape, dtype=to_torch(dtype))
        return torch.frombuffer(self._take(nbytes), dtype=torch.uint8).view(to_torch(dtype)).reshape(shape)

    def held_bytes(self) -> int:
        """Bytes the pool keeps (in use or idle)."""
        with self._lock:
            return sum(len(b) for bucket in self._buffers.values() for b in bucket)

    def clear(self) -> None:
        """Forget every kept buffer (those still in use live on until their tensors go)."""
        with self._lock:
            self._buffers.clear()


BUFFERS = BufferPool()


def empty(shape: tuple[int, ...], dtype: DType) -> torch.Tensor:
    """An uninitialised tensor from the process's pool."""
    return BUFFERS.empty(tuple(shape), dtype)


def contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor.contiguous()``, copying into pooled memory when a copy is needed."""
    if tensor.is_contiguous():
        return tensor
    out = empty(tuple(tensor.shape), tensor.dtype)
    out.copy_(tensor)
    return out


def transposed(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix.t().contiguous()`` into pooled memory (always a copy)."""
    out = empty((matrix.shape[1], matrix.shape[0]), matrix.dtype)
    out.copy_(matrix.t())
    return out
