"""Megatron-Core legacy ``torch`` checkpoints: folders, rank files, streaming writes, lazy safe reads.

Layout (Megatron-LM ``get_checkpoint_name``)::

    ROOT/latest_checkpointed_iteration.txt      "release" or an iteration number
    ROOT/release/ or ROOT/iter_NNNNNNN/
        mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt

A rank file is a torch zip archive: ``data.pkl`` (the pickled dict, tensors as references to storage
records) plus one uncompressed record per storage. :class:`RankFileWriter` writes ``data.pkl`` first (it
only needs names, shapes and dtypes) and then each storage record as its tensor is produced, so a rank is
never held in memory. :class:`RankFile` reads ``data.pkl`` with a restricted unpickler (an explicit
allowlist; every other global becomes an inert placeholder and nothing pickled is ever called) and reads
tensor bytes on request, rows at a time, with plain file reads. Files written here load with
``torch.load(weights_only=True)``.

This module knows files, not model families; the canonical reader of a Megatron checkpoint
(:class:`vlconvert.sources.MegatronSource`) combines it with the model's name table.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import math
import pickle
import pickletools
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vlconvert import rowbytes
from vlconvert.dtypes import BY_NAME, DType, as_dtype, element_size, to_torch
from vlconvert.errors import UserError
from vlconvert.errors import is_int as _is_int
from vlconvert.errors import one_line as _one_line
from vlconvert.layouts import torch_names
from vlconvert.layouts.filebytes import FileSpan, block_buffer, read_exact
from vlconvert.lazy import is_loaded, is_tensor, loaded, torch
from vlconvert.publish import Checksum, OutputFile, create_file, kept_state, note_input, open_input, write_bytes
from vlconvert.rowbytes import ByteRows, is_byte_rows

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
META_KEY = "vlconvert"  # extra top-level key with plain-data facts (Megatron ignores unknown keys)
_ALIGN = 64
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, the zip epoch: no clock in the output
_FOLDER_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
MAX_DATA_PKL = 64 * 2**20  # a rank file's pickled dict; real ones are a few MiB at most
_MAX_TRACKER = 4096
_MAX_DIM = 2**62  # far above any real dimension; keeps every product inside torch's int64

_STORAGE_OF: dict[DType, str] = {BY_NAME[name]: storage for name, storage in [
    ("float32", "FloatStorage"), ("float16", "HalfStorage"), ("bfloat16", "BFloat16Storage"),
    ("float64", "DoubleStorage"), ("int64", "LongStorage"), ("int32", "IntStorage"), ("int16", "ShortStorage"),
    ("int8", "CharStorage"), ("uint8", "ByteStorage"), ("bool", "BoolStorage"),
    ("float8_e4m3fn", "Float8_e4m3fnStorage"), ("float8_e5m2", "Float8_e5m2Storage")]}
_DTYPE_OF = {v: k for k, v in _STORAGE_OF.items()}
STORABLE_DTYPES: tuple[DType, ...] = tuple(_STORAGE_OF)  # what a torch.save record (rank file, DCP) can hold


def _storable(dtype: object) -> str | None:
    """The torch storage class that holds ``dtype`` (a DType or a torch dtype), or None."""
    try:
        return _STORAGE_OF.get(as_dtype(dtype))
    except UserError:
        return None


def rank_folder(tp: int, pp: int, ep: int, pp_size: int, ep_size: int) -> str:
    """``mp_rank_{tp:02d}`` + ``_{pp:03d}`` when PP > 1 + ``_{ep:03d}`` when EP > 1."""
    name = f"mp_rank_{tp:02d}"
    if pp_size > 1:
        name += f"_{pp:03d}"
    if ep_size > 1:
        name += f"_{ep:03d}"
    return name


def iteration_folder(iteration: int | None) -> str:
    """``release`` for None, else ``iter_NNNNNNN``."""
    return "release" if iteration is None else f"iter_{iteration:07d}"


# --------------------------------------------------------------------------------------------- writer
class _StorageRef:
    def __init__(self, key: str, dtype: DType, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly like a contiguous CPU tensor that torch.save would write."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return torch_names.torch_object(_REBUILD), (self.storage, 0, torch_names.Size(self.shape), stride, False,
                                         collections.OrderedDict())


_REBUILD = torch_names.TorchGlobal("torch._utils", "_rebuild_tensor_v2")


class _StoragePickling:
    def persistent_id(self, obj):  # noqa: D401 - pickle hook
        if isinstance(obj, _StorageRef):
            storage = torch_names.TorchGlobal("torch", _storable(obj.dtype))
            return ("storage", torch_names.torch_object(storage), obj.key, "cpu", obj.numel)
        return None


class _CPickler(_StoragePickling, pickle.Pickler):
    pass


class _NamingPickler(_StoragePickling, torch_names.NamingPickler):
    pass


def _dump(obj: object, buf: io.BytesIO) -> None:
    """Pickle ``obj`` at protocol 2 as torch.save does: with the C pickler once torch is imported, else with
    the pure-Python one writing torch's names (same bytes, no torch needed to write a copied tensor)."""
    (_CPickler if is_loaded("torch") else _NamingPickler)(buf, protocol=2).dump(obj)


@dataclass(frozen=True)
class RankEntry:
    """One tensor a rank file will hold."""

    name: str
    shape: tuple[int, ...]
    dtype: DType

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


def write_rank_file(path: Path, entries: list[RankEntry], produce: Callable[[int, RankEntry], torch.Tensor],
                    extra: dict | None = None, iteration: int = 0,
                    on_bytes: Callable[[int], None] | None = None) -> int:
    """Write ``model_optim_rng.pt`` holding ``{"model": {...}, "checkpoint_version": 3.0, "iteration": ...}``.

    ``produce(i, entry)`` is called once per entry, in order, and returns the tensor or an iterator of
    its row blocks (written as they come: memory stays at one block). ``extra`` adds plain-data top-level
    keys. Byte-for-byte deterministic for the same inputs. Returns the tensor bytes written.
    """
    path = Path(path)
    if not entries:
        raise ValueError(f"{path}: a rank file needs at least one tensor")
    for e in entries:
        if _storable(e.dtype) is None:
            raise UserError(f"dtype {e.dtype} of '{e.name}' cannot be stored in a Megatron rank file")
    model = collections.OrderedDict()
    for i, e in enumerate(entries):
        model[e.name] = _TensorRef(_StorageRef(str(i), e.dtype, math.prod(e.shape)), e.shape)
    payload: dict = {"model": model, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
    if extra:
        payload.update(extra)
    if kept_state(path) is not None:  # --resume kept this rank file (checksum verified)
        total = sum(e.nbytes for e in entries)
        if on_bytes:
            on_bytes(total)
        return total
    buf = io.BytesIO()
    _dump(payload, buf)
    written = 0
    with create_file(path) as f:
        zf = _ZipStream(f)
        _begin_archive(zf, buf.getvalue())
        for i, e in enumerate(entries):
            produced = produce(i, e)
            if is_tensor(produced) or is_byte_rows(produced):
                _check_block(e, produced, whole=True)
                zf.add(f"archive/data/{i}", block_buffer(produced))
            else:  # row blocks, in order: one is held at a time
                zf.add_stream(f"archive/data/{i}", e.nbytes, (block_buffer(_check_block(e, b)) for b in produced))
            written += e.nbytes
            if on_bytes:
                on_bytes(e.nbytes)
            del produced
        _end_archive(zf, buf.getvalue())
    return written


def _begin_archive(zf: _ZipStream, pickled: bytes) -> None:
    """The records ``torch.save`` writes before the storages: the pickle, then the format's facts."""
    for name, data in (("archive/data.pkl", pickled), ("archive/.format_version", b"1"),
                       ("archive/.storage_alignment", b"64"), ("archive/byteorder", b"little")):
        zf.add(name, data)


def _end_archive(zf: _ZipStream, pickled: bytes) -> None:
    """The records after the storages, then the central directory (the id: the pickle's sha1, so the same
    archive always has the same bytes)."""
    zf.add("archive/version", b"3\n")
    zf.add("archive/.data/serialization_id", hashlib.sha1(pickled).hexdigest().encode())
    zf.close()


def write_torch_record(f, shape: tuple[int, ...], dtype: DType, data: torch.Tensor | Iterable[torch.Tensor],
                       lead: int = 0) -> None:
    """Write one ``torch.save``-format archive holding a single tensor into ``f`` (at its current position),
    from the tensor or from its row blocks in order (memory: one block). ``torch.load`` reads it. With
    ``lead`` > 0 the first ``lead`` dims of ``shape`` are 1 and blocks are row blocks of the rest."""
    numel = math.prod(shape)
    entry = RankEntry("tensor", tuple(shape), dtype)
    buf = io.BytesIO()
    _dump(_TensorRef(_StorageRef("0", dtype, numel), tuple(shape)), buf)
    zf = _ZipStream(f)
    _begin_archive(zf, buf.getvalue())
    if is_tensor(data) or is_byte_rows(data):
        zf.add("archive/data/0", block_buffer(_check_block(entry, data, whole=True)))
    else:
        if any(d != 1 for d in shape[:lead]):
            raise ValueError(f"leading dims of {shape} are not 1")
        rows = RankEntry("tensor", tuple(shape[lead:]), dtype)
        zf.add_stream("archive/data/0", entry.nbytes, (block_buffer(_check_block(rows, b)) for b in data))
    _end_archive(zf, buf.getvalue())


class _MemoryFile:
    """What :class:`_ZipStream` writes to, in memory: every record's bytes are known when it is added."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def write(self, data) -> int:
        return self.buffer.write(data)

    def write_later(self, size: int, make: Callable[[], bytes]) -> int:
        data = make()
        if len(data) != size:  # pragma: no cover - guards the directory arithmetic
            raise RuntimeError(f"late record of {len(data)} bytes, planned {size}")
        return self.buffer.write(data)


def torch_save_bytes(obj: object, storages: dict[str, bytes] | None = None) -> bytes:
    """``torch.save(obj)`` without torch: ``obj`` is plain data (dtypes as :class:`DType`, argparse namespaces...)
    whose tensors are :func:`small_tensor` references to ``storages`` (key -> little-endian bytes).
    Written by the pure-Python pickler with torch's names and laid out as the rank files are, so ``torch.load``
    reads it; the bytes are the same whether torch is imported or not."""
    buf = io.BytesIO()
    _NamingPickler(buf, protocol=2).dump(obj)
    out = _MemoryFile()
    zf = _ZipStream(out)  # type: ignore[arg-type]
    _begin_archive(zf, buf.getvalue())
    for key, data in (storages or {}).items():
        zf.add(f"archive/data/{key}", data)
    _end_archive(zf, buf.getvalue())
    return out.buffer.getvalue()


def small_tensor(key: str, dtype: DType, shape: tuple[int, ...] = ()) -> _TensorRef:
    """A reference that pickles as a contiguous CPU tensor held in storage ``key`` (see :func:`torch_save_bytes`)."""
    return _TensorRef(_StorageRef(key, dtype, math.prod(shape)), shape)


def _check_block(e: RankEntry, block: torch.Tensor | ByteRows | FileSpan, whole: bool = False
                 ) -> torch.Tensor | ByteRows | FileSpan:
    """A produced tensor (or row block) must have the planned dtype and trailing shape."""
    shape_ok = tuple(block.shape) == e.shape if whole else tuple(block.shape[1:]) == e.shape[1:]
    if block.dtype != e.dtype or not shape_ok:
        raise RuntimeError(f"{e.name}: produced {tuple(block.shape)} {block.dtype}, planned {e.shape} {e.dtype}")
    return block


class _ZipStream:
    """A stored (uncompressed) zip archive written strictly front to back, as torch.save lays it out.

    No header is ever patched afterwards, so the file can be hashed while it is written: a record whose
    bytes are in memory gets its CRC-32 in its header (:meth:`add`); a record streamed in blocks
    (:meth:`add_stream`) gets it in a data descriptor after its data (general-purpose flag bit 3), as
    streaming zip writers do. Every record's data starts on a 64-byte boundary (an ``FB`` padding extra
    field, as torch pads). Zip64 fields are used past 4 GiB.
    """

    _LIMIT = 0xFFFFFFFF

    def __init__(self, f: OutputFile):
        self.f = f
        self.pos = 0
        self.entries: list[tuple[bytes, int | Checksum, int, int, int]] = []  # name, crc, size, offset, flags

    def _write(self, data) -> None:
        self.f.write(data)
        self.pos += len(memoryview(data).cast("B"))

    def add(self, name: str, data) -> None:
        """Append one record holding ``data`` (bytes or a buffer)."""
        view = memoryview(data).cast("B")
        size, crc, raw_name, offset = len(view), zlib.crc32(view), name.encode(), self.pos
        zip64 = size >= self._LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        pad = -(offset + 30 + len(raw_name) + len(extra) + 4) % _ALIGN
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        stored = self._LIMIT if zip64 else size
        self._write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0, 0, 0, _DOS_DATE, crc, stored,
                                stored, len(raw_name), len(extra)) + raw_name + extra)
        if self.pos % _ALIGN:  # pragma: no cover - guards the header arithmetic above
            raise RuntimeError("storage record is not 64-byte aligned")
        self._write(view)
        self.entries.append((raw_name, crc, size, offset, 0))

    def add_stream(self, name: str, size: int, blocks: Iterable) -> None:
        """Append one record of exactly ``size`` bytes given as buffers in order; only one is held at a time.

        The CRC-32 is computed by the file's checksum thread, and the data descriptor written once it is known."""
        raw_name, offset = name.encode(), self.pos
        zip64 = size >= self._LIMIT
        extra = struct.pack("<HHQQ", 1, 16, 0, 0) if zip64 else b""
        pad = -(offset + 30 + len(raw_name) + len(extra) + 4) % _ALIGN
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        stored = self._LIMIT if zip64 else 0
        self._write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0x08, 0, 0, _DOS_DATE, 0, stored,
                                stored, len(raw_name), len(extra)) + raw_name + extra)
        if self.pos % _ALIGN:  # pragma: no cover - guards the header arithmetic above
            raise RuntimeError("storage record is not 64-byte aligned")
        crc = Checksum()
        written = self.f.write_blocks(size, blocks, crc)  # a FileSpan is copied file to file
        self.pos += written
        if written != size:
            raise RuntimeError(f"{name}: streamed {written} bytes, planned {size}")

        def descriptor() -> bytes:
            return (struct.pack("<IIQQ", 0x08074B50, crc.value, size, size) if zip64
                    else struct.pack("<IIII", 0x08074B50, crc.value, size, size))

        self.pos += self.f.write_later(24 if zip64 else 16, descriptor)
        self.entries.append((raw_name, crc, size, offset, 0x08))

    def _directory(self, start: int, crcs: bool = True) -> bytes:
        """The central directory (at byte ``start``) and the end records; CRCs are read when this runs (zeros
        without ``crcs``: the size is the same)."""
        out = bytearray()
        for raw_name, crc, size, offset, flags in self.entries:
            value = 0 if not crcs else crc.value if isinstance(crc, Checksum) else crc
            fields = [v for v in (size, size) if v >= self._LIMIT] + ([offset] if offset >= self._LIMIT else [])
            extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
            version = 45 if fields else 20
            out += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x0300 | version, version, flags, 0, 0, _DOS_DATE,
                               value, min(size, self._LIMIT), min(size, self._LIMIT), len(raw_name), len(extra),
                               0, 0, 0, 0o600 << 16, min(offset, self._LIMIT)) + raw_name + extra
        count, cd_size = len(self.entries), len(out)
        if count >= 0xFFFF or start >= self._LIMIT or cd_size >= self._LIMIT:
            end64 = start + len(out)
            out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x032D, 45, 0, 0, count, count, cd_size, start)
            out += struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                           min(cd_size, self._LIMIT), min(start, self._LIMIT), 0)
        return bytes(out)

    def close(self) -> None:
        """Write the central directory and the end records."""
        start = self.pos
        size = len(self._directory(start, crcs=False))  # the size does not depend on the CRCs
        self.pos += self.f.write_later(size, lambda: self._directory(start))


# ------------------------------------------------------------------------------------ pickle pre-scan
# CPython's C unpickler grows its memo array to any index a PUT/LONG_BINPUT names: a 9-byte pickle can make
# it allocate and zero 64 GiB. Every pickle vlconvert unpickles is first walked opcode by opcode (arguments
# skipped, faster than unpickling) and refused when a memo index exceeds what its size allows.
def _opcode_table() -> list[tuple[str, int] | None]:
    """Per opcode byte: ('-', 0) no argument, ('f', n) n bytes, ('c', n) n-byte length then data, ('l', k) k
    lines; None for a byte that is no opcode."""
    table: list[tuple[str, int] | None] = [None] * 256
    counted = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
               pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}
    for op in pickletools.opcodes:
        arg = op.arg
        if arg is None:
            kind = ("-", 0)
        elif arg.n > 0:
            kind = ("f", arg.n)
        elif arg.n == pickletools.UP_TO_NEWLINE:
            kind = ("l", 2 if arg.name == "stringnl_noescape_pair" else 1)
        else:
            kind = ("c", counted[arg.n])
        table[ord(op.code)] = kind
    return table


_OPS = _opcode_table()


def check_pickle(raw: bytes) -> None:
    """Walk the opcodes of ``raw``; UnpicklingError for an unknown opcode, a missing STOP or a memo index
    larger than the pickle could legitimately use (the unpickler would allocate memory for all of them)."""
    n, i = len(raw), 0
    limit = n // 2 + 1024  # a memoized object costs at least two bytes of pickle
    while i < n:
        op = raw[i]
        kind = _OPS[op]
        if kind is None:
            raise pickle.UnpicklingError(f"unknown opcode 0x{op:02x} at byte {i}")
        tag, size = kind
        start = i
        i += 1
        if tag == "-":
            if op == 0x2E:  # STOP
                return
        elif tag == "f":
            if op == 0x72 and int.from_bytes(raw[i:i + 4], "little") > limit:  # LONG_BINPUT
                raise pickle.UnpicklingError(f"memo index {int.from_bytes(raw[i:i + 4], 'little')} at byte {start}")
            i += size
        elif tag == "c":
            length = int.from_bytes(raw[i:i + size], "little", signed=op in (0x54, 0x8B))  # BINSTRING, LONG4
            if length < 0:
                raise pickle.UnpicklingError(f"negative length at byte {start}")
            i += size + length
        else:
            end = i
            for _ in range(size):
                end = raw.find(b"\n", end) + 1
                if end == 0:
                    raise pickle.UnpicklingError(f"unterminated argument at byte {start}")
            if op == 0x70:  # PUT
                text = raw[i:end - 1]
                if not text.isdigit() or len(text) > 12 or int(text) > limit:
                    raise pickle.UnpicklingError(f"memo index {text[:20]!r} at byte {start}")
            i = end
    raise pickle.UnpicklingError("truncated: no STOP opcode")


# --------------------------------------------------------------------------------------------- reader
@dataclass(frozen=True)
class LazyTensor:
    """A tensor inside a rank file, known by metadata only."""

    key: str
    dtype: DType
    offset: int  # in elements, into the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def contiguous(self) -> bool:
        expect = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return all(s == e for s, e, n in zip(self.stride, expect, self.shape, strict=True) if n > 1)


class _StorageType:
    def __init__(self, dtype: DType):
        self.dtype = dtype


class Opaque:
    """Stands in for any pickled object outside the allowlist (e.g. an enum in Megatron's ``args``)."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<unread {self.qualname}>"


@dataclass(frozen=True)
class _Stored:
    """A storage record reference; made only by ``persistent_load`` (no pickled global names this class)."""

    key: str
    dtype: DType


def _rebuild_tensor(storage, offset, size, stride, *_rest) -> LazyTensor:
    if not isinstance(storage, _Stored):
        raise pickle.UnpicklingError("tensor without a storage record")
    if not (_is_int(offset) and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and all(_is_int(v) for v in (*size, *stride))):
        raise pickle.UnpicklingError("tensor with a non-integer offset, size or stride")
    return LazyTensor(storage.key, storage.dtype, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_rest):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """An allowlist unpickler: tensors become :class:`LazyTensor`, unknown globals inert :class:`Opaque`."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if module == "torch":
            if name in _DTYPE_OF:
                return _StorageType(_DTYPE_OF[name])
            if name == "Size":  # torch.Size((2, 3)): a tuple, read without torch
                return torch_names.Size
            if name in BY_NAME:  # a dtype, e.g. in Megatron's args
                return BY_NAME[name]
            if name == "device" or isinstance(vars(loaded(torch)).get(name), torch.dtype):  # no lazy submodule imports
                return getattr(torch, name)
        return type(name, (Opaque,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {_one_line(pid, 80, quote=True)}")
        return _Stored(str(pid[2]), pid[1].dtype)


def restricted_load(raw: bytes, where: str) -> object:
    """Unpickle a torch ``data.pkl`` with the allowlist (tensors become :class:`LazyTensor`), after the
    memo pre-scan; anything hostile is one :class:`UserError` naming ``where``."""
    try:
        check_pickle(raw)
        return _RestrictedUnpickler(io.BytesIO(raw)).load()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - hostile pickles raise anything: EOFError, RuntimeError...
        raise UserError(f"{where} has a data.pkl vlconvert will not unpickle "
                        f"({type(exc).__name__}: {_one_line(exc, 100)})") from exc


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unsupported bytes encoding {encoding}")
    return text.encode("latin1")


_META_INTS = ("format", "tp", "pp", "ep", "etp", "vocab", "padded_vocab")


def _check_meta(path: Path, meta: dict) -> None:
    """The ``vlconvert`` metadata of a rank file must be the plain data vlconvert writes."""
    where = f"'{path}' has corrupt vlconvert metadata:"
    bad = next((k for k in _META_INTS if k in meta and not (_is_int(meta[k]) and meta[k] >= 0)), None)
    if bad is not None:
        raise UserError(f"{where} '{bad}' is {_one_line(meta[bad], 40, quote=True)}, not a count")
    layers = meta.get("stage_layers", [])
    if not isinstance(layers, list) or not all(_is_int(n) and n >= 0 for n in layers):
        raise UserError(f"{where} stage_layers is not a list of counts")
    if "hf_config" in meta:
        text = meta["hf_config"]
        try:
            config = json.loads(text) if isinstance(text, str) else None
        except (ValueError, RecursionError) as exc:
            raise UserError(f"{where} hf_config is not valid JSON") from exc
        if not isinstance(config, dict) or not all(isinstance(config.get(k, {}), dict)
                                                   for k in ("text_config", "vision_config")):
            raise UserError(f"{where} hf_config is not a config object")


class RankFile:
    """One ``model_optim_rng.pt`` read lazily: ``model`` keys and shapes at open, bytes on request.

    Opening reads the zip directory and ``data.pkl`` (at most :data:`MAX_DATA_PKL` bytes, however well
    it compresses) and checks every model tensor lies inside its stored record.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        payload = restricted_load(self._read_data_pkl(), f"'{self.path}'")
        if not isinstance(payload, dict):
            raise UserError(f"'{self.path}' does not hold a checkpoint dict")
        if "model" not in payload:
            vpp = sorted(k for k in payload if isinstance(k, str) and re.fullmatch(r"model\d+", k))
            if vpp:
                raise UserError(f"'{self.path}' holds virtual pipeline chunks ({', '.join(vpp)}): "
                                "VPP checkpoints are not supported; convert with one model chunk per stage")
            raise UserError(f"'{self.path}' has no 'model' entry: is it a Megatron model checkpoint?")
        model = payload["model"]
        if not isinstance(model, dict):
            raise UserError(f"'{self.path}': its 'model' entry is not a dict ({type(model).__name__})")
        self.tensors: dict[str, LazyTensor] = {}
        self.ignored: list[str] = []
        for name, value in model.items():
            if not isinstance(name, str):
                raise UserError(f"'{self.path}': a model entry name is not a string "
                                f"({_one_line(name, 40, quote=True)})")
            if isinstance(value, LazyTensor):
                self._check_tensor(name, value)
                self.tensors[name] = value
            elif name.endswith("_extra_state") or value is None:
                self.ignored.append(name)
            else:
                raise UserError(f"'{self.path}': model entry '{_one_line(name, 80)}' is not a tensor "
                                f"({type(value).__name__})")
        self.checkpoint_version = payload.get("checkpoint_version")
        self.iteration = payload.get("iteration")
        meta = payload.get(META_KEY)
        self.meta: dict | None = meta if isinstance(meta, dict) else None
        if self.meta is not None:
            _check_meta(self.path, self.meta)
        args = payload.get("args")
        self.args: dict = vars(args) if isinstance(args, argparse.Namespace) else {}
        self._offsets: dict[str, int] = {}

    def _read_data_pkl(self) -> bytes:
        """The zip directory (into ``self._records``) and ``data.pkl``, bounded in size."""
        try:
            with zipfile.ZipFile(note_input(self.path)) as zf:
                infos = zf.infolist()
                pkl = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
                if len(pkl) != 1:
                    raise UserError(f"'{self.path}' is not a torch zip checkpoint (no data.pkl)")
                if pkl[0].file_size > MAX_DATA_PKL:
                    raise UserError(f"'{self.path}': its data.pkl inflates to {pkl[0].file_size} bytes, more than "
                                    f"the {MAX_DATA_PKL // 2**20} MiB vlconvert reads")
                prefix = pkl[0].filename[: -len("data.pkl")]
                with zf.open(pkl[0]) as f:
                    raw = f.read(MAX_DATA_PKL + 1)  # enforced while reading too: the directory may lie
                if len(raw) > MAX_DATA_PKL:
                    raise UserError(f"'{self.path}': its data.pkl inflates past the {MAX_DATA_PKL // 2**20} MiB "
                                    "vlconvert reads")
                self._records = {i.filename[len(prefix) + 5:]: i for i in infos
                                 if i.filename.startswith(prefix + "data/")}
        except UserError:
            raise
        except FileNotFoundError as exc:
            raise UserError(f"missing rank file '{self.path}'") from exc
        except OSError as exc:
            raise UserError(f"cannot read '{self.path}': {exc.strerror or exc}") from exc
        except zipfile.BadZipFile as exc:
            raise UserError(f"'{self.path}' is not a zip-format torch checkpoint or is corrupt "
                            f"({_one_line(exc, 80)}; legacy tar/pickle files are not supported)") from exc
        except Exception as exc:  # noqa: BLE001 - a corrupt zip raises zlib.error, struct.error, ValueError...
            raise UserError(f"'{self.path}' is a corrupt zip ({type(exc).__name__}: {_one_line(exc, 80)})") from exc
        return raw

    def _check_tensor(self, name: str, t: LazyTensor) -> None:
        """A model tensor must reference a stored record and lie entirely inside it."""
        where = f"'{self.path}' is corrupt: tensor '{_one_line(name, 80)}'"
        shape, stride = getattr(t, "shape", None), getattr(t, "stride", None)
        if not (isinstance(getattr(t, "key", None), str) and getattr(t, "dtype", None) in _STORAGE_OF
                and _is_int(getattr(t, "offset", None)) and isinstance(shape, tuple) and isinstance(stride, tuple)
                and all(_is_int(v) for v in (*shape, *stride))):
            raise UserError(f"{where} has a malformed storage reference, offset, shape or stride")  # e.g. BUILD
        info = self._records.get(t.key)
        if info is None:
            raise UserError(f"{where} references storage record '{_one_line(t.key, 40)}', which is missing")
        if info.compress_type != zipfile.ZIP_STORED:
            raise UserError(f"'{self.path}': storage record '{_one_line(t.key, 40)}' is compressed")
        if (len(t.stride) != len(t.shape) or t.offset < 0 or any(not 0 <= d < _MAX_DIM for d in t.shape)
                or any(s < 0 for s in t.stride)):
            raise UserError(f"{where} has offset {t.offset}, shape {_one_line(list(t.shape), 60)} and stride "
                            f"{_one_line(list(t.stride), 60)}")
        if math.prod(max(d, 1) for d in t.shape) >= _MAX_DIM:
            raise UserError(f"{where} has a shape too large to exist: {_one_line(list(t.shape), 60)}")
        if 0 not in t.shape:
            last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride, strict=True))
            if (last + 1) * element_size(t.dtype) > info.file_size:
                raise UserError(f"{where} reaches byte {(last + 1) * element_size(t.dtype)} of storage record "
                                f"'{_one_line(t.key, 40)}', which holds {info.file_size}")

    def _data_start(self, key: str) -> int:
        start = self._offsets.get(key)
        if start is None:
            info = self._records.get(key)
            if info is None:
                raise UserError(f"'{self.path}' is corrupt: storage record '{key}' is missing")
            if info.compress_type != zipfile.ZIP_STORED:
                raise UserError(f"'{self.path}': storage record '{key}' is compressed")
            try:
                with open_input(self.path) as f:
                    f.seek(info.header_offset)
                    header = f.read(30)
                    size = f.seek(0, io.SEEK_END)
            except OSError as exc:
                raise UserError(f"cannot read '{self.path}': {exc.strerror or exc}") from exc
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise UserError(f"'{self.path}' is corrupt: no zip header for storage record '{key}'")
            n, m = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + n + m
            if start + info.file_size > size:
                raise UserError(f"'{self.path}' is truncated: storage record '{key}' ends past the end of the file")
            self._offsets[key] = start
        return start

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor."""
        t = self.tensors[name]
        return self.read_rows(name, 0, t.shape[0]) if t.shape else self._read_flat(t, t.offset, 1).reshape(())

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of dim 0, reading only their bytes when the tensor is contiguous."""
        t = self.tensors[name]
        rest = t.shape[1:]
        row = math.prod(rest)
        if t.contiguous:
            return self._read_flat(t, t.offset + start * row, (stop - start) * row).reshape(stop - start, *rest)
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride, strict=True) if n > 0)
        flat = self._read_flat(t, t.offset, span)
        return flat.as_strided(t.shape, t.stride)[start:stop].clone()

    def read_row_bytes(self, name: str, start: int, stop: int) -> ByteRows | None:
        """Rows ``start:stop`` of dim 0 as bytes (no torch), or None for a tensor not stored contiguously."""
        span = self.span(name, start, stop)
        if span is None:
            return None
        with open_input(self.path) as f:
            return rowbytes.read(f, span.offset, span.shape, span.dtype,
                                 f"'{self.path}' is truncated: record '{self.tensors[name].key}' ends early")

    def span(self, name: str, start: int, stop: int) -> FileSpan | None:
        """Where rows ``start:stop`` of dim 0 lie in the file (a contiguous tensor), or None."""
        t = self.tensors[name]
        if not t.contiguous or not t.shape:
            return None
        rest = tuple(t.shape[1:])
        row, size = math.prod(rest), element_size(t.dtype)
        info = self._records.get(t.key)
        if info is None or (t.offset + stop * row) * size > info.file_size:
            raise UserError(f"'{self.path}' is truncated or corrupt: tensor bytes outside record '{t.key}'")
        return FileSpan(self.path, self._data_start(t.key) + (t.offset + start * row) * size, (stop - start, *rest),
                        t.dtype)

    def _read_flat(self, t: LazyTensor, offset: int, count: int) -> torch.Tensor:
        if count == 0:
            return torch.empty(0, dtype=to_torch(t.dtype))
        size = element_size(t.dtype)
        info = self._records.get(t.key)
        if info is None or (offset + count) * size > info.file_size:
            raise UserError(f"'{self.path}' is truncated or corrupt: tensor bytes outside record '{t.key}'")
        with open_input(self.path) as f:
            return read_exact(f, self._data_start(t.key) + offset * size, count * size,
                              f"'{self.path}' is truncated: record '{t.key}' ends early").view(to_torch(t.dtype))


# ------------------------------------------------------------------------------------------ folders
@dataclass
class RankLayout:
    """What the folders of a Megatron checkpoint say, plus how ambiguities were settled."""

    iter_dir: Path
    iteration: str  # "release" or the number
    tp: int
    pp: int
    ep: int
    folders: dict[tuple[int, int, int], Path]  # (tp, pp, ep) -> rank folder
    notes: list[str] = field(default_factory=list)

    def file(self, tp: int, pp: int, ep: int) -> Path:
        return self.folders[(tp, pp, ep)] / RANK_FILE


def read_tracker(path: Path) -> str:
    """The text of ``latest_checkpointed_iteration.txt``: ``release`` or an iteration number (checked)."""
    try:
        with open_input(path) as f:
            raw = f.read(_MAX_TRACKER + 1)
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    if len(raw) > _MAX_TRACKER:
        raise UserError(f"'{path}' is corrupt: over {_MAX_TRACKER} bytes, not an iteration tracker")
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise UserError(f"'{path}' is corrupt: not plain text (byte {exc.start} is 0x{raw[exc.start]:02x})") from exc
    if text != "release" and not re.fullmatch(r"[0-9]{1,18}", text):
        raise UserError(f"'{path}' holds {_one_line(text, 40, quote=True)}, neither 'release' nor an iteration number")
    return text


def find_iteration_dir(root: Path) -> tuple[Path, str, list[str]]:
    """The folder holding ``mp_rank_*`` (via the tracker file, or ``root`` itself), and notes."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"'{root}' does not exist or is not a folder")
    if any(root.glob("mp_rank_*")):
        return root, root.name.removeprefix("iter_"), [f"rank folders found directly in '{root}'"]
    tracker = root / TRACKER
    if tracker.is_file():
        text = read_tracker(tracker)
        sub = "release" if text == "release" else iteration_folder(int(text))
        if not (root / sub).is_dir():
            raise UserError(f"'{tracker}' points to '{sub}', which does not exist in '{root}'")
        return root / sub, text, [f"{TRACKER} says '{text}' -> {sub}/"]
    candidates = sorted(p for p in root.iterdir() if p.is_dir() and (p.name == "release" or p.name.startswith("iter_")))
    if not candidates:
        raise UserError(f"'{root}' is not a Megatron checkpoint: no {TRACKER}, release/, iter_*/ or mp_rank_*/")
    pick = candidates[-1] if candidates[-1].name != "release" or len(candidates) == 1 else candidates[-2]
    return pick, pick.name.removeprefix("iter_"), [f"no {TRACKER}: using {pick.name}/ (latest found)"]


def scan_ranks(root: Path, resolve_two_part: Callable[[dict[tuple[int, int], Path]], str] | None = None,
               hint: str | None = None) -> RankLayout:
    """Read TP/PP/EP from the ``mp_rank_*`` folder names.

    ``mp_rank_XX_YYY`` is ambiguous (PP rank, or EP rank without PP): ``hint`` ('pp'/'ep') settles it, else
    ``resolve_two_part`` (given {(tp, second): folder}) returns 'pp' or 'ep' from the tensors it holds.
    """
    iter_dir, iteration, notes = find_iteration_dir(root)
    note_input(iter_dir)
    parsed: dict[tuple[int, ...], Path] = {}
    for p in sorted(iter_dir.iterdir()):
        m = _FOLDER_RE.match(p.name)
        if m and p.is_dir():
            parsed[tuple(int(g) for g in m.groups() if g is not None)] = p
    if not parsed:
        raise UserError(f"'{iter_dir}' has no mp_rank_* folders")
    arity = {len(k) for k in parsed}
    if len(arity) != 1:
        raise UserError(f"'{iter_dir}' mixes rank folder name styles (e.g. mp_rank_00 and mp_rank_00_000)")
    n = arity.pop()
    if n == 1:
        folders = {(k[0], 0, 0): p for k, p in parsed.items()}
    elif n == 3:
        folders = {(k[0], k[1], k[2]): p for k, p in parsed.items()}
        notes.append("folder names carry tp, pp and ep ranks")
    else:
        kind = hint
        if kind is None and resolve_two_part is not None:
            kind = resolve_two_part({(k[0], k[1]): p for k, p in parsed.items()})
        if kind not in ("pp", "ep"):
            raise UserError(f"'{iter_dir}': mp_rank_XX_YYY may mean a pipeline or an expert rank; cannot tell")
        notes.append(f"mp_rank_XX_YYY read as tp + {kind} rank")
        folders = {((k[0], k[1], 0) if kind == "pp" else (k[0], 0, k[1])): p for k, p in parsed.items()}
    tp = 1 + max(k[0] for k in folders)
    pp = 1 + max(k[1] for k in folders)
    ep = 1 + max(k[2] for k in folders)
    for t in range(tp):
        for s in range(pp):
            for e in range(ep):
                if (t, s, e) not in folders:
                    raise UserError(f"'{iter_dir}' lacks the folder {rank_folder(t, s, e, pp, ep)} "
                                    f"(found TP={tp} PP={pp} EP={ep} from the others)")
                if not (folders[(t, s, e)] / RANK_FILE).is_file():
                    raise UserError(f"missing rank file '{folders[(t, s, e)] / RANK_FILE}'")
    notes.append(f"found {len(folders)} rank folders: TP={tp} PP={pp} EP={ep}")
    return RankLayout(iter_dir, iteration, tp, pp, ep, folders, notes)


def write_tracker(root: Path, iteration: int | None) -> None:
    """Write ``latest_checkpointed_iteration.txt``."""
    write_bytes(Path(root) / TRACKER, ("release" if iteration is None else str(iteration)).encode())
