"""verl FSDP checkpoints (``global_step_N/actor``) as a :class:`~vlconvert.sources.base.Source`.

verl's FSDP checkpoint manager writes, per rank R of W, ``model_world_size_W_rank_R.pt`` (a ``torch.save``
of the FSDP2 model's sharded ``state_dict()``: DTensors sharded on dim 0), ``optim_world_size_W_rank_R.pt``
and ``extra_state_world_size_W_rank_R.pt`` beside them, and ``huggingface/`` with config and tokenizer.

Only the model files are opened, with the allowlist unpickler of :mod:`vlconvert.layouts.megatron`
extended to DTensors: a DTensor is read as inert data (its local tensor, global shape and placements),
nothing pickled is ever called, and any global outside torch's tensor and ``torch.distributed`` classes
refuses the file. Tensors are reassembled by concatenating the rank shards along dim 0 (uneven shards
included); optimizer and extra state are never read; assets come from ``huggingface/``.
"""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vlconvert import buffers
from vlconvert.dtypes import DType, to_torch
from vlconvert.errors import UsageError, UserError
from vlconvert.errors import one_line as _one_line
from vlconvert.layouts.filebytes import FileSpan
from vlconvert.layouts.megatron import LazyTensor, Opaque, RankFile, _RestrictedUnpickler, check_pickle
from vlconvert.lazy import torch
from vlconvert.models.base import Skeleton
from vlconvert.models.megatron_table import Src
from vlconvert.publish import note_input
from vlconvert.rowbytes import ByteRows
from vlconvert.sources.base import Source, read_spans, skeleton_for
from vlconvert.sources.dcp import map_dcp_keys, stored_expert_layout

MODEL_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
ASSETS = "huggingface"


def is_verl_folder(path: Path) -> bool:
    """Whether ``path`` holds verl model rank files (metadata only)."""
    return any(MODEL_FILE.match(p.name) for p in path.glob("model_world_size_*_rank_*.pt"))


# ------------------------------------------------------------------------------------ safe unpickling
class _WrapperSubclass:
    """Stands for ``torch._utils._rebuild_wrapper_subclass``: never called, only recognised."""


class _DTensorType:
    """Stands for the ``DTensor`` class in a pickle."""


@dataclass(frozen=True)
class DTensorRef:
    """A DTensor known by data only: its global shape, its local shard and its placements."""

    shape: tuple[int, ...]
    local: LazyTensor
    placements: tuple[str, ...]  # 'shard0', 'replicate', or the class name of anything else


def _state(value: Any) -> dict:
    """A pickled object state as one dict: ``{...}``, or ``(dict or None, slots dict or None)``."""
    if isinstance(value, dict):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(v is None or isinstance(v, dict) for v in value):
        return {**(value[0] or {}), **(value[1] or {})}
    return {}


def _placement(p: Any) -> str:
    name = getattr(p, "qualname", "?").rsplit(".", 1)[-1]
    state = _state(getattr(p, "state", None))
    if name == "Shard" and state.get("dim") == 0:
        return "shard0"
    if name == "Replicate":
        return "replicate"
    return name + (f"(dim={state.get('dim')})" if "dim" in state else "")


def _rebuild_from_type(func: Any, type_: Any, args: Any, state: Any) -> DTensorRef:
    if func is not _WrapperSubclass or type_ is not _DTensorType:
        raise pickle.UnpicklingError("a tensor subclass other than DTensor")
    state = _state(state)
    if not (isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], (tuple, list))
            and all(isinstance(d, int) for d in args[2]) and isinstance(state.get("_local_tensor"), LazyTensor)):
        raise pickle.UnpicklingError("a DTensor without a local tensor or a global shape")
    placements = _state(getattr(state.get("_spec"), "state", None)).get("placements")
    if not isinstance(placements, tuple):
        raise pickle.UnpicklingError("a DTensor without placements")
    return DTensorRef(tuple(int(d) for d in args[2]), state["_local_tensor"], tuple(_placement(p) for p in placements))


def _layout(name: str) -> str:
    if name != "torch.strided":
        raise pickle.UnpicklingError(f"tensor layout {name!r}")
    return name


_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor", "torch.distributed.tensor._api",
                    "torch.distributed._tensor.api")


class _VerlUnpickler(_RestrictedUnpickler):
    """The Megatron allowlist plus DTensor (as data); other ``torch.distributed`` classes (device mesh,
    placements, specs) become inert :class:`Opaque` records; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return _rebuild_from_type
        if (module, name) == ("torch._utils", "_rebuild_wrapper_subclass"):
            return _WrapperSubclass
        if module in _DTENSOR_MODULES and name == "DTensor":
            return _DTensorType
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout
        if module.startswith("torch.distributed.") or (module, name) == ("torch", "device"):
            # a DTensor's device (and mesh) are kept as inert records: reading one needs no torch
            return type(name, (Opaque,), {"qualname": f"{module}.{name}"})
        if module == "torch" or (module, name) in {("torch._utils", "_rebuild_tensor_v2"),
                                                    ("torch._utils", "_rebuild_parameter"),
                                                    ("collections", "OrderedDict"), ("_codecs", "encode")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which is not part of a state dict")


class VerlRankFile(RankFile):
    """One ``model_world_size_W_rank_R.pt``: its DTensors' local shards read lazily, nothing else."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        raw = self._read_data_pkl()
        try:
            check_pickle(raw)
            payload = _VerlUnpickler(io.BytesIO(raw)).load()
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - hostile pickles raise anything
            raise UserError(f"'{self.path}' is refused: {_one_line(exc, 120)} (nothing in it was run)") from exc
        if not isinstance(payload, dict):
            raise UserError(f"'{self.path}' does not hold a model state dict ({type(payload).__name__})")
        self.tensors: dict[str, LazyTensor] = {}
        self.dtensors: dict[str, DTensorRef | None] = {}
        for name, value in payload.items():
            if not isinstance(name, str):
                raise UserError(f"'{self.path}': a state dict key is not a string ({_one_line(name, 40)})")
            if isinstance(value, DTensorRef):
                self.tensors[name], self.dtensors[name] = value.local, value
            elif isinstance(value, LazyTensor):
                self.tensors[name], self.dtensors[name] = value, None
            else:
                raise UserError(f"'{self.path}': entry '{_one_line(name, 80)}' is not a tensor or DTensor "
                                f"({_one_line(value, 60)})")
            self._check_tensor(name, self.tensors[name])
        self.ignored: list[str] = []
        self.meta, self.args = None, {}
        self._offsets: dict[str, int] = {}


# --------------------------------------------------------------------------------------------- source
@dataclass
class _Piece:
    rank: int
    start: int  # first global row
    stop: int


class VerlSource(Source):
    """A verl FSDP checkpoint folder (the ``actor`` folder, or a ``global_step_N`` folder holding one)."""

    layout = "verl"
    dtype_from_config = True

    def __init__(self, folder: str | Path, config: str | Path | dict | None = None,
                 skeleton: Skeleton | None = None, assets_dir: str | Path | None = None):
        folder = Path(folder)
        if not is_verl_folder(folder) and is_verl_folder(folder / "actor"):
            folder = folder / "actor"
        self.folder = folder
        hf = folder / ASSETS
        self.assets: Path | None = note_input(hf) if (hf / "config.json").is_file() else None
        if skeleton is None:
            skeleton = skeleton_for(folder, config, assets_dir if assets_dir is not None else self.assets)
        if skeleton is None:
            raise UsageError(f"'{folder}' is a verl checkpoint without {ASSETS}/config.json: pass --assets-dir")
        self.skeleton = skeleton
        self.notes: list[str] = []
        self.files = self._rank_files()
        self.ranks = [VerlRankFile(p) for p in self.files]
        self._pieces: dict[str, list[_Piece]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for key in self.ranks[0].tensors:
            self._assemble(key)
        shim = SimpleNamespace(tensors=self._shapes, non_tensors=[])
        self.keys = map_dcp_keys(shim, set(skeleton.tensors))  # type: ignore[arg-type]
        tied = skeleton.info.tied
        self._mapped = {n: k for n, k in self.keys.mapped.items() if not (tied and n == skeleton.family.output)}
        self._expert_cache: tuple[Src, torch.Tensor] | None = None
        others = len(list(folder.glob("optim_world_size_*.pt"))) + len(list(folder.glob("extra_state_*.pt")))
        self.notes.append(f"verl checkpoint: {len(self.files)} model rank files reassembled"
                          + (f"; {others} optimizer/extra-state files not read" if others else ""))

    def _rank_files(self) -> list[Path]:
        found: dict[int, tuple[int, Path]] = {}
        for p in self.folder.glob("model_world_size_*_rank_*.pt"):
            m = MODEL_FILE.match(p.name)
            if m:
                found[int(m[2])] = (int(m[1]), p)
        worlds = {w for w, _ in found.values()}
        if len(worlds) != 1:
            raise UserError(f"'{self.folder}' mixes model files of world sizes {sorted(worlds)}: keep one run's files")
        world = worlds.pop()
        missing = [r for r in range(world) if r not in found]
        if missing or len(found) != world:
            raise UserError(f"'{self.folder}' lacks model_world_size_{world}_rank_{missing[0] if missing else '?'}.pt "
                            f"({len(found)} of {world} rank files)")
        return [found[r][1] for r in range(world)]

    def _assemble(self, key: str) -> None:
        """Where the rows of ``key`` live: one piece per rank for a dim-0 shard, rank 0 for the rest."""
        refs = []
        for rank in self.ranks:
            if key not in rank.tensors:
                raise UserError(f"'{rank.path}' lacks '{key}', which '{self.ranks[0].path}' holds")
            refs.append(rank.dtensors[key])
        first = refs[0]
        local = self.ranks[0].tensors[key]
        if first is None or all(p == "replicate" for p in first.placements):
            self._shapes[key] = first.shape if first is not None else local.shape
            self._pieces[key] = [_Piece(0, 0, self._shapes[key][0] if self._shapes[key] else 1)]
            return
        if first.placements != ("shard0",):
            raise UserError(f"'{key}' is sharded as {list(first.placements)} in '{self.ranks[0].path}': only "
                            "FSDP's Shard(0) over one mesh dimension is supported")
        pieces, row = [], 0
        for r, (rank, ref) in enumerate(zip(self.ranks, refs, strict=True)):
            shard = rank.tensors[key].shape
            if ref is None or ref.shape != first.shape or tuple(shard[1:]) != tuple(first.shape[1:]):
                raise UserError(f"'{rank.path}': '{key}' is {list(shard)} of {list(ref.shape) if ref else '?'}, "
                                f"which does not fit {list(first.shape)} sharded on dim 0")
            pieces.append(_Piece(r, row, row + shard[0]))
            row += shard[0]
        if row != first.shape[0]:
            raise UserError(f"'{key}': the rank shards hold {row} rows, its global shape {list(first.shape)}")
        self._pieces[key], self._shapes[key] = pieces, first.shape

    # ------------------------------------------------------------------------------- Source interface
    def names(self) -> list[str]:
        return [n for n in self.skeleton.tensors if n in self._mapped]

    def extra_names(self) -> list[str]:
        return list(self.keys.unexpected)

    def key(self, name: str) -> str:
        return self._mapped.get(name, name)

    def spec(self, name: str) -> tuple[tuple[int, ...], DType]:
        key = self.key(name)
        dtype = self.ranks[0].tensors[key].dtype
        if name in self._mapped and self.skeleton.family.is_expert(name):
            return self.skeleton.shape_in(name, "released"), dtype
        return self._shapes[key], dtype

    def _stored_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        shape = self._shapes[key]
        if not shape:
            return self.ranks[0].read(key)
        parts = []
        for piece in self._pieces[key]:
            lo, hi = max(start, piece.start), min(stop, piece.stop)
            if lo < hi:
                parts.append(self.ranks[piece.rank].read_rows(key, lo - piece.start, hi - piece.start))
        if not parts:
            return torch.empty((0, *shape[1:]), dtype=to_torch(self.ranks[0].tensors[key].dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _expert_layout(self, name: str) -> tuple[str, tuple[int, ...] | None]:
        """How fused expert tensor ``name`` is stored: its orientation, and a 3-D view for a 2-D one (not read)."""
        return stored_expert_layout(name, self._shapes[self.key(name)], self.skeleton)

    def row_span(self, src: Src, start: int, stop: int) -> FileSpan | None:
        key = self.key(src.hf)
        if src.expert is None:
            return self._key_span(key, start, stop)  # stored as the canonical tensor, cut on dim 0
        if self._expert_layout(src.hf) != ("transformers5", None):  # stored [in, out]: Megatron's rows are columns
            return None
        span = self._key_span(key, src.expert, src.expert + 1)  # one expert: never cut between shards
        return None if span is None else span.reshape(span.shape[1:]).rows(start, stop)

    def _key_span(self, key: str, start: int, stop: int) -> FileSpan | None:
        """Where rows ``start:`` (up to ``stop``, or where the rank's shard ends) of stored tensor ``key`` lie."""
        if not self._shapes[key]:
            return None
        for piece in self._pieces[key]:
            if piece.start <= start < piece.stop:
                return self.ranks[piece.rank].span(key, start - piece.start, min(stop, piece.stop) - piece.start)
        return None

    def row_bytes(self, src: Src, start: int, stop: int) -> ByteRows | None:
        if src.expert is not None and self._expert_layout(src.hf) == ("released", None):  # stored [in, out]
            return self._turned_expert_rows(src, start, stop)
        return super().row_bytes(src, start, stop)  # the rows' spans, shard after shard

    def expert_bytes(self, name: str, expert: int, layout: str) -> ByteRows | None:
        if layout == "released" and self._expert_layout(name) == ("released", None):
            return self._stored_expert_bytes(name, expert)
        return super().expert_bytes(name, expert, layout)  # transformers5: the rows' spans

    def _stored_expert_bytes(self, name: str, expert: int) -> ByteRows | None:
        key = self.key(name)
        block = read_spans(lambda r: self._key_span(key, r, expert + 1), expert, expert + 1)
        return None if block is None else block.reshape(block.shape[1:])

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        key = self.key(src.hf)
        if src.expert is None:
            return self._stored_rows(key, start, stop)
        if self._expert_cache is None or self._expert_cache[0] != src:
            layout, view = self._expert_layout(src.hf)
            if view is not None:
                raise UserError(f"'{key}' is a 2-D view of fused experts: not supported in a verl checkpoint")
            block = self._stored_rows(key, src.expert, src.expert + 1)[0]
            self._expert_cache = (src, buffers.transposed(block) if layout == "released" else block)
        return self._expert_cache[1][start:stop]

    def close(self) -> None:
        self._expert_cache = None
        super().close()
