"""What a conversion writes, as plain data, and the recipe that builds a Megatron tensor from a source.

Shared by the engine (:mod:`vlconvert.engine`) and its target modules (e.g. :mod:`vlconvert.targets_torch_dist`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlconvert import rowbytes
from vlconvert.dtypes import DType, dtype_name, element_size, to_torch
from vlconvert.layouts.filebytes import FileSpan
from vlconvert.layouts.hf import PlannedTensor
from vlconvert.lazy import torch
from vlconvert.models.megatron_table import MegatronPlan, RankTensor, Src
from vlconvert.progress import human_bytes
from vlconvert.rowbytes import ByteRows
from vlconvert.sources import Source


@dataclass(repr=False)
class PlannedFile:
    """One output file and the tensors it holds, in write order."""

    name: str  # path relative to the output folder
    tensors: list[tuple[str, tuple[int, ...], DType]]  # (name in the file, shape, dtype)

    def __repr__(self) -> str:
        return f"PlannedFile({self.name!r}, {len(self.tensors)} tensors, {human_bytes(self.nbytes)})"

    @property
    def nbytes(self) -> int:
        total = 0
        for _, shape, dtype in self.tensors:
            n = 1
            for d in shape:
                n *= d
            total += n * element_size(dtype)
        return total


@dataclass
class DCPEntry:
    """One DCP record: its key, the canonical tensor it is made of, shape, dtype and nesting."""

    key: str
    source: str
    shape: tuple[int, ...]
    dtype: DType
    nesting: tuple


@dataclass(repr=False)
class ConversionPlan:
    """What a conversion writes, as data: ``files`` for printing and checks, plus each target's recipe.
    Its repr is one short line (``print(plan)``); the files and tensors are in ``files`` and ``to_dict()``."""

    source: str
    source_layout: str
    target: str
    dtype: DType | None
    experts_layout: str | None
    files: list[PlannedFile]
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    assets: list[str] = field(default_factory=list)
    hf_shards: list[list[PlannedTensor]] = field(default_factory=list)
    dcp_files: list[tuple[str, list[DCPEntry]]] = field(default_factory=list)
    megatron: MegatronPlan | None = None
    consumer: str | None = None  # torch_dist: the framework it is written for (``--for``)
    torch_dist_extra: list[Any] = field(default_factory=list)  # torch_dist: tensors outside the Megatron plan

    @property
    def tensor_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def __repr__(self) -> str:
        tensors = sum(len(f.tensors) for f in self.files)
        extra = f", notes={len(self.notes)}" if self.notes else ""
        return (f"ConversionPlan({self.source_layout} -> {self.target}, source={self.source!r}, "
                f"{len(self.files)} files of tensors, {tensors} tensors, {human_bytes(self.tensor_bytes)}{extra})")

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-able data."""
        data: dict[str, Any] = {
            "source": self.source, "source_layout": self.source_layout, "target": self.target,
            "dtype": dtype_name(self.dtype) if self.dtype else "keep", "experts_layout": self.experts_layout,
            "bytes": self.tensor_bytes, "notes": self.notes, "missing": self.missing, "dropped": self.dropped,
            "assets": self.assets, **({"for": self.consumer} if self.consumer else {}),
            "files": [{"name": f.name, "bytes": f.nbytes, "tensors": len(f.tensors)} for f in self.files]}
        if self.megatron is not None:
            m = self.megatron
            data["megatron"] = {"tp": m.tp, "pp": m.pp, "ep": m.ep, "etp": m.etp, "spec": m.spec,
                                "experts": m.experts, "stage_layers": m.stage_layers, "vocab": m.vocab,
                                "padded_vocab": m.padded_vocab, "flags": m.training_flags()}
        return data


@dataclass(repr=False)
class Result:
    """What a run did. Its repr is one short line (``print(result)``), the plan's included."""

    output: Path
    plan: ConversionPlan
    files: int
    bytes_written: int  # bytes on disk, every file of the output
    notes: list[str]
    assets: list[str]

    def __repr__(self) -> str:
        return (f"Result(output={str(self.output)!r}, files={self.files}, written={human_bytes(self.bytes_written)}, "
                f"notes={self.notes!r}, assets={len(self.assets)}, plan={self.plan!r})")


ROW_BLOCK = 4 * 2**20  # bytes per row block: small enough that glibc reuses freed blocks (no page faults)
# Pieces (row blocks or expert matrices) held at once, counted as bytes of resident memory: 2 queued at each
# of the 2 background steps, 1 in each thread, the one produced, its transposed or cast copy and a cached
# expert make 9. Before large blocks were pooled (vlconvert/buffers.py) glibc's heap kept freed pieces and
# the measured peak was 15 blocks on the 2B and up to 30 expert matrices on the 235B slice; with the pool
# the slice peaks at about 15 (docs/benchmarks.md). 30 stays: --max-memory errs on the safe side.
IN_FLIGHT = 30
# Pieces that may wait for the hashing threads (vlconvert/hashing.py) on top of those: their queue is bounded
# to this many of the run's pieces (at most hashing.MAX_QUEUED_BYTES); ranges copied in the kernel hold none.
HASH_PIECES = 4


def out_dtype(stored: DType, dtype: DType | None) -> DType:
    return dtype if dtype is not None and stored.is_floating_point else stored


def rows_per_block(shape: tuple[int, ...], dtype: DType, block: int = ROW_BLOCK) -> int:
    """Rows of a tensor of ``shape`` that make about ``block`` bytes (at least one)."""
    row_bytes = element_size(dtype)
    for d in shape[1:]:
        row_bytes *= d
    return max(1, block // max(1, row_bytes))


def rows_as_bytes(source: Source, src: Src, start: int, stop: int, dtype: DType) -> ByteRows | None:
    """Rows ``start:stop`` of ``src`` in ``dtype`` as bytes (:meth:`Source.row_bytes`, no torch), cast between bf16,
    fp16 and fp32 by :func:`rowbytes.cast`; None when the reader must compute them or the cast is torch's."""
    if not _reachable_as_bytes(source.spec(src.hf)[1], dtype):
        return None
    return in_dtype(source.row_bytes(src, start, stop), dtype)


def expert_as_bytes(source: Source, name: str, expert: int, layout: str, dtype: DType) -> ByteRows | None:
    """One expert matrix of fused tensor ``name`` in ``layout`` and ``dtype`` as bytes, as :func:`rows_as_bytes`."""
    if not _reachable_as_bytes(source.spec(name)[1], dtype):
        return None
    return in_dtype(source.expert_bytes(name, expert, layout), dtype)


def _reachable_as_bytes(stored: DType, dtype: DType) -> bool:
    """Whether rows stored in ``stored`` can be had in ``dtype`` as bytes: the same dtype, or a byte cast."""
    return stored == dtype or rowbytes.can_cast(stored, dtype)


def in_dtype(rows: ByteRows | None, dtype: DType) -> ByteRows | None:
    """``rows`` in ``dtype`` (a byte cast where they are stored in another); None where there are none or the
    cast must be torch's (a NaN)."""
    if rows is None or rows.dtype == dtype:
        return rows
    return rowbytes.cast(rows, dtype) if rowbytes.can_cast(rows.dtype, dtype) else None


def rank_tensor_blocks(t: RankTensor, source: Source, block: int = ROW_BLOCK
                       ) -> Iterator[torch.Tensor | ByteRows | FileSpan]:
    """One Megatron rank tensor as row blocks of about ``block`` bytes: its row map (or its column block)
    executed block by block. Rows that lie verbatim in a source file come as :class:`FileSpan`; a column block and
    the vocabulary padding as :class:`ByteRows` where no dtype changes (no torch)."""
    step = rows_per_block(t.shape, t.dtype, block)
    if t.axis == 1 and t.segs[0][1] == 0 and t.segs[0][2] == source.matrix_shape(t.segs[0][0])[1]:
        yield from source_row_blocks(source, t.segs[0][0], 0, t.shape[0], t.dtype, step)  # every column: rows
        return
    if t.axis == 1:
        src, a, b = t.segs[0]
        for r in range(0, t.shape[0], step):
            end = min(t.shape[0], r + step)
            rows = rows_as_bytes(source, src, r, end, t.dtype)
            if rows is not None:  # no torch: the columns copied as bytes
                yield rowbytes.columns(rows, a, b)
            else:
                yield source.rows(src, r, end)[:, a:b].to(to_torch(t.dtype)).contiguous()
        return
    for src, a, b in t.segs:
        if src is not None:
            yield from source_row_blocks(source, src, a, b, t.dtype, step)
            continue
        for r in range(a, b, step):  # vocabulary padding
            yield rowbytes.zeros((min(b, r + step) - r, *t.shape[1:]), t.dtype)


def source_row_blocks(source: Source, src: Src, start: int, stop: int, dtype: DType, step: int
                      ) -> Iterator[torch.Tensor | ByteRows | FileSpan]:
    """Rows ``start:stop`` of source matrix ``src`` in ``dtype``, at most ``step`` rows a block: a
    :class:`FileSpan` for each run of rows that lies verbatim in a file, :class:`ByteRows` for rows put together
    without a value changing, tensors for the rest (a cast, a merge, a dequantization)."""
    r = start
    while r < stop:
        end = min(stop, r + step)
        span = source.row_span(src, r, end)
        if span is not None and span.dtype == dtype and span.shape[0] > 0:
            yield span
            r += span.shape[0]
            continue
        rows = rows_as_bytes(source, src, r, end, dtype)
        yield rows if rows is not None else source.rows(src, r, end).to(to_torch(dtype))
        r = end
