"""A source missing tensors the family can take back from the original Hugging Face folder (``--assets-dir``).

Released Qwen3.5 checkpoints carry ``mtp.*`` (the multi-token-prediction head), which transformers drops on load:
a DCP saved by a training job (FSDP2 ``dcp.save`` of the model's state dict) has none. Converting it back with
``--assets-dir`` the original folder puts them back, read from that folder, so a released checkpoint is never
silently cut down. Which tensors may come back this way is the family's answer (:meth:`Family.is_mtp`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from vlconvert.dtypes import DType
from vlconvert.layouts.filebytes import FileSpan
from vlconvert.lazy import torch
from vlconvert.models.megatron_table import Src
from vlconvert.rowbytes import ByteRows
from vlconvert.sources.base import Source
from vlconvert.sources.hf import HFSource


def restorable(source: Source, assets: Path | None) -> list[str]:
    """The tensors ``source`` lacks that its family takes back from ``assets`` (an HF folder holding them)."""
    sk = source.skeleton
    if assets is None or sk is None or not any(assets.glob("*.safetensors")):
        return []
    held = set(source.names())
    wanted = [n for n in sk.hf_keys() if n not in held and sk.family.is_mtp(n)]
    if not wanted:
        return []
    original = HFSource(assets, skeleton=sk)
    try:
        there = set(original.names())
    finally:
        original.close()
    return [n for n in wanted if n in there]


class RestoredSource(Source):
    """``inner`` plus ``names`` read from the HF folder ``assets`` (everything else passed through)."""

    def __init__(self, inner: Source, assets: Path, names: list[str]):
        self.inner = inner
        self.layout, self.folder, self.skeleton = inner.layout, inner.folder, inner.skeleton
        self.dtype_from_config = inner.dtype_from_config
        self.original = HFSource(assets, skeleton=inner.skeleton)
        self.restored = set(names)
        self.notes = list(inner.notes) + [f"{len(names)} tensors the source lacks ({names[0]}, ...) taken from "
                                          f"--assets-dir '{assets}' (transformers drops them; the release has them)"]

    def _of(self, name: str) -> Source:
        return self.original if name in self.restored else self.inner

    def names(self) -> list[str]:
        held = set(self.inner.names()) | self.restored
        return [n for n in self.skeleton.tensors if n in held]

    def extra_names(self) -> list[str]:
        return self.inner.extra_names()

    def spec(self, name: str) -> tuple[tuple[int, ...], DType]:
        return self._of(name).spec(name)

    def dtype(self, src: Src) -> DType:
        return self._of(src.hf).dtype(src)

    def matrix_shape(self, src: Src) -> tuple[int, ...]:
        return self._of(src.hf).matrix_shape(src)

    def nbytes(self, name: str) -> int:
        return self._of(name).nbytes(name)

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        return self._of(src.hf).rows(src, start, stop)

    def row_span(self, src: Src, start: int, stop: int) -> FileSpan | None:
        return self._of(src.hf).row_span(src, start, stop)

    def expert_span(self, name: str, expert: int, layout: str) -> FileSpan | None:
        return self._of(name).expert_span(name, expert, layout)

    def row_bytes(self, src: Src, start: int, stop: int) -> ByteRows | None:
        return self._of(src.hf).row_bytes(src, start, stop)

    def expert_bytes(self, name: str, expert: int, layout: str) -> ByteRows | None:
        return self._of(name).expert_bytes(name, expert, layout)

    def expert(self, name: str, expert: int, layout: str) -> torch.Tensor:
        return self._of(name).expert(name, expert, layout)

    def read(self, name: str) -> torch.Tensor:
        return self._of(name).read(name)

    @functools.cached_property
    def _after_inner(self) -> int:
        """The file group after every group of the source (where restored tensors are read, in release order)."""
        return max((self.inner.location(n)[0] for n in self.inner.names()), default=-1) + 1

    def location(self, name: str) -> tuple[int, int]:
        if name in self.restored:
            return self._after_inner, self.original.location(name)[1]
        return self.inner.location(name)

    def close(self) -> None:
        self.original.close()
        self.inner.close()

    def __getattr__(self, attr: str) -> Any:
        """Anything else (``plan``, ``keys``, ``stored_layout``...) is the wrapped source's."""
        if attr in ("inner", "original", "restored"):
            raise AttributeError(attr)
        return getattr(self.inner, attr)
