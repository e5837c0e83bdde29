"""PyTorch Distributed Checkpoint (DCP) folders: metadata, streaming writes, chunk reads.

A DCP folder holds a pickled ``.metadata`` (torch's own ``Metadata`` dataclasses) and ``*.distcp``
files. Every tensor chunk is one ``torch.save`` record at a byte range of a ``.distcp`` file; FSDP2
saves one chunk per rank per tensor. This module writes records one tensor at a time (exactly what
``dcp.save`` writes, so ``dcp.load`` and ``format_utils`` read it) and reads any chunk on its own.

``.metadata`` is written and read through :mod:`vlconvert.layouts.dcp_pickle` (stand-ins for torch's
classes, the same bytes, no ``import torch.distributed.checkpoint``): unpickled with an allowlist of the
classes DCP stores; anything else is refused.
"""

from __future__ import annotations

import io
import math
import struct
import sys
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlconvert.dtypes import DType, as_dtype, element_size, is_torch_dtype, to_torch
from vlconvert.errors import UserError
from vlconvert.errors import is_int as _is_int
from vlconvert.errors import one_line as _one_line
from vlconvert.layouts import dcp_classes, dcp_pickle
from vlconvert.layouts.filebytes import FileSpan, read_bytes, read_exact
from vlconvert.layouts.megatron import (
    STORABLE_DTYPES,
    LazyTensor,
    check_pickle,
    restricted_load,
    write_torch_record,
)
from vlconvert.layouts.torch_names import Size
from vlconvert.lazy import torch
from vlconvert.publish import OutputFile, create_file, forget_kept, kept_state, note_input, open_input

METADATA_NAME = ".metadata"
_MAX_RECORD_PKL = 2**20  # a one-tensor record's data.pkl is a few hundred bytes
DCP_VERSION = "1.0.0"
_DTYPES = {str(d): d for d in STORABLE_DTYPES}  # as a --resume journal names them: "torch.bfloat16"

_MAX_DIM = 2**62  # far above any real dimension; keeps every product inside torch's int64
_MAX_METADATA = 2**30


def _dims(value: object) -> tuple[int, ...] | None:
    """``value`` as a tuple of non-negative ints (a shape or offsets), or None when it is not one."""
    if not isinstance(value, (tuple, list)):  # torch.Size is a tuple
        return None
    out = tuple(value)
    return out if all(_is_int(v) and 0 <= v < _MAX_DIM for v in out) else None


def _is_file_name(name: object) -> bool:
    """A plain file name: no folder part, no ``..``, not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and not Path(name).is_absolute())


def _check_tensor_entry(path: Path, key: str, entry: dcp_classes.TensorStorageMetadata) -> None:
    """Size, dtype and chunk boxes of one tensor entry of ``.metadata``."""
    where = f"'{path}' is corrupt: '{_one_line(key, 80)}'"
    size = _dims(getattr(entry, "size", None))
    if size is None:
        raise UserError(f"{where} has a bad size {_one_line(getattr(entry, 'size', None), 60)}")
    if math.prod(max(d, 1) for d in size) >= _MAX_DIM:
        raise UserError(f"{where} has a size too large to exist: {list(size)}")
    props = getattr(entry, "properties", None)
    dtype = getattr(props, "dtype", None)
    if not isinstance(props, dcp_classes.TensorProperties) or not (isinstance(dtype, DType) or is_torch_dtype(dtype)):
        raise UserError(f"{where} has no valid dtype ({_one_line(dtype, 40)})")
    try:
        element_size(dtype)
    except Exception as exc:  # noqa: BLE001 - quantized and other storage-less dtypes cannot be read
        raise UserError(f"{where} has dtype {dtype}, which vlconvert cannot read") from exc
    chunks = getattr(entry, "chunks", None)
    if not isinstance(chunks, list):
        raise UserError(f"{where} has chunks that are not a list")
    for chunk in chunks:
        if not isinstance(chunk, dcp_classes.ChunkStorageMetadata):
            raise UserError(f"{where} has a chunk that is not ChunkStorageMetadata")
        offsets, sizes = _dims(getattr(chunk, "offsets", None)), _dims(getattr(chunk, "sizes", None))
        if offsets is None or sizes is None or len(offsets) != len(size) or len(sizes) != len(size):
            raise UserError(f"{where} has a chunk with bad offsets/sizes "
                            f"{_one_line(getattr(chunk, 'offsets', None), 40)} / "
                            f"{_one_line(getattr(chunk, 'sizes', None), 40)} for size {list(size)}")
        if 0 not in sizes and any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
            raise UserError(f"{where} has a chunk at {list(offsets)} of {list(sizes)} outside its size {list(size)}")


def _check_metadata(path: Path, metadata: dcp_classes.Metadata) -> None:
    """The types and bounds of everything DCPReader uses from an unpickled ``.metadata``."""
    sdm = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(sdm, dict):
        raise UserError(f"'{path}' is corrupt: state_dict_metadata is not a dict")
    for key, entry in sdm.items():
        if not isinstance(key, str):
            raise UserError(f"'{path}' is corrupt: a state_dict_metadata key is not a string "
                            f"({_one_line(key, 40, quote=True)})")
        if isinstance(entry, dcp_classes.TensorStorageMetadata):
            _check_tensor_entry(path, key, entry)
        elif not isinstance(entry, dcp_classes.BytesStorageMetadata):
            raise UserError(f"'{path}' is corrupt: '{_one_line(key, 80)}' is neither tensor nor bytes metadata")
    storage = getattr(metadata, "storage_data", None)
    if storage is not None and not isinstance(storage, dict):
        raise UserError(f"'{path}' is corrupt: storage_data is not a dict")
    for index, info in (storage or {}).items():
        fqn, offset = getattr(index, "fqn", None), getattr(index, "offset", None)
        if not isinstance(index, dcp_classes.MetadataIndex) or not isinstance(fqn, str) or (
                offset is not None and _dims(offset) is None):
            raise UserError(f"'{path}' is corrupt: a storage_data key is not a valid MetadataIndex")
        if not isinstance(info, dcp_classes._StorageInfo):
            raise UserError(f"'{path}' is corrupt: storage entry of '{_one_line(fqn, 80)}' is not _StorageInfo")
        rel = getattr(info, "relative_path", None)
        if not _is_file_name(rel):
            raise UserError(f"'{path}' is corrupt: storage entry of '{_one_line(fqn, 80)}' names the file "
                            f"{_one_line(rel, 80, quote=True)}, which is not a file name inside the checkpoint folder")
        start, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (_is_int(start) and _is_int(length) and start >= 0 and length >= 0):
            raise UserError(f"'{path}' is corrupt: storage entry of '{_one_line(fqn, 80)}' has offset "
                            f"{_one_line(start, 30)} and length {_one_line(length, 30)}")
    planner = getattr(metadata, "planner_data", None)
    if planner is not None and not isinstance(planner, dict):
        raise UserError(f"'{path}' is corrupt: planner_data is not a dict")


def read_dcp_metadata(folder: Path) -> dcp_classes.Metadata:
    """Read and validate ``folder/.metadata`` with a clear error for a missing or corrupt file.

    The pickle is read through an allowlist, then every field DCPReader uses is type- and bound-checked.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"'{folder}' does not exist or is not a folder")
    path = folder / METADATA_NAME
    if not path.is_file():
        hint = " (it looks like a Hugging Face folder: use hf-to-dcp)" if any(folder.glob("*.safetensors")) else ""
        raise UserError(f"'{folder}' is not a DCP checkpoint: no .metadata file{hint}")
    try:
        if path.stat().st_size > _MAX_METADATA:
            raise UserError(f"'{path}' is corrupt: larger than {_MAX_METADATA // 2**20} MiB")
        raw = note_input(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    try:
        check_pickle(raw)
        metadata = dcp_pickle.loads(raw)
    except dcp_pickle.RefusedClass as exc:
        raise UserError(f"'{path}' holds something other than DCP metadata: {_one_line(exc, 120)}") from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt pickle raises EOFError, ValueError, RuntimeError...
        raise UserError(f"'{path}' is corrupt or truncated ({type(exc).__name__}: {_one_line(exc, 80)})") from exc
    if not isinstance(metadata, dcp_classes.Metadata):
        raise UserError(f"'{path}' is not DCP metadata")
    _check_metadata(path, metadata)
    return metadata


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: where it sits in the global tensor and in which file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    start: int
    length: int
    dtype: DType | None = None  # when set, read_chunk checks the record holds this dtype


@dataclass(frozen=True)
class DCPTensor:
    """A tensor entry of a DCP checkpoint (global shape, stored dtype, chunks)."""

    key: str
    shape: tuple[int, ...]
    dtype: DType
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * element_size(self.dtype)


class _FileWindow(io.RawIOBase):
    """A read-only, seekable view of bytes ``[start, start+length)`` of an open file."""

    def __init__(self, f, start: int, length: int):
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


def _check_record(f: io.BufferedReader, chunk: Chunk) -> list[zipfile.ZipInfo]:
    """A chunk's record must be a torch zip whose entries are stored, each within the record's bytes
    (torch.load would inflate a deflated entry to whatever size its directory claims); its entries."""
    where = f"'{chunk.file}' is corrupt at byte {chunk.start}"
    window = _FileWindow(f, chunk.start, chunk.length)
    if window.read(4) != b"PK\x03\x04":
        raise UserError(f"{where}: not a torch.save record")
    try:
        with zipfile.ZipFile(window) as zf:
            entries = zf.infolist()
    except Exception as exc:  # noqa: BLE001 - BadZipFile, struct.error, ValueError...: all mean corrupt
        raise UserError(f"{where}: the record is not a readable zip ({_one_line(exc, 60)})") from exc
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size > chunk.length:
            raise UserError(f"{where}: record entry '{_one_line(entry.filename, 60)}' is compressed or larger "
                            "than the record")
    return entries


class DCPReader:
    """Lazy access to the tensors of a DCP folder; chunk data is read only when asked for.

    Opening checks that every chunk has a storage record inside a data file of the folder, large enough
    for the chunk, and that the chunks of each tensor tile it exactly (no gap, no overlap).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.metadata = read_dcp_metadata(self.folder)
        meta_path = self.folder / METADATA_NAME
        self.tensors: dict[str, DCPTensor] = {}
        self.non_tensors: list[str] = []
        storage = self.metadata.storage_data or {}
        by_fqn: dict[str, list[tuple[dcp_classes.MetadataIndex, dcp_classes._StorageInfo]]] = {}
        for index, info in storage.items():
            by_fqn.setdefault(index.fqn, []).append((index, info))
        sizes: dict[str, int] = {}
        for key, entry in self.metadata.state_dict_metadata.items():
            if isinstance(entry, dcp_classes.BytesStorageMetadata):
                self.non_tensors.append(key)
                continue
            stored = {tuple(i.offset or ()): s for i, s in by_fqn.get(key, [])}
            dtype = entry.properties.dtype
            itemsize = element_size(dtype)
            chunks = []
            for meta in entry.chunks:
                offsets = tuple(meta.offsets)
                info = stored.get(offsets)
                if info is None:
                    raise UserError(f"'{meta_path}' lists a chunk of '{_one_line(key, 80)}' at {list(offsets)} "
                                    "with no storage entry: the checkpoint is incomplete")
                path = self.folder / info.relative_path
                if info.relative_path not in sizes:
                    sizes[info.relative_path] = self._data_file_size(path)
                if info.offset + info.length > sizes[info.relative_path]:
                    raise UserError(f"'{path}' is truncated: '{_one_line(key, 80)}' needs bytes up to "
                                    f"{info.offset + info.length}, the file has {sizes[info.relative_path]}")
                if getattr(info, "transform_descriptors", None):
                    raise UserError(f"'{meta_path}': '{_one_line(key, 80)}' is stored with transforms "
                                    f"{_one_line(info.transform_descriptors, 60)}, which vlconvert does not read")
                needed = math.prod(meta.sizes) * itemsize
                if needed > info.length:
                    raise UserError(f"'{meta_path}' is corrupt: a chunk of '{_one_line(key, 80)}' needs {needed} "
                                    f"bytes, its record in '{path}' holds {info.length}")
                chunks.append(Chunk(offsets, tuple(meta.sizes), path, info.offset, info.length, dtype))
            _check_tiling(meta_path, key, tuple(entry.size), chunks)
            self.tensors[key] = DCPTensor(key, tuple(entry.size), dtype, tuple(chunks))
        self._files: dict[Path, io.BufferedReader] = {}
        self._records: dict[Chunk, tuple[int, LazyTensor] | None] = {}
        self._whole: tuple[Chunk, torch.Tensor] | None = None

    def _data_file_size(self, path: Path) -> int:
        """The size of a data file, refusing one missing or linked from outside the folder."""
        if not path.is_file():
            raise UserError(f"missing DCP data file '{path}'")
        target = path.resolve()
        if not target.is_relative_to(self.folder.resolve()):
            raise UserError(f"'{path}' links to '{target}', outside the checkpoint folder: refusing to read it")
        return note_input(path).stat().st_size

    @property
    def planner_data(self) -> dict:
        return self.metadata.planner_data or {}

    def read_bytes_entry(self, key: str, limit: int) -> bytes | None:
        """The raw bytes of byte entry ``key`` (a ``BytesIO`` value DCP stored), None if absent or over
        ``limit`` bytes or outside a data file of this folder."""
        if key not in self.non_tensors:
            return None
        info = (self.metadata.storage_data or {}).get(dcp_classes.MetadataIndex(key))
        if info is None or info.length > limit or getattr(info, "transform_descriptors", None):
            return None
        path = self.folder / info.relative_path
        try:
            if info.offset + info.length > self._data_file_size(path):
                return None
            with open_input(path) as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except (OSError, UserError):
            return None
        return data if len(data) == info.length else None

    def _open(self, chunk: Chunk) -> io.BufferedReader:
        f = self._files.get(chunk.file)
        if f is None:
            try:
                f = self._files[chunk.file] = open_input(chunk.file)
            except OSError as exc:
                raise UserError(f"cannot read '{chunk.file}': {exc.strerror or exc}") from exc
        return f

    def _record(self, chunk: Chunk) -> tuple[int, LazyTensor] | None:
        """(absolute offset of its storage bytes, its tensor) of a chunk whose record holds one contiguous
        tensor, read from the record's zip directory and ``data.pkl`` only; None for any other record."""
        if chunk not in self._records:
            f = self._open(chunk)
            self._records[chunk] = self._locate(f, chunk, _check_record(f, chunk))
        return self._records[chunk]

    def _locate(self, f: io.BufferedReader, chunk: Chunk, infos: list[zipfile.ZipInfo]
                ) -> tuple[int, LazyTensor] | None:
        where = f"'{chunk.file}' is corrupt at byte {chunk.start}"
        pkl = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if len(pkl) != 1 or pkl[0].file_size > _MAX_RECORD_PKL:
            return None
        raw = read_bytes(f, self._entry_start(f, chunk, pkl[0], where), pkl[0].file_size, f"{where}: it ends early")
        tensor = restricted_load(raw, where)
        if not (isinstance(tensor, LazyTensor) and tensor.dtype == chunk.dtype and tensor.shape == chunk.sizes
                and len(tensor.stride) == len(tensor.shape) and tensor.offset >= 0 and tensor.contiguous):
            return None  # read whole by torch.load, which checks the rest
        prefix = pkl[0].filename[:-len("data.pkl")]
        data = next((i for i in infos if i.filename == f"{prefix}data/{tensor.key}"), None)
        size = element_size(tensor.dtype)
        if data is None or (tensor.offset + math.prod(tensor.shape)) * size > data.file_size:
            return None
        return self._entry_start(f, chunk, data, where) + tensor.offset * size, tensor

    @staticmethod
    def _entry_start(f: io.BufferedReader, chunk: Chunk, info: zipfile.ZipInfo, where: str) -> int:
        """Absolute file offset of a stored entry's bytes, from its local header (checked to fit the record)."""
        f.seek(chunk.start + info.header_offset)
        header = f.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise UserError(f"{where}: no zip header for record entry '{_one_line(info.filename, 60)}'")
        n, m = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + n + m
        if start + info.file_size > chunk.length:
            raise UserError(f"{where}: record entry '{_one_line(info.filename, 60)}' ends past the record")
        return chunk.start + start

    def read_chunk_rows(self, chunk: Chunk, start: int, stop: int, index: tuple[int, ...] = ()) -> torch.Tensor:
        """``chunk[index][start:stop]`` (chunk-local coordinates): only those bytes are read when the record
        holds one contiguous tensor (what ``dcp.save`` and vlconvert write); any other record is loaded whole
        once and kept until another one is needed."""
        span = self._chunk_span(chunk, start, stop, index)
        if span is None:
            if self._whole is None or self._whole[0] != chunk:
                self._whole = None  # drop the previous record before loading the next
                self._whole = (chunk, self.read_chunk(chunk))
            return self._whole[1][index][start:stop]
        raw = read_exact(self._open(chunk), span.offset, span.nbytes,
                         f"'{chunk.file}' is truncated: a record at byte {chunk.start} ends early")
        return raw.view(to_torch(span.dtype)).reshape(span.shape)

    def _chunk_span(self, chunk: Chunk, start: int, stop: int, index: tuple[int, ...]) -> FileSpan | None:
        """Where ``chunk[index][start:stop]`` (chunk-local) lies in the record's storage, when the record
        holds one contiguous tensor; else None."""
        k = len(index)
        found = self._record(chunk) if len(chunk.sizes) > k else None
        if found is None:
            return None
        offset, tensor = found
        first = 0
        for i, d in enumerate(index):
            first = first * chunk.sizes[i] + d
        first = first * chunk.sizes[k] + start  # the row's place among rows of chunk.sizes[k + 1:]
        rest = tuple(chunk.sizes[k + 1:])
        row_bytes = math.prod(rest) * element_size(tensor.dtype)
        return FileSpan(Path(chunk.file), offset + first * row_bytes, (stop - start, *rest), tensor.dtype)

    def span(self, key: str, start: int, stop: int, index: tuple[int, ...] = ()) -> FileSpan | None:
        """Where ``tensor[index][start:...]`` of ``key`` lies verbatim in one record: up to row ``stop``
        or the end of the chunk holding row ``start``; None when that chunk holds part of each row or
        its record is not one contiguous tensor."""
        entry = self.tensors[key]
        k = len(index)
        for chunk in entry.chunks:
            if 0 in chunk.sizes or not all(o <= i < o + n for i, o, n in zip((*index, start), chunk.offsets,
                                                                              chunk.sizes, strict=False)):
                continue
            if tuple(chunk.sizes[k + 1:]) != tuple(entry.shape[k + 1:]):
                return None
            stop = min(stop, chunk.offsets[k] + chunk.sizes[k])
            local = tuple(i - o for i, o in zip(index, chunk.offsets, strict=False))
            return self._chunk_span(chunk, start - chunk.offsets[k], stop - chunk.offsets[k], local)
        return None

    def read_rows(self, key: str, start: int, stop: int, index: tuple[int, ...] = ()) -> torch.Tensor:
        """``tensor[index][start:stop]`` of tensor ``key``, reading only the rows of the chunks it overlaps."""
        entry = self.tensors[key]
        k = len(index)
        out = torch.empty((stop - start, *entry.shape[k + 1:]), dtype=to_torch(entry.dtype))
        covered = 0
        for chunk in entry.chunks:
            if 0 in chunk.sizes or not all(o <= i < o + n for i, o, n in zip(index, chunk.offsets, chunk.sizes,
                                                                              strict=False)):
                continue
            lo, hi = max(start, chunk.offsets[k]), min(stop, chunk.offsets[k] + chunk.sizes[k])
            if lo < hi:
                local = tuple(i - o for i, o in zip(index, chunk.offsets, strict=False))
                part = self.read_chunk_rows(chunk, lo - chunk.offsets[k], hi - chunk.offsets[k], local)
                region = (slice(lo - start, hi - start),
                          *(slice(o, o + n) for o, n in zip(chunk.offsets[k + 1:], chunk.sizes[k + 1:], strict=True)))
                out[region] = part
                covered += part.numel()
        if covered != out.numel():
            raise UserError(f"'{self.folder}': the chunks of '{_one_line(key, 80)}' do not cover rows "
                            f"{start}:{stop} of index {list(index)}")
        return out

    def read_chunk(self, chunk: Chunk) -> torch.Tensor:
        """Load one chunk (a ``torch.save`` record) with ``weights_only=True``."""
        f = self._open(chunk)
        _check_record(f, chunk)
        try:
            tensor = torch.load(_FileWindow(f, chunk.start, chunk.length), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - corrupt zip records raise RuntimeError, pickle errors...
            raise UserError(f"'{chunk.file}' is corrupt at byte {chunk.start}: cannot read a tensor chunk") from exc
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"'{chunk.file}' at byte {chunk.start} does not hold a tensor")
        if tuple(tensor.shape) != chunk.sizes:
            raise UserError(f"'{chunk.file}' at byte {chunk.start} holds shape {list(tensor.shape)}, "
                            f".metadata says {list(chunk.sizes)}: the checkpoint is inconsistent")
        if chunk.dtype is not None and tensor.dtype != chunk.dtype:
            raise UserError(f"'{chunk.file}' at byte {chunk.start} holds {tensor.dtype}, "
                            f".metadata says {chunk.dtype}: the checkpoint is inconsistent")
        return tensor

    def read(self, key: str) -> torch.Tensor:
        """Assemble the whole tensor ``key`` from its chunks."""
        entry = self.tensors[key]
        if len(entry.chunks) == 1 and entry.chunks[0].sizes == entry.shape:
            return self.read_chunk(entry.chunks[0])
        out = torch.empty(entry.shape, dtype=to_torch(entry.dtype))
        for chunk in entry.chunks:
            if 0 in chunk.sizes:
                continue
            region = out[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))]
            region.copy_(self.read_chunk(chunk))
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._whole = None


def is_row_slab(chunk: Chunk, shape: tuple[int, ...]) -> bool:
    """True when a chunk spans every dim but the first in full (an FSDP2 ``Shard(0)`` piece)."""
    return len(shape) >= 1 and all(o == 0 for o in chunk.offsets[1:]) and chunk.sizes[1:] == shape[1:]


def _check_tiling(meta_path: Path, key: str, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
    """The chunks of one tensor cover it exactly: as many elements as the tensor, none twice."""
    boxes = [c for c in chunks if 0 not in c.sizes]
    covered = sum(math.prod(c.sizes) for c in boxes)
    total = math.prod(shape)
    problem = f"its chunks cover {covered} of its {total} elements" if covered != total else None
    if problem is None and len(boxes) > 1:
        if all(is_row_slab(c, shape) for c in boxes):
            spans = sorted((c.offsets[0], c.offsets[0] + c.sizes[0]) for c in boxes)
            overlap = any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))
        else:  # boxes (FSDP2 with 2-D meshes, megatron-core's dist_checkpointing) are checked pairwise
            import numpy  # 0.1 s: only here

            lo = numpy.array([c.offsets for c in boxes], dtype=numpy.int64)
            hi = lo + numpy.array([c.sizes for c in boxes], dtype=numpy.int64)
            overlap = False
            for i in range(0, len(boxes), 128):  # pairwise box intersection, 128 rows at a time
                inter = (numpy.maximum(lo[i:i + 128, None], lo[None]) < numpy.minimum(hi[i:i + 128, None], hi[None]))
                hits = inter.all(-1)
                hits[numpy.arange(hits.shape[0]), numpy.arange(i, i + hits.shape[0])] = False
                overlap = overlap or bool(hits.any())
        problem = "two of its chunks overlap" if overlap else None
    if problem:
        raise UserError(f"'{meta_path}' is corrupt: '{_one_line(key, 80)}' of size {list(shape)}: {problem}")


@dataclass
class TensorBlocks:
    """A tensor given as its shape, dtype and row blocks in order (so it is never whole in memory)."""

    shape: tuple[int, ...]
    dtype: DType
    blocks: Iterable[torch.Tensor]


def _record_is_archive(f, start: int, length: int) -> bool:
    """Bytes ``start:start+length`` of ``f`` are one whole stored zip archive (as :func:`write_torch_record`
    writes): a local header first, the end record last, the central directory right before it."""
    if length < 22 + 30:
        return False
    f.seek(start)
    if f.read(4) != b"PK\x03\x04":
        return False
    f.seek(start + length - 22)
    end = f.read(22)
    if len(end) != 22 or end[:4] != b"PK\x05\x06" or struct.unpack("<H", end[20:22])[0] != 0:
        return False
    cd_size, cd_offset = struct.unpack("<II", end[12:20])
    locator = b""
    if length >= 22 + 20 + 56:
        f.seek(start + length - 22 - 20)
        locator = f.read(20)
    if locator[:4] == b"PK\x06\x07" or cd_offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
        # zip64 (torch.save writes its end records even for small archives): the locator points at them
        if locator[:4] != b"PK\x06\x07":
            return False
        (end64,) = struct.unpack("<Q", locator[8:16])
        if end64 != length - 22 - 20 - 56:
            return False
        f.seek(start + end64)
        record = f.read(56)
        if record[:4] != b"PK\x06\x06":
            return False
        cd_size, cd_offset = struct.unpack("<QQ", record[40:56])
        return cd_offset + cd_size == end64
    return cd_offset + cd_size == length - 22


def kept_records(path: Path, state: Any, expect: list[tuple] | None) -> list[dict] | None:
    """The journaled records of a data file ``--resume`` kept, if they hold up, else None: the journal is
    an untrusted file (edited, cut, or from another version) and ``.metadata`` is built from it. Each record
    must name the planned tensor (key, shape, dtype, nesting, in plan order), start where the previous one
    ended (the first at 0, the last ending at the file's end) and be a whole archive in the kept bytes."""
    if expect is None:
        return None
    wanted = [{"key": key, "shape": list(shape), "dtype": str(dtype), "nesting": list(nesting)}
              for key, shape, dtype, nesting in expect]
    return kept_matching(path, state, wanted)


def kept_matching(path: Path, state: Any, wanted: list[dict]) -> list[dict] | None:
    """:func:`kept_records` with the planned records given as the fields each journaled record must carry
    (a ``dtype`` must also be one DCP knows); every record is one whole archive, laid end to end."""
    records = state.get("records") if isinstance(state, dict) else None
    if not isinstance(records, list) or len(records) != len(wanted):
        return None
    try:
        size = path.stat().st_size
        pos = 0
        with open(path, "rb") as f:
            for record, fields in zip(records, wanted, strict=True):
                if not isinstance(record, dict) or any(record.get(k) != v for k, v in fields.items()) \
                        or ("dtype" in fields and record.get("dtype") not in _DTYPES):
                    return None
                start, length = record.get("start"), record.get("length")
                if not (_is_int(start) and _is_int(length)) or start != pos or length <= 0 or start + length > size:
                    return None
                if not _record_is_archive(f, start, length):
                    return None
                pos = start + length
    except OSError:
        return None
    return records if pos == size else None


class DCPWriter:
    """Write a single-process DCP one tensor at a time: ``torch.save`` records plus ``.metadata``.

    Keys are written as given; ``nesting`` maps a key to its path in the nested state dict (DCP's
    ``planner_data``), e.g. ``"model.x.weight" -> ("model", "x.weight")``. Each data file journals the
    records it holds, so ``--resume`` can keep a finished file (``skipping``) and still write ``.metadata``.
    The output is deterministic: the same tensors give the same bytes, ``.metadata`` included.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.state_dict_metadata: dict[str, dcp_classes.TensorStorageMetadata] = {}
        self.storage_data: dict[dcp_classes.MetadataIndex, dcp_classes._StorageInfo] = {}
        self.planner_data: dict[str, tuple] = {}
        self._file: OutputFile | None = None
        self._file_name = ""
        self._records: list[dict] = []
        self.skipping = False  # the current file was kept by --resume: write() only checks the key
        self.files: list[str] = []

    def open_file(self, name: str, expect: list[tuple] | None = None) -> None:
        """Start a new ``.distcp`` data file; later tensors go into it. ``expect``: the (key, shape, dtype,
        nesting) of each tensor the plan puts in it, in order: a file ``--resume`` kept is skipped only if
        its journaled records are exactly those, laid end to end over the whole file, each one a complete
        archive (:func:`kept_records`); otherwise the file is written again."""
        self._close_file()
        self._file_name = name
        self.files.append(name)
        kept = kept_state(self.folder / name)
        records = self._kept_records(self.folder / name, kept, expect) if kept is not None else None
        if kept is not None and records is None:
            forget_kept(self.folder / name)
        self.skipping = records is not None
        if records is not None:
            for record in records:
                self._adopt_record(record)
            return
        self._file = create_file(self.folder / name)
        self._records = []

    def _add(self, key: str, shape: tuple[int, ...], dtype: DType, start: int, length: int,
             nesting: tuple) -> None:
        if key in self.state_dict_metadata:
            raise ValueError(f"duplicate key {key}")
        # pickle shares equal objects only when they are the same object: intern the strings so the
        # bytes of .metadata do not depend on where a key came from (a fresh write or a --resume journal)
        key = sys.intern(key)
        nesting = tuple(sys.intern(part) if isinstance(part, str) else part for part in nesting)
        size = Size(shape)
        zeros = Size([0] * len(shape))
        self.state_dict_metadata[key] = dcp_classes.TensorStorageMetadata(
            properties=dcp_classes.TensorProperties(dtype=as_dtype(dtype)), size=size,
            chunks=[dcp_classes.ChunkStorageMetadata(offsets=zeros, sizes=size)])
        index = dcp_classes.MetadataIndex(key, zeros, 0)
        self.storage_data[index] = dcp_classes._StorageInfo(self._file_name, start, length)
        self.planner_data[key] = nesting

    def write(self, key: str, tensor: torch.Tensor | TensorBlocks, nesting: tuple | None = None) -> int:
        """Append ``tensor`` (or a :class:`TensorBlocks`: shape, dtype and row blocks, streamed with one block
        in memory) as the single chunk of ``key``; return the record's length in bytes."""
        if self.skipping:
            if key not in self.state_dict_metadata:
                raise RuntimeError(f"--resume: '{key}' is not in the kept file {self._file_name}")
            return self.storage_data[dcp_classes.MetadataIndex(key, Size([0] * len(tensor.shape)), 0)].length
        if self._file is None:
            raise RuntimeError("open_file() first")
        if not isinstance(tensor, TensorBlocks):
            tensor = tensor.detach().contiguous()
            shape, dtype, data = tuple(tensor.shape), tensor.dtype, tensor
        else:
            shape, dtype, data = tuple(tensor.shape), tensor.dtype, tensor.blocks
        start = self._file.tell()
        write_torch_record(self._file, shape, dtype, data)
        length = self._file.tell() - start
        nesting = tuple(nesting or (key,))
        self._add(key, shape, dtype, start, length, nesting)
        self._records.append({"key": key, "shape": list(shape), "dtype": str(dtype),
                              "start": start, "length": length, "nesting": list(nesting)})
        return length

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.state = {"records": self._records}
            self._file.close()
            self._file = None
        self.skipping = False

    def close_file(self) -> None:
        """Finish the open data file without writing ``.metadata`` (another process writes it)."""
        self._close_file()

    def adopt(self, name: str, records: list[dict]) -> None:
        """Add the records another process wrote into data file ``name`` (for ``.metadata``)."""
        self._close_file()
        self._file_name = name
        self.files.append(name)
        for record in records:
            self._adopt_record(record)

    def _kept_records(self, path: Path, kept: Any, expect: list | None) -> list[dict] | None:
        return kept_records(path, kept, expect)

    def _adopt_record(self, record: dict) -> None:
        """Add one journaled record (from ``--resume`` or another rank) without writing it."""
        self._add(record["key"], tuple(record["shape"]), _DTYPES[record["dtype"]], record["start"],
                  record["length"], tuple(record["nesting"]))

    def abort(self) -> None:
        """Close the open data file after a failure (the caller discards the folder)."""
        if self._file is not None:
            self._file.abort()
            self._file = None

    def finish(self) -> None:
        """Close the data file and write ``.metadata`` last, with an id derived from its content."""
        self._close_file()
        table = sorted((k, str(i.offset), s.relative_path, s.offset, s.length) for i, s in self.storage_data.items()
                       for k in [i.fqn])
        save_id = str(uuid.uuid5(uuid.NAMESPACE_OID, repr(table)))
        # torch < 2.9's Metadata has no `version` field (its dcp.save writes none): make_metadata leaves it out
        metadata = dcp_classes.make_metadata(
            state_dict_metadata=self.state_dict_metadata, planner_data=self.planner_data,
            storage_data=self.storage_data, storage_meta=dcp_classes.StorageMeta(checkpoint_id=None, save_id=save_id),
            version=DCP_VERSION)
        data = dcp_pickle.dumps(metadata)  # the bytes pickle.dump gives torch's own classes
        with create_file(self.folder / METADATA_NAME) as f:
            f.write(data)
