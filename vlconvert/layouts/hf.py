"""Hugging Face safetensors folders: headers, indexes, streaming reads and streaming writes.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {dtype, shape, data_offsets}}``), then raw bytes. Headers are parsed here without touching
tensor data, so a whole checkpoint can be planned from its metadata and read one tensor at a time.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vlconvert import rowbytes
from vlconvert.dtypes import SAFETENSORS, DType, dtype_name, element_size, safetensors_code, to_torch
from vlconvert.errors import UsageError, UserError
from vlconvert.errors import is_int as _is_int
from vlconvert.errors import one_line as _one_line
from vlconvert.layouts.filebytes import FileSpan, block_buffer, read_exact
from vlconvert.lazy import torch
from vlconvert.locate import resolve_source
from vlconvert.publish import (
    MANIFEST_NAME,
    check_inside,
    copy_file,
    create_file,
    kept_state,
    note_input,
    open_input,
    write_bytes,
)
from vlconvert.rowbytes import ByteRows

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives on disk and what it is."""

    name: str
    file: Path
    dtype: DType
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in ``file``
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


_MAX_DIM = 2**62  # any real dimension is far below; keeps every product inside torch's int64


def _parse_json_bytes(raw: bytes, path: Path, what: str) -> object:
    """``json.loads`` with every way it can fail turned into one UserError naming ``path``."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise UserError(f"'{path}' is corrupt: its {what} is not valid UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}' is corrupt: its {what} is not valid JSON (byte {exc.pos}: {exc.msg})") from exc
    except RecursionError as exc:
        raise UserError(f"'{path}' is corrupt: its {what} is nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer literal longer than Python converts
        raise UserError(f"'{path}' is corrupt: its {what} is not usable JSON ({_one_line(exc, 80)})") from exc


def _header_entry(path: Path, name: str, entry: object) -> tuple[DType, tuple[int, ...], int, int]:
    """Validate one safetensors header entry; return (dtype, shape, begin, end)."""
    where = f"'{path}' is corrupt: header entry '{_one_line(name, 80)}'"
    if not isinstance(entry, dict):
        raise UserError(f"{where} is not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise UserError(f"{where} has no '{missing[0]}'")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS:
        raise UserError(f"{where} has an unknown dtype {_one_line(dtype_name, 40, quote=True)}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < _MAX_DIM for d in shape):
        raise UserError(f"{where} has a bad shape {_one_line(shape, 60)}: "
                        "expected a list of non-negative integers")
    if math.prod(max(d, 1) for d in shape) >= _MAX_DIM:
        raise UserError(f"{where} has a shape too large to exist: {_one_line(shape, 60)}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) for x in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise UserError(f"{where} has bad data_offsets {_one_line(offsets, 60)}: "
                        "expected [begin, end] with 0 <= begin <= end")
    return SAFETENSORS[dtype_name], tuple(shape), offsets[0], offsets[1]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors header; return its tensors and its ``__metadata__``.

    Raises UserError for a truncated or corrupt file: bad length, bad JSON, bad entries, tensors that
    overlap, leave gaps or reach past the end (the rules of the safetensors library itself).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open_input(path) as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise UserError(f"'{path}' is truncated or not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise UserError(f"'{path}' is truncated or corrupt: header length {header_len} "
                                f"does not fit the file size {size}")
            raw = f.read(header_len)
    except FileNotFoundError as exc:
        raise UserError(f"missing shard '{path}'") from exc
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    header = _parse_json_bytes(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise UserError(f"'{path}' is corrupt: its safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"'{path}' is corrupt: its __metadata__ is not an object of strings")
    data_start = 8 + header_len
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        dtype, shape, begin, end = _header_entry(path, name, entry)
        if end - begin != math.prod(shape) * element_size(dtype):
            raise UserError(f"'{path}' is corrupt: '{_one_line(name, 80)}' has {end - begin} bytes "
                            f"for shape {list(shape)}")
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
    expected = 0
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        begin, end = info.start - data_start, info.end - data_start
        if begin != expected:
            problem = "overlaps the tensor before it" if begin < expected else f"leaves a gap at byte {expected}"
            raise UserError(f"'{path}' is corrupt: '{_one_line(info.name, 80)}' at data bytes {begin}-{end} {problem}")
        expected = end
    if expected > data_size:
        raise UserError(f"'{path}' is truncated: header needs {data_start + expected} bytes, file has {size}")
    if expected < data_size:
        raise UserError(f"'{path}' is corrupt: {data_size - expected} bytes follow the last tensor")
    return tensors, metadata


_MAX_INDEX = 100 * 2**20


def read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json``, checked to be an object of file names."""
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_INDEX:
            raise UserError(f"'{path}' is corrupt: larger than {_MAX_INDEX // 2**20} MiB")
        raw = note_input(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    index = _parse_json_bytes(raw, path, "index")
    if not isinstance(index, dict):
        raise UserError(f"'{path}' is corrupt: the index is not a JSON object")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise UserError(f"'{path}' is corrupt: its weight_map is missing or not an object")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise UserError(f"'{path}' is corrupt: weight_map['{_one_line(bad, 80)}'] is not a file name string")
    total = (index.get("metadata") or {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    if isinstance(total, float) and not math.isfinite(total):  # 1e400 parses as inf: no size at all
        raise UserError(f"'{path}' is corrupt: metadata.total_size is {total}")
    return weight_map


class HFCheckpoint:
    """A Hugging Face checkpoint folder read lazily: headers at open, tensor data on request."""

    def __init__(self, folder: str | Path):
        self.folder = resolve_source(folder)
        self.tensors: dict[str, TensorInfo] = {}
        self.shards = self._find_shards()
        for shard in self.shards:
            found, _ = read_header(shard)
            for name, info in found.items():
                if name in self.tensors:
                    raise UserError(f"tensor '{_one_line(name, 80)}' is in both '{self.tensors[name].file}' "
                                    f"and '{shard}'")
                self.tensors[name] = info
        self._check_index()
        self._handles: dict[Path, object] = {}

    def _find_shards(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.exists():
            weight_map = read_index(index)
            names = sorted(set(weight_map.values()))
            for name in names:
                self._check_shard_name(name, index)
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise UserError(f"missing shard '{self.folder / missing[0]}' listed in {INDEX_NAME}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            self._weight_map = weight_map
            shards = [self.folder / n for n in names]
        else:
            self._weight_map = None
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise UserError(f"'{self.folder}' has no safetensors files: is it a Hugging Face checkpoint folder?")
        for shard in shards:
            self._check_inside(shard)
        return shards

    def _check_shard_name(self, name: str, index: Path) -> None:
        """An index entry must be a plain file name: no folder part, no ``..``, not absolute."""
        if not name or name in (".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute():
            raise UserError(f"'{index}' is corrupt: weight_map names {_one_line(name, 80, quote=True)}, "
                            "which is not a file name inside the folder")

    def _check_inside(self, shard: Path) -> None:
        """Refuse a shard that is a link to a file outside the folder (the Hugging Face cache's
        ``snapshots/REV/x -> ../../blobs/SHA`` links are allowed)."""
        if not shard.is_symlink():
            return
        target = shard.resolve()
        home = self.folder.resolve()
        allowed = [home]
        if home.parent.name == "snapshots":
            allowed.append(home.parent.parent / "blobs")
        if not any(target.is_relative_to(a) for a in allowed):
            raise UserError(f"'{shard}' links to '{target}', outside the checkpoint folder: refusing to read it")

    def _check_index(self) -> None:
        if self._weight_map is None:
            return
        index = self.folder / INDEX_NAME
        for name, fname in self._weight_map.items():
            info = self.tensors.get(name)
            if info is None:
                raise UserError(f"'{index}' lists '{_one_line(name, 80)}' in '{fname}' but that file does not hold it")
            if info.file.name != fname:
                raise UserError(f"'{index}' puts '{_one_line(name, 80)}' in '{fname}' but it is in "
                                f"'{info.file.name}'")

    def config_path(self) -> Path:
        path = self.folder / "config.json"
        if not path.is_file():
            raise UserError(f"'{self.folder}' has no config.json")
        return path

    def _file(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = open_input(path)
        return handle

    def _read_bytes(self, path: Path, start: int, nbytes: int) -> torch.Tensor:
        """Read a byte range into fresh memory with plain reads (no mmap: RSS stays the tensor's size)."""
        return read_exact(self._file(path), start, nbytes, self._truncated(path))

    def read(self, name: str) -> torch.Tensor:
        """Read one whole tensor."""
        info = self.tensors[name]
        return self._read_bytes(info.file, info.start, info.nbytes).view(to_torch(info.dtype)).reshape(info.shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``start:stop`` of the first dimension only (a contiguous byte range)."""
        info = self.tensors[name]
        if not info.shape:
            raise ValueError(f"{name} is a scalar")
        start, stop = max(0, start), min(stop, info.shape[0])
        row = info.nbytes // info.shape[0] if info.shape[0] else 0
        data = self._read_bytes(info.file, info.start + start * row, max(0, stop - start) * row)
        return data.view(to_torch(info.dtype)).reshape((max(0, stop - start), *info.shape[1:]))

    def read_row_bytes(self, name: str, start: int, stop: int) -> ByteRows:
        """Rows ``start:stop`` of the first dimension as bytes (no torch); a scalar is read whole."""
        info = self.tensors[name]
        if not info.shape:
            return rowbytes.read(self._file(info.file), info.start, (), info.dtype, self._truncated(info.file))
        start, stop = max(0, start), min(stop, info.shape[0])
        span = self.span(name, start, max(start, stop))
        return rowbytes.read(self._file(info.file), span.offset, span.shape, span.dtype, self._truncated(info.file))

    @staticmethod
    def _truncated(path: Path) -> str:
        return f"'{path}' is truncated: ended while reading tensor data"

    def span(self, name: str, start: int, stop: int) -> FileSpan:
        """Where rows ``start:stop`` of the first dimension lie in their file."""
        info = self.tensors[name]
        row = info.nbytes // info.shape[0] if info.shape[0] else 0
        return FileSpan(info.file, info.start + start * row, (stop - start, *info.shape[1:]), info.dtype)

    def read_slice(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """Read ``tensor[index]`` (basic slices): only the rows the first slice names are read."""
        info = self.tensors[name]
        first = index[0] if index else slice(None)
        start, stop, step = first.indices(info.shape[0])
        rows = self.read_rows(name, start, stop) if step == 1 else self.read(name)[first]
        rest = (slice(None), *index[1:]) if step == 1 else (slice(None), *index[1:])
        return rows[rest].clone() if len(index) > 1 else rows

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ------------------------------------------------------------------------------------------ writer
@dataclass(frozen=True)
class PlannedTensor:
    """One tensor an output file will hold."""

    name: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (decimal for GB/MB/KB like transformers)."""
    if isinstance(text, int):
        return text
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "tb": 10**12, "b": 1}
    s = text.strip().lower()
    for unit, factor in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError as exc:
        raise UserError(f"cannot read size '{text}': use e.g. 5GB, 500MB or a byte count") from exc


def plan_shards(tensors: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into files of at most ``max_shard_size`` bytes (a bigger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    """transformers' names: ``model.safetensors`` alone, else 1-based ``model-0000i-of-0000N``."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class SafetensorsFileWriter:
    """Write one safetensors file whose header is known up front, one tensor at a time from its row blocks.

    Memory stays at the size of whatever piece is being written; the file is complete only when every
    planned byte has been written (``close`` checks).
    """

    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tensors = {t.name: t for t in tensors}
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.offsets: dict[str, int] = {}
        for t in tensors:
            header[t.name] = {"dtype": safetensors_code(t.dtype), "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            self.offsets[t.name] = offset
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.total = offset
        self.written = 0
        # kept: an earlier run's identical file, checksum verified by --resume; writes are skipped
        self.kept = kept_state(self.path) is not None
        self._f = None if self.kept else create_file(self.path)
        if self._f is not None:
            self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write_blocks(self, name: str, blocks: Iterable[torch.Tensor | FileSpan]) -> int:
        """Write the whole of ``name`` from its row blocks in order (tensors or :class:`FileSpan`, copied file to
        file); return bytes. In a file ranks share, blocks outside this rank's bytes are not asked for."""
        planned = self.tensors[name]
        if self._f is None:
            self.written += planned.nbytes
            return planned.nbytes
        where = self.data_start + self.offsets[name]
        if self._f.tell() != where:
            self._f.seek(where)
        rows = planned.shape[0] if planned.shape else 1

        def raw() -> Iterator[memoryview | FileSpan]:
            row = 0
            for block in blocks:
                shape = tuple(block.shape)
                whole = row == 0 and shape == planned.shape
                if block.dtype != planned.dtype or not (whole or (
                        shape[1:] == planned.shape[1:] and row + (shape[0] if shape else 1) <= rows)):
                    raise ValueError(f"{name}: rows {row}+{shape} {block.dtype} outside {planned.shape} "
                                     f"{planned.dtype}")
                row += rows if whole else shape[0]
                yield block if isinstance(block, FileSpan) else memoryview(block_buffer(block))

        written = self._f.write_blocks(planned.nbytes, raw())
        if written != planned.nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, planned {planned.nbytes}")
        self.written += written
        return written

    def abort(self) -> None:
        """Close the file after a failure without checking it (the caller discards it)."""
        if self._f is not None:
            self._f.abort()

    def close(self) -> None:
        if self.kept:
            return
        self._f.close()
        if self.written != self.total:
            raise RuntimeError(f"{self.path.name}: wrote {self.written} of {self.total} planned bytes")


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write ``model.safetensors.index.json`` (total_size = tensor bytes, as transformers counts)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_bytes(folder / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())


# ------------------------------------------------------------------------------------------- assets
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp", ".ckpt", ".gguf", ".h5", ".msgpack")
_SKIP = {INDEX_NAME, "pytorch_model.bin.index.json", ".metadata", MANIFEST_NAME}


def asset_files(folder: Path) -> list[Path]:
    """Every non-weight file of a checkpoint folder (config, tokenizer, processor, templates, docs...)."""
    out = []
    note_input(folder)
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.name in _SKIP or path.name.endswith(WEIGHT_SUFFIXES):
            continue
        check_inside(path, folder)  # a tokenizer file linking to /etc/shadow is never read
        out.append(note_input(path))
    return out


def copy_assets(src: Path, dst: Path) -> list[str]:
    """Copy every non-weight file of ``src`` into ``dst`` byte for byte; return their relative names."""
    src = Path(src)
    if not src.is_dir():
        raise UsageError(f"assets folder '{src}' does not exist")
    copied = []
    for path in asset_files(src):
        rel = path.relative_to(src)
        copy_file(path, dst / rel, within=src)
        copied.append(str(rel))
    return copied


CONFIG_DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers < 4.56 wrote torch_dtype, later ones dtype
_SUB_CONFIGS = ("text_config", "vision_config")


def describe_weights(path: Path, dtype: DType | None) -> bool:
    """Make the config.json staged at ``path`` describe the weights written beside it; True if it changed.

    vlconvert never writes quantized weights, so ``quantization_config`` goes (an FP8 release's, whether the
    config came from SRC, ``--assets-dir`` or ``--config``: transformers would otherwise treat bf16 weights as
    FP8). With ``dtype`` (an HF output: the dtype written), every ``torch_dtype``/``dtype`` the config names,
    top level and sub-configs, names it, and a rewritten config names it at the top level too. Without it (a
    DCP output, whose config dtype is the model's: ``--dtype auto`` reads it) the dtypes stay. A config that
    already describes the weights, or is not a JSON object, is left byte for byte as copied."""
    if not path.is_file():
        return False
    try:
        raw = json.loads(path.read_bytes())
    except ValueError:
        return False
    if not isinstance(raw, dict):
        return False
    changed = "quantization_config" in raw
    raw.pop("quantization_config", None)
    if dtype is not None:
        name = dtype_name(dtype)
        scopes = [raw] + [raw[k] for k in _SUB_CONFIGS if isinstance(raw.get(k), dict)]
        for scope in scopes:
            for key in CONFIG_DTYPE_KEYS:
                if key in scope and scope[key] != name:
                    scope[key] = name
                    changed = True
        if changed and not any(key in raw for key in CONFIG_DTYPE_KEYS):
            raw["dtype"] = name
    if changed:
        path.unlink()  # staged by the copy: written again (and hashed again) through the stage
        write_bytes(path, (json.dumps(raw, indent=2) + "\n").encode())
    return changed
