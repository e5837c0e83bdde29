"""The :class:`Target` interface every writer implements (the mirror of :class:`~vlconvert.sources.base.Source`).

A target plans its files from the source's metadata (:meth:`Target.plan`, plain data: a
:class:`~vlconvert.plan.ConversionPlan`) and writes this process's share of them (:meth:`Target.write`),
asking the converter for the streamed bytes (``conv.blocks`` for a canonical tensor, ``conv.rank_blocks`` for a
row-mapped Megatron tensor). It never names another layout, and names no model family or tensor: those come
from ``source.skeleton.family``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from vlconvert.dtypes import DType, element_size
from vlconvert.layouts.filebytes import FileSpan, block_nbytes
from vlconvert.lazy import torch
from vlconvert.rowbytes import ByteRows

if TYPE_CHECKING:
    from vlconvert.models.megatron_table import RankTensor
    from vlconvert.plan import ConversionPlan
    from vlconvert.sources import Source


class Conversion(Protocol):
    """What a target asks of the conversion that runs it (:class:`vlconvert.engine.Converter` provides it): the
    options, the source and assets, which files this process writes, and the streamed bytes."""

    src: Any
    assets_dir: Any
    assets: Path | None
    options: dict[str, Any]
    block_bytes: int

    @property
    def source(self) -> Source: ...

    @property
    def lead(self) -> bool: ...

    @property
    def world(self) -> int: ...

    def owns(self, name: str) -> bool: ...

    def experts_layout(self, default: str) -> str: ...

    def blocks(self, name: str, layout: str, dtype: DType) -> Iterator[torch.Tensor | ByteRows | FileSpan]: ...

    def rank_blocks(self, tensor: RankTensor) -> Iterator[torch.Tensor | ByteRows | FileSpan]: ...


class Target:
    """One output layout: what it plans and how it writes. Subclass per module in ``vlconvert/targets/``.

    ``options``: the :class:`~vlconvert.engine.Converter` options that shape this layout (given to another
    target they are refused). ``allows_missing``: a partial checkpoint may be written (``--allow-missing``).
    ``distributed``: its files may be split over the ranks of ``torchrun``.
    """

    name: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset()
    allows_missing: ClassVar[bool] = False
    distributed: ClassVar[bool] = True

    def plan(self, conv: Conversion, source: Source, dtype: DType | None) -> ConversionPlan:
        """Every output file and the tensors it holds, from metadata alone."""
        raise NotImplementedError

    def write(self, conv: Conversion, stage: Path, plan: ConversionPlan, advance: Callable[[int], None]) -> list[str]:
        """Write this process's share of ``plan`` into ``stage``; returns the assets copied."""
        raise NotImplementedError

    def finish(self, conv: Conversion, stage: Path, plan: ConversionPlan, entries: dict[str, dict]) -> None:
        """On the lead rank of ``torchrun``, after every rank wrote its files: what needs all of them."""

    def extra_bytes(self, conv: Conversion, source: Source) -> int:
        """Bytes written besides the plan's tensors (copied assets), for the free-space check."""
        return 0


def counted(blocks: Iterator[torch.Tensor | ByteRows | FileSpan], advance: Callable[[int], None]
            ) -> Iterator[torch.Tensor | ByteRows | FileSpan]:
    """Pass ``blocks`` through, advancing the progress bar by each block's bytes as it is written."""
    for block in blocks:
        yield block
        advance(block_nbytes(block))


def nbytes(shape: tuple[int, ...], dtype: DType) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    n = element_size(dtype)
    for d in shape:
        n *= d
    return n
