"""PyTorch Distributed Checkpoint (DCP) folders: metadata, streaming writes, chunk reads.

A DCP folder holds a pickled ``.metadata`` (torch's own ``Metadata`` dataclasses) and ``*.distcp``
files. Every tensor chunk is one ``torch.save`` record at a byte range of a ``.distcp`` file; FSDP2
saves one chunk per rank per tensor. This module writes records one tensor at a time (exactly what
``dcp.save`` writes, so ``dcp.load`` and ``format_utils`` read it) and reads any chunk on its own.

``.metadata`` is unpickled with an allowlist of the classes DCP stores; anything else is refused.
"""

from __future__ import annotations

import io
import os
import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from vlconvert.errors import UserError

METADATA_NAME = ".metadata"
DCP_VERSION = "1.0.0"

_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset"),
}


class _RefusedClass(pickle.UnpicklingError):
    """The metadata names a class outside the allowlist."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else (no arbitrary code from a checkpoint)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _RefusedClass(f"refusing to load {module}.{name}")


def read_dcp_metadata(folder: Path) -> Metadata:
    """Read and validate ``folder/.metadata`` with a clear error for a missing or corrupt file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"'{folder}' does not exist or is not a folder")
    path = folder / METADATA_NAME
    if not path.is_file():
        hint = " (it looks like a Hugging Face folder: use hf-to-dcp)" if any(folder.glob("*.safetensors")) else ""
        raise UserError(f"'{folder}' is not a DCP checkpoint: no .metadata file{hint}")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except _RefusedClass as exc:
        raise UserError(f"'{path}' holds something other than DCP metadata: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a truncated pickle raises EOFError, ValueError, ...
        raise UserError(f"'{path}' is corrupt or truncated ({type(exc).__name__})") from exc
    if not isinstance(metadata, Metadata):
        raise UserError(f"'{path}' is not DCP metadata")
    return metadata


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: where it sits in the global tensor and in which file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    start: int
    length: int


@dataclass(frozen=True)
class DCPTensor:
    """A tensor entry of a DCP checkpoint (global shape, stored dtype, chunks)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


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


class DCPReader:
    """Lazy access to the tensors of a DCP folder; chunk data is read only when asked for."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.metadata = read_dcp_metadata(self.folder)
        self.tensors: dict[str, DCPTensor] = {}
        self.non_tensors: list[str] = []
        storage = self.metadata.storage_data or {}
        by_fqn: dict[str, list[tuple[MetadataIndex, _StorageInfo]]] = {}
        for index, info in storage.items():
            by_fqn.setdefault(index.fqn, []).append((index, info))
        sizes: dict[Path, int] = {}
        for key, entry in self.metadata.state_dict_metadata.items():
            if isinstance(entry, BytesStorageMetadata):
                self.non_tensors.append(key)
                continue
            stored = {tuple(i.offset or ()): s for i, s in by_fqn.get(key, [])}
            chunks = []
            for meta in entry.chunks:
                offsets = tuple(meta.offsets)
                info = stored.get(offsets)
                if info is None:
                    raise UserError(f"'{self.folder}/.metadata' lists a chunk of '{key}' at {list(offsets)} "
                                    "with no storage entry: the checkpoint is incomplete")
                path = self.folder / info.relative_path
                if path not in sizes:
                    if not path.is_file():
                        raise UserError(f"missing DCP data file '{path}'")
                    sizes[path] = path.stat().st_size
                if info.offset + info.length > sizes[path]:
                    raise UserError(f"'{path}' is truncated: '{key}' needs bytes up to "
                                    f"{info.offset + info.length}, the file has {sizes[path]}")
                if getattr(info, "transform_descriptors", None):
                    raise UserError(f"'{key}' is stored with transforms {info.transform_descriptors}, "
                                    "which vlconvert does not read")
                chunks.append(Chunk(offsets, tuple(meta.sizes), path, info.offset, info.length))
            self.tensors[key] = DCPTensor(key, tuple(entry.size), entry.properties.dtype, tuple(chunks))
        self._files: dict[Path, io.BufferedReader] = {}

    @property
    def planner_data(self) -> dict:
        return self.metadata.planner_data or {}

    def read_chunk(self, chunk: Chunk) -> torch.Tensor:
        """Load one chunk (a ``torch.save`` record) with ``weights_only=True``."""
        f = self._files.get(chunk.file)
        if f is None:
            f = self._files[chunk.file] = open(chunk.file, "rb")  # noqa: SIM115 - closed in close()
        try:
            tensor = torch.load(_FileWindow(f, chunk.start, chunk.length), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - corrupt zip records raise RuntimeError, pickle errors...
            raise UserError(f"'{chunk.file}' is corrupt at byte {chunk.start}: cannot read a tensor chunk") from exc
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"'{chunk.file}' at byte {chunk.start} does not hold a tensor")
        if tuple(tensor.shape) != chunk.sizes:
            raise UserError(f"'{chunk.file}' at byte {chunk.start} holds shape {list(tensor.shape)}, "
                            f".metadata says {list(chunk.sizes)}: the checkpoint is inconsistent")
        return tensor

    def read(self, key: str) -> torch.Tensor:
        """Assemble the whole tensor ``key`` from its chunks."""
        entry = self.tensors[key]
        if len(entry.chunks) == 1 and entry.chunks[0].sizes == entry.shape:
            return self.read_chunk(entry.chunks[0])
        out = torch.empty(entry.shape, dtype=entry.dtype)
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


def is_row_slab(chunk: Chunk, shape: tuple[int, ...]) -> bool:
    """True when a chunk spans every dim but the first in full (an FSDP2 ``Shard(0)`` piece)."""
    return len(shape) >= 1 and all(o == 0 for o in chunk.offsets[1:]) and chunk.sizes[1:] == shape[1:]


class DCPWriter:
    """Write a single-process DCP one tensor at a time: ``torch.save`` records plus ``.metadata``.

    Keys are written as given; ``nesting`` maps a key to its path in the nested state dict (DCP's
    ``planner_data``), e.g. ``"model.x.weight" -> ("model", "x.weight")``.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.state_dict_metadata: dict[str, TensorStorageMetadata] = {}
        self.storage_data: dict[MetadataIndex, _StorageInfo] = {}
        self.planner_data: dict[str, tuple] = {}
        self._file = None
        self._file_name = ""
        self.files: list[str] = []

    def open_file(self, name: str) -> None:
        """Start a new ``.distcp`` data file; later tensors go into it."""
        self._close_file()
        self._file_name = name
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _close_file
        self.files.append(name)

    def write(self, key: str, tensor: torch.Tensor, nesting: tuple | None = None) -> int:
        """Append ``tensor`` as the single chunk of ``key``; return the record's length in bytes."""
        if self._file is None:
            raise RuntimeError("open_file() first")
        if key in self.state_dict_metadata:
            raise ValueError(f"duplicate key {key}")
        tensor = tensor.detach().contiguous()
        start = self._file.tell()
        # CRC32 of every record costs ~10x the write itself; torch.load and dcp.load do not need it
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(tensor, self._file)
        finally:
            torch.serialization.set_crc32_options(crc)
        length = self._file.tell() - start
        zeros = torch.Size([0] * tensor.dim())
        self.state_dict_metadata[key] = TensorStorageMetadata(
            properties=TensorProperties.create_from_tensor(tensor), size=tensor.size(),
            chunks=[ChunkStorageMetadata(offsets=zeros, sizes=tensor.size())])
        self.storage_data[MetadataIndex(key, zeros, 0)] = _StorageInfo(self._file_name, start, length)
        self.planner_data[key] = nesting or (key,)
        return length

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Close the data file and write ``.metadata`` (last, so an interrupted write has none)."""
        self._close_file()
        metadata = Metadata(state_dict_metadata=self.state_dict_metadata, planner_data=self.planner_data,
                            storage_data=self.storage_data,
                            storage_meta=StorageMeta(checkpoint_id=None, save_id=str(uuid.uuid4())),
                            version=DCP_VERSION)
        tmp = self.folder / (METADATA_NAME + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(metadata, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(self.folder / METADATA_NAME)
