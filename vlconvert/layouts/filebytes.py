"""Exact byte ranges of a file read into fresh tensor memory, shared by every format's reader."""

from __future__ import annotations

import io

import torch

from vlconvert.errors import UserError


def read_exact(f: io.BufferedReader | io.RawIOBase, start: int, nbytes: int, truncated: str) -> torch.Tensor:
    """Bytes ``start:start+nbytes`` of open file ``f`` as a fresh uint8 tensor, with plain reads (no mmap:
    resident memory stays the range's size); a file that ends early is one :class:`UserError`, ``truncated``."""
    out = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        view = memoryview(out.numpy())
        f.seek(start)
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise UserError(truncated)
            got += n
    return out
