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

This module knows files, not model families; :class:`MegatronCheckpoint` (the canonical reader) lives in
:mod:`vlconvert.megatron_convert` and is re-exported here.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import math
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlconvert.dtypes import element_size
from vlconvert.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
META_KEY = "vlconvert"  # extra top-level key with plain-data facts (Megatron ignores unknown keys)
_ALIGN = 64
_DATE = (1980, 1, 1, 0, 0, 0)
_FOLDER_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")

_STORAGE_OF: dict[torch.dtype, str] = {
    torch.float32: "FloatStorage", torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage",
    torch.float64: "DoubleStorage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage", torch.bool: "BoolStorage",
    torch.float8_e4m3fn: "Float8_e4m3fnStorage", torch.float8_e5m2: "Float8_e5m2Storage",
}
_DTYPE_OF = {v: k for k, v in _STORAGE_OF.items()}


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
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly like a contiguous CPU tensor that torch.save would write."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, torch.Size(self.shape), stride, False,
                                                 collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):  # noqa: D401 - pickle hook
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, _STORAGE_OF[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


@dataclass(frozen=True)
class RankEntry:
    """One tensor a rank file will hold."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


def write_rank_file(path: Path, entries: list[RankEntry], produce: Callable[[int, RankEntry], torch.Tensor],
                    extra: dict | None = None, iteration: int = 0,
                    on_bytes: Callable[[int], None] | None = None) -> int:
    """Write ``model_optim_rng.pt`` holding ``{"model": {...}, "checkpoint_version": 3.0, "iteration": ...}``.

    ``produce(i, entry)`` is called once per entry, in order, and its tensor is written and dropped at
    once. ``extra`` adds plain-data top-level keys. Byte-for-byte deterministic for the same inputs.
    Returns the tensor bytes written.
    """
    path = Path(path)
    if not entries:
        raise ValueError(f"{path}: a rank file needs at least one tensor")
    for e in entries:
        if e.dtype not in _STORAGE_OF:
            raise UserError(f"dtype {e.dtype} of '{e.name}' cannot be stored in a Megatron rank file")
    model = collections.OrderedDict()
    for i, e in enumerate(entries):
        model[e.name] = _TensorRef(_StorageRef(str(i), e.dtype, math.prod(e.shape)), e.shape)
    payload: dict = {"model": model, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
    if extra:
        payload.update(extra)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(payload)
    prefix = "archive"
    digest = hashlib.sha1(buf.getvalue()).hexdigest()
    written = 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, data in ((f"{prefix}/data.pkl", buf.getvalue()), (f"{prefix}/.format_version", b"1"),
                           (f"{prefix}/.storage_alignment", b"64"), (f"{prefix}/byteorder", b"little")):
            zf.writestr(zipfile.ZipInfo(name, _DATE), data)
        for i, e in enumerate(entries):
            tensor = produce(i, e)
            if tuple(tensor.shape) != e.shape or tensor.dtype != e.dtype:
                raise RuntimeError(f"{e.name}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                                   f"planned {e.shape} {e.dtype}")
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            info = zipfile.ZipInfo(f"{prefix}/data/{i}", _DATE)
            info.file_size = e.nbytes
            zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT
            base = zf.start_dir + 30 + len(info.filename.encode()) + (20 if zip64 else 0) + 4
            pad = -base % _ALIGN
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' padding, as torch does
            with zf.open(info, "w") as out:
                if zf.fp.tell() % _ALIGN:  # pragma: no cover - guards the header arithmetic above
                    raise RuntimeError("storage record is not 64-byte aligned")
                out.write(memoryview(data))
            written += e.nbytes
            if on_bytes:
                on_bytes(e.nbytes)
            del tensor, data
        zf.writestr(zipfile.ZipInfo(f"{prefix}/version", _DATE), b"3\n")
        zf.writestr(zipfile.ZipInfo(f"{prefix}/.data/serialization_id", _DATE), digest.encode())
    return written


# --------------------------------------------------------------------------------------------- reader
@dataclass(frozen=True)
class LazyTensor:
    """A tensor inside a rank file, known by metadata only."""

    key: str
    dtype: torch.dtype
    offset: int  # in elements, into the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def contiguous(self) -> bool:
        expect = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return all(s == e for s, e, n in zip(self.stride, expect, self.shape, strict=True) if n > 1)


class _StorageType:
    def __init__(self, dtype: torch.dtype):
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


def _rebuild_tensor(storage, offset, size, stride, *_rest) -> LazyTensor:
    if not isinstance(storage, tuple) or storage[0] != "storage":
        raise pickle.UnpicklingError("tensor without a storage record")
    return LazyTensor(storage[1], storage[2], int(offset), tuple(int(s) for s in size),
                      tuple(int(s) for s in stride))


def _rebuild_parameter(data, *_rest):
    return data


_SAFE_TORCH = {"Size": torch.Size, "device": torch.device}


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
            if name in _SAFE_TORCH:
                return _SAFE_TORCH[name]
            if isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        return type(name, (Opaque,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return ("storage", str(pid[2]), pid[1].dtype)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unsupported bytes encoding {encoding}")
    return text.encode("latin1")


class RankFile:
    """One ``model_optim_rng.pt`` read lazily: ``model`` keys and shapes at open, bytes on request."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
                pkl = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
                if len(pkl) != 1:
                    raise UserError(f"'{self.path}' is not a torch zip checkpoint (no data.pkl)")
                prefix = pkl[0].filename[: -len("data.pkl")]
                raw = zf.read(pkl[0])
                self._records = {i.filename[len(prefix) + 5:]: i for i in infos
                                 if i.filename.startswith(prefix + "data/")}
        except zipfile.BadZipFile as exc:
            raise UserError(f"'{self.path}' is not a zip-format torch checkpoint (legacy tar/pickle files "
                            "are not supported: re-save it with a current torch)") from exc
        except FileNotFoundError as exc:
            raise UserError(f"missing rank file '{self.path}'") from exc
        try:
            payload = _RestrictedUnpickler(io.BytesIO(raw)).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
            raise UserError(f"'{self.path}' has a data.pkl vlconvert will not unpickle: {exc}") from exc
        if not isinstance(payload, dict):
            raise UserError(f"'{self.path}' does not hold a checkpoint dict")
        if "model" not in payload:
            vpp = sorted(k for k in payload if isinstance(k, str) and re.fullmatch(r"model\d+", k))
            if vpp:
                raise UserError(f"'{self.path}' holds virtual pipeline chunks ({', '.join(vpp)}): "
                                "VPP checkpoints are not supported; convert with one model chunk per stage")
            raise UserError(f"'{self.path}' has no 'model' entry: is it a Megatron model checkpoint?")
        model = payload["model"]
        self.tensors: dict[str, LazyTensor] = {}
        self.ignored: list[str] = []
        for name, value in model.items():
            if isinstance(value, LazyTensor):
                self.tensors[name] = value
            elif name.endswith("_extra_state") or value is None:
                self.ignored.append(name)
            else:
                raise UserError(f"'{self.path}': model entry '{name}' is not a tensor ({type(value).__name__})")
        self.checkpoint_version = payload.get("checkpoint_version")
        self.iteration = payload.get("iteration")
        meta = payload.get(META_KEY)
        self.meta: dict | None = meta if isinstance(meta, dict) else None
        args = payload.get("args")
        self.args: dict = vars(args) if isinstance(args, argparse.Namespace) else {}
        self._offsets: dict[str, int] = {}

    def _data_start(self, key: str) -> int:
        start = self._offsets.get(key)
        if start is None:
            info = self._records.get(key)
            if info is None:
                raise UserError(f"'{self.path}' is corrupt: storage record '{key}' is missing")
            if info.compress_type != zipfile.ZIP_STORED:
                raise UserError(f"'{self.path}': storage record '{key}' is compressed")
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                header = f.read(30)
            n, m = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + n + m
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

    def _read_flat(self, t: LazyTensor, offset: int, count: int) -> torch.Tensor:
        out = torch.empty(count, dtype=t.dtype)
        if count == 0:
            return out
        size = element_size(t.dtype)
        info = self._records.get(t.key)
        if info is None or (offset + count) * size > info.file_size:
            raise UserError(f"'{self.path}' is truncated or corrupt: tensor bytes outside record '{t.key}'")
        view = out.view(torch.uint8).numpy()
        mv = memoryview(view)
        got = 0
        with open(self.path, "rb") as f:
            f.seek(self._data_start(t.key) + offset * size)
            while got < view.nbytes:
                n = f.readinto(mv[got:])
                if not n:
                    raise UserError(f"'{self.path}' is truncated: record '{t.key}' ends early")
                got += n
        return out


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


def find_iteration_dir(root: Path) -> tuple[Path, str, list[str]]:
    """The folder holding ``mp_rank_*`` (via the tracker file, or ``root`` itself), and notes."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"'{root}' does not exist or is not a folder")
    if any(root.glob("mp_rank_*")):
        return root, root.name.removeprefix("iter_"), [f"rank folders found directly in '{root}'"]
    tracker = root / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        sub = "release" if text == "release" else None
        if sub is None:
            try:
                sub = iteration_folder(int(text))
            except ValueError as exc:
                raise UserError(f"'{tracker}' holds '{text}', neither 'release' nor an iteration number") from exc
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
    (Path(root) / TRACKER).write_text("release" if iteration is None else str(iteration))


def __getattr__(name: str):
    if name == "MegatronCheckpoint":  # lazy: it needs the model mapping, which imports this module
        from vlconvert.megatron_convert import MegatronCheckpoint

        return MegatronCheckpoint
    raise AttributeError(name)
