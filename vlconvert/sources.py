"""Every checkpoint layout read as one thing: canonical tensors, row by row (one reader per format).

Canonical = the Hugging Face on-disk names (``model.language_model.*``, ``model.visual.*``,
``lm_head.weight`` only when untied) with MoE experts in the **released** orientation
(``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]).

A :class:`Source` answers from metadata alone which canonical tensors exist (:meth:`Source.names`,
:meth:`Source.spec`), and reads any part of them without reading more than it needs:

- ``rows(Src(name), a, b)``: rows ``a:b`` of a canonical tensor;
- ``rows(Src(name, e), a, b)``: rows of expert ``e`` of a fused expert tensor, as Megatron holds it
  ([out, in], i.e. the released per-expert matrix transposed);
- ``cols(src, a, b)``: a column block (row-parallel TP shards).

Writers (:mod:`vlconvert.engine`) only ever talk to this interface, so any layout converts to any other.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlconvert.errors import UserError
from vlconvert.layouts import megatron as mlay
from vlconvert.layouts.dcp import Chunk, DCPReader, is_row_slab
from vlconvert.layouts.hf import HFCheckpoint, parse_size, plan_shards, resolve_source
from vlconvert.models.qwen3vl import (
    EMBED,
    LM_HEAD,
    Skeleton,
    build_skeleton,
    expert_layout_of,
    is_expert,
    load_config,
    read_config_json,
)
from vlconvert.models.qwen3vl_megatron import (
    MLM,
    MegatronPlan,
    RankTensor,
    Src,
    plan_megatron_ranks,
    source_shape,
)

_BLOCK = 64 * 2**20  # bytes per row block when a column block is gathered
WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module", "module"})
NON_MODEL_ROOTS = frozenset({"optimizer", "optim", "optimizers", "lr_scheduler", "scheduler", "dataloader",
                             "train_state", "extra_state", "rng_state", "rng", "args", "step"})
_LAYER_NAME = re.compile(rf"^{re.escape(MLM)}decoder\.layers\.(\d+)\.")
DEFAULT_GROUP_BYTES = parse_size("5GB")  # how non-HF sources are grouped, as an HF writer would shard them


def detect_layout(path: str | Path) -> str:
    """'hf', 'dcp' or 'megatron' from the files a folder holds (metadata only); 'unknown' otherwise."""
    path = Path(path)
    if (path / ".metadata").is_file() or any(path.glob("*.distcp")):
        return "dcp"
    if (path / mlay.TRACKER).is_file() or any(path.glob("mp_rank_*")) \
            or (path / "release").is_dir() or any(path.glob("iter_*")):
        return "megatron"
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return "hf"
    return "unknown"


def preview(keys: list[str]) -> str:
    """``'a' and 3 more``."""
    return f"'{keys[0]}'" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")


class Source:
    """A checkpoint seen as canonical tensors (see the module docstring). Subclasses fill in the rest."""

    layout = ""
    folder: Path
    skeleton: Skeleton | None
    notes: list[str]

    def names(self) -> list[str]:
        """Canonical names of every model tensor held (skeleton order when a skeleton is known)."""
        raise NotImplementedError

    def extra_names(self) -> list[str]:
        """Tensors held that the model does not have (their own names)."""
        return []

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Canonical shape and stored dtype of ``name``, from metadata only."""
        raise NotImplementedError

    def dtype(self, src: Src) -> torch.dtype:
        """Stored dtype of a source matrix."""
        return self.spec(src.hf)[1]

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a source matrix (an expert in Megatron's [out, in] orientation)."""
        raise NotImplementedError

    def cols(self, src: Src, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of a 2-D source matrix, gathered in row blocks."""
        shape = self.matrix_shape(src)
        out = torch.empty((shape[0], stop - start), dtype=self.dtype(src))
        row_bytes = max(1, shape[1] * out.element_size())
        step = max(1, _BLOCK // row_bytes)
        for a in range(0, shape[0], step):
            b = min(shape[0], a + step)
            out[a:b] = self.rows(src, a, b)[:, start:stop]
        return out

    def matrix_shape(self, src: Src) -> tuple[int, ...]:
        """Shape of a source matrix (a whole tensor, or one expert as [out, in])."""
        shape = self.spec(src.hf)[0]
        return shape if src.expert is None else (shape[2], shape[1])

    def read_expert(self, name: str, expert: int) -> torch.Tensor:
        """Expert ``expert`` of ``name`` in the released orientation ([H, 2I] or [I, H])."""
        src = Src(name, expert)
        return self.rows(src, 0, self.matrix_shape(src)[0]).t().contiguous()

    def read(self, name: str) -> torch.Tensor:
        """The whole canonical tensor ``name``."""
        shape = self.spec(name)[0]
        if is_expert(name):
            return torch.stack([self.read_expert(name, e) for e in range(shape[0])])
        return self.rows(Src(name), 0, shape[0]) if shape else self.rows(Src(name), 0, 1)

    def nbytes(self, name: str) -> int:
        """Stored bytes of ``name``."""
        shape, dtype = self.spec(name)
        n = 1
        for d in shape:
            n *= d
        return n * torch.empty((), dtype=dtype).element_size()

    def location(self, name: str) -> tuple[int, int]:
        """(group, position) of ``name`` in the best order to read it; writers that keep the source's
        grouping (DCP data files) use the group. Non-HF sources group as an HF writer would shard."""
        if not hasattr(self, "_locations"):
            names = self.skeleton.hf_keys() if self.skeleton is not None else self.names()
            held = set(self.names())
            ordered = [n for n in names if n in held]
            from vlconvert.layouts.hf import PlannedTensor

            planned = [PlannedTensor(n, self.spec(n)[1], tuple(self.spec(n)[0])) for n in ordered]
            self._locations = {t.name: (g, i) for g, shard in enumerate(plan_shards(planned, DEFAULT_GROUP_BYTES))
                               for i, t in enumerate(shard)}
        return self._locations[name]

    def close(self) -> None:
        """Release open files."""


def _skeleton_for(folder: Path, config: str | Path | dict | None, assets_dir: str | Path | None) -> Skeleton | None:
    if config is None and assets_dir is not None and (Path(assets_dir) / "config.json").is_file():
        config = Path(assets_dir) / "config.json"
    if config is None and (folder / "config.json").is_file():
        config = folder / "config.json"
    return build_skeleton(config) if config is not None else None


# ---------------------------------------------------------------------------------------------- HF
class HFSource(Source):
    """A Hugging Face safetensors folder. Its names are canonical; experts may be stored either way
    (transformers 5 ``save_pretrained`` writes [E, 2I, H] / [E, H, I])."""

    layout = "hf"

    def __init__(self, folder: str | Path, config: str | Path | dict | None = None,
                 skeleton: Skeleton | None = None, experts_layout: str | None = None):
        self.checkpoint = HFCheckpoint(folder)
        self.folder = self.checkpoint.folder
        if skeleton is None:
            if config is None and (self.folder / "config.json").is_file():
                config = self.folder / "config.json"
            skeleton = build_skeleton(config) if config is not None else None
        self.skeleton = skeleton
        self.hint = experts_layout
        if experts_layout is None and config is not None and not isinstance(config, dict):
            raw = read_config_json(config if Path(config).is_file() else Path(config) / "config.json")
            self.hint = "transformers5" if str(raw.get("transformers_version", "")).startswith("5") else "released"
        self.notes: list[str] = []
        self._layouts: dict[str, str] = {}
        self._expert_cache: tuple[Src, torch.Tensor] | None = None
        files = {f: i for i, f in enumerate(self.checkpoint.shards)}
        self._where = {n: (files[t.file], t.start) for n, t in self.checkpoint.tensors.items()}

    def names(self) -> list[str]:
        held = self.checkpoint.tensors
        if self.skeleton is None:
            return sorted(held)
        return [n for n in self.skeleton.tensors if n in held]

    def extra_names(self) -> list[str]:
        if self.skeleton is None:
            return []
        return [n for n in self.checkpoint.tensors if n not in self.skeleton.tensors]

    def location(self, name: str) -> tuple[int, int]:
        return self._where[name]

    def stored_layout(self, name: str) -> str | None:
        """'released' or 'transformers5' for an expert tensor as stored on disk; None for others."""
        if not is_expert(name):
            return None
        if name not in self._layouts:
            self._layouts[name] = self._decide(name)
        return self._layouts[name]

    def _decide(self, name: str) -> str:
        shape = self.checkpoint.tensors[name].shape
        if len(shape) != 3:
            raise UserError(f"'{self.folder}': expert tensor '{name}' has shape {list(shape)}, expected 3 dims")
        if self.skeleton is not None and name in self.skeleton.tensors:
            return expert_layout_of(name, shape, self.skeleton, self.hint)
        embed = self.checkpoint.tensors.get(EMBED)
        if embed is None:
            if self.hint:
                return self.hint
            raise UserError(f"'{self.folder}': cannot tell the orientation of '{name}' without a config "
                            "or an embedding: pass --config")
        hidden = embed.shape[1]
        h_axis = 1 if name.endswith("gate_up_proj") else 2  # where H sits in the released layout
        other = 3 - h_axis
        if shape[h_axis] == hidden and shape[other] != hidden:
            return "released"
        if shape[other] == hidden and shape[h_axis] != hidden:
            return "transformers5"
        return self.hint or "released"

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        info = self.checkpoint.tensors[name]
        shape = info.shape
        if self.stored_layout(name) == "transformers5":
            shape = (shape[0], shape[2], shape[1])
        return tuple(shape), info.dtype

    def nbytes(self, name: str) -> int:
        return self.checkpoint.tensors[name].nbytes

    def _expert(self, src: Src) -> torch.Tensor:
        if self._expert_cache is not None and self._expert_cache[0] == src:
            return self._expert_cache[1]
        block = self.checkpoint.read_rows(src.hf, src.expert, src.expert + 1)[0]
        # released stores [in, out] per expert; Megatron's orientation is [out, in]
        matrix = block.t().contiguous() if self.stored_layout(src.hf) == "released" else block
        self._expert_cache = (src, matrix)
        return matrix

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        if src.expert is not None:
            return self._expert(src)[start:stop]
        info = self.checkpoint.tensors[src.hf]
        if not info.shape:
            return self.checkpoint.read(src.hf)
        return self.checkpoint.read_rows(src.hf, start, stop)

    def cols(self, src: Src, start: int, stop: int) -> torch.Tensor:
        if src.expert is not None:
            return self._expert(src)[:, start:stop].contiguous()
        return super().cols(src, start, stop)

    def read(self, name: str) -> torch.Tensor:
        tensor = self.checkpoint.read(name)
        if self.stored_layout(name) == "transformers5":
            tensor = tensor.transpose(1, 2).contiguous()
        return tensor

    def close(self) -> None:
        self.checkpoint.close()


# --------------------------------------------------------------------------------------------- DCP
@dataclass
class DCPKeyMap:
    """How the keys of a DCP map onto a model's Hugging Face keys."""

    prefix: str
    mapped: dict[str, str] = field(default_factory=dict)  # HF key -> DCP key
    unexpected: list[str] = field(default_factory=list)
    dropped_non_model: int = 0
    dropped_non_tensor: int = 0


def strip_wrappers(key: str) -> str:
    """Remove wrapper components (``_orig_mod``, ``_checkpoint_wrapped_module``, ...) from a key."""
    return ".".join(p for p in key.split(".") if p not in WRAPPER_PARTS)


def map_dcp_keys(reader: DCPReader, known: set[str], prefix: str | None = None) -> DCPKeyMap:
    """Match DCP tensor keys to ``known`` HF keys: drop non-model state, strip wrappers, find the prefix."""
    candidates: dict[str, str] = {}
    dropped = 0
    for key in reader.tensors:
        clean = strip_wrappers(key)
        if clean.split(".", 1)[0] in NON_MODEL_ROOTS:
            dropped += 1
            continue
        candidates[clean] = key
    if prefix is None:
        votes: Counter[str] = Counter()
        for clean in candidates:
            parts = clean.split(".")
            for i in range(len(parts)):
                if ".".join(parts[i:]) in known:
                    votes[".".join(parts[:i]) + ("." if i else "")] += 1
                    break
        prefix = votes.most_common(1)[0][0] if votes else ""
    result = DCPKeyMap(prefix=prefix, dropped_non_model=dropped, dropped_non_tensor=len(reader.non_tensors))
    for clean, key in candidates.items():
        name = clean[len(prefix):] if clean.startswith(prefix) else None
        if name in known and name not in result.mapped:
            result.mapped[name] = key
        else:
            result.unexpected.append(key)
    return result


def stored_expert_layout(name: str, shape: tuple[int, ...], skeleton: Skeleton
                         ) -> tuple[str, tuple[int, ...] | None]:
    """Orientation of an expert tensor as a DCP stores it, and the 3-D shape to view it as when it is a
    2-D ``(E*in, out)`` view (MindSpeed-MM); square tensors are taken in the run-time layout."""
    if len(shape) == 3:
        return expert_layout_of(name, shape, skeleton, skeleton.runtime_experts), None
    other = "released" if skeleton.runtime_experts != "released" else "transformers5"
    for layout in (skeleton.runtime_experts, other):
        shape3 = skeleton.shape_in(name, layout)
        if tuple(shape) == (shape3[0] * shape3[1], shape3[2]):
            return layout, shape3
    raise UserError(f"'{name}' is stored with shape {list(shape)}, the config expects "
                    f"{list(skeleton.shape_in(name, skeleton.runtime_experts))} (either expert orientation)")


class DCPSource(Source):
    """A DCP folder (vlconvert's, or an FSDP2 training job's at any number of ranks).

    Optimizer and other non-model state is dropped (counted), wrapper components (``_orig_mod.``,
    ``_checkpoint_wrapped_module.``) are stripped and the key prefix is detected (``--prefix`` forces
    one). Row ranges read only the chunks they overlap (FSDP2 ``Shard(0)`` chunks are row slabs).
    """

    layout = "dcp"

    def __init__(self, folder: str | Path, config: str | Path | dict | None = None,
                 skeleton: Skeleton | None = None, assets_dir: str | Path | None = None,
                 prefix: str | None = None):
        self.folder = Path(folder)
        self.reader = DCPReader(self.folder)
        if skeleton is None:
            skeleton = _skeleton_for(self.folder, config, assets_dir)
        if skeleton is None:
            raise UserError(f"'{folder}' is a DCP without config.json: pass --assets-dir (or --config)")
        self.skeleton = skeleton
        self.keys = map_dcp_keys(self.reader, set(skeleton.tensors), prefix)
        self.notes: list[str] = []
        self.tied_lm_head_dropped = skeleton.info.tied and LM_HEAD in self.keys.mapped
        self._mapped = {n: k for n, k in self.keys.mapped.items() if not (skeleton.info.tied and n == LM_HEAD)}
        self._experts: dict[str, tuple[str, tuple[int, ...] | None]] = {}
        self._chunk_cache: tuple[Chunk, torch.Tensor] | None = None
        self._whole_cache: tuple[str, torch.Tensor] | None = None

    def names(self) -> list[str]:
        return [n for n in self.skeleton.tensors if n in self._mapped]

    def extra_names(self) -> list[str]:
        return list(self.keys.unexpected)

    def key(self, name: str) -> str:
        """The DCP key holding canonical tensor ``name`` (an unmapped key stands for itself)."""
        if name in self._mapped:
            return self._mapped[name]
        if name in self.reader.tensors:
            return name
        raise KeyError(name)

    def expert_layout(self, name: str) -> tuple[str, tuple[int, ...] | None]:
        """(stored orientation, 3-D view of a 2-D stored tensor or None) of an expert tensor."""
        if name not in self._experts:
            self._experts[name] = stored_expert_layout(name, self.reader.tensors[self.key(name)].shape,
                                                       self.skeleton)
        return self._experts[name]

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        entry = self.reader.tensors[self.key(name)]
        if name not in self._mapped:  # a tensor the model does not have
            return tuple(entry.shape), entry.dtype
        if is_expert(name):
            return self.skeleton.shape_in(name, "released"), entry.dtype
        if entry.shape != self.skeleton.tensors[name].shape:
            raise UserError(f"'{entry.key}' has shape {list(entry.shape)} but config.json implies "
                            f"{list(self.skeleton.tensors[name].shape)}")
        return tuple(entry.shape), entry.dtype

    def nbytes(self, name: str) -> int:
        return self.reader.tensors[self.key(name)].nbytes

    def _chunk(self, chunk: Chunk) -> torch.Tensor:
        if self._chunk_cache is None or self._chunk_cache[0] is not chunk:
            self._chunk_cache = None  # drop the previous chunk before reading the next
            self._chunk_cache = (chunk, self.reader.read_chunk(chunk))
        return self._chunk_cache[1]

    def _stored_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows of a stored tensor, reading only the chunks they overlap when chunks are row slabs."""
        entry = self.reader.tensors[key]
        if not entry.shape:
            return self.reader.read(key)
        if all(is_row_slab(c, entry.shape) for c in entry.chunks):
            out = torch.empty((stop - start, *entry.shape[1:]), dtype=entry.dtype)
            for chunk in entry.chunks:
                lo, hi = max(start, chunk.offsets[0]), min(stop, chunk.offsets[0] + chunk.sizes[0])
                if lo < hi:
                    piece = self._chunk(chunk)
                    out[lo - start:hi - start] = piece[lo - chunk.offsets[0]:hi - chunk.offsets[0]]
            return out
        if self._whole_cache is None or self._whole_cache[0] != key:
            self._whole_cache = None
            self._whole_cache = (key, self.reader.read(key))
        return self._whole_cache[1][start:stop]

    def read(self, name: str) -> torch.Tensor:
        if name not in self._mapped:
            return self.reader.read(self.key(name))
        return super().read(name)

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        key = self.key(src.hf)
        if src.expert is None:
            return self._stored_rows(key, start, stop)
        layout, view = self.expert_layout(src.hf)
        e = src.expert
        if view is None:
            block = self._stored_rows(key, e, e + 1)[0]
        else:  # MindSpeed's 2-D (E*in, out) view
            block = self._stored_rows(key, e * view[1], (e + 1) * view[1])
        matrix = block.t() if layout == "released" else block
        return matrix[start:stop].contiguous()

    def cols(self, src: Src, start: int, stop: int) -> torch.Tensor:
        if src.expert is not None:
            return self.rows(src, 0, self.matrix_shape(src)[0])[:, start:stop].contiguous()
        return super().cols(src, start, stop)

    def close(self) -> None:
        self._chunk_cache = self._whole_cache = None
        self.reader.close()


# ---------------------------------------------------------------------------------------- Megatron
@dataclass(frozen=True)
class _Piece:
    rank: tuple[int, int, int]
    name: str
    axis: int
    start: int  # range of the source covered (rows for axis 0, columns for axis 1)
    stop: int
    offset: int  # first row of the rank tensor holding ``start`` (axis 0)


def _resolve_two_part(pairs: dict[tuple[int, int], Path]) -> str:
    """``mp_rank_XX_YYY``: EP if a folder with YYY > 0 holds the word embeddings (a later stage would not)."""
    seconds = sorted({s for _, s in pairs})
    if len(seconds) < 2:
        return "pp"
    rf = mlay.RankFile(pairs[(0, seconds[1])] / mlay.RANK_FILE)
    if rf.meta and rf.meta.get("ep", 1) > 1 and rf.meta.get("pp", 1) == 1:
        return "ep"
    if rf.meta and rf.meta.get("pp", 1) > 1:
        return "pp"
    return "ep" if f"{MLM}embedding.word_embeddings.weight" in rf.tensors else "pp"


class MegatronSource(Source):
    """Megatron-Core legacy rank files at any TP/PP/EP/ETP, detected from folders and tensors.

    Vocabulary padding is dropped; a tied model has no ``lm_head.weight``. Each source matrix is
    assembled from the rank tensors that hold it, reading only the rows asked for.
    """

    layout = "megatron"

    def __init__(self, folder: str | Path, config: str | Path | dict | None = None,
                 skeleton: Skeleton | None = None, assets_dir: str | Path | None = None):
        self.folder = Path(folder)
        if config is None and assets_dir is not None and (Path(assets_dir) / "config.json").is_file():
            config = Path(assets_dir) / "config.json"
        self.layout_info, self.plan, self.files, self.notes = _open_megatron(self.folder, config)
        self.skeleton = self.plan.skeleton
        self.pieces: dict[Src, list[_Piece]] = {}
        self._dtypes: dict[Src, torch.dtype] = {}
        seen: set[tuple] = set()
        for r in self.plan.ranks:
            key = (r.tp, r.pp, r.ep)
            for t in r.tensors:
                off = 0
                for src, a, b in t.segs:
                    if src is not None and (src, t.axis, a, b) not in seen:
                        seen.add((src, t.axis, a, b))
                        self.pieces.setdefault(src, []).append(_Piece(key, t.name, t.axis, a, b, off))
                        self._dtypes[src] = self.files[key].tensors[t.name].dtype
                    off += b - a

    def names(self) -> list[str]:
        return self.skeleton.hf_keys()

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        src = Src(name, 0) if is_expert(name) else Src(name)
        return self.skeleton.shape_in(name, "released"), self._dtypes[src]

    def dtype(self, src: Src) -> torch.dtype:
        return self._dtypes[src]

    def matrix_shape(self, src: Src) -> tuple[int, ...]:
        return source_shape(self.skeleton, src)

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        pieces = self.pieces[src]
        shape = self.matrix_shape(src)
        if pieces[0].axis == 1:
            parts = [self.files[p.rank].read_rows(p.name, start, stop) for p in sorted(pieces, key=lambda p: p.start)]
            out = torch.cat(parts, dim=1)
            if out.shape[1] != shape[1]:
                raise UserError(f"the checkpoint holds {out.shape[1]} of {shape[1]} columns of '{src}'")
            return out
        out = torch.empty((stop - start, *shape[1:]), dtype=self._dtypes[src])
        covered = 0
        for p in pieces:
            lo, hi = max(start, p.start), min(stop, p.stop)
            if lo < hi:
                rf = self.files[p.rank]
                out[lo - start:hi - start] = rf.read_rows(p.name, p.offset + lo - p.start, p.offset + hi - p.start)
                covered += hi - lo
        if covered != stop - start:
            raise UserError(f"the checkpoint does not hold rows {start}:{stop} of '{src}'")
        return out

    def cols(self, src: Src, start: int, stop: int) -> torch.Tensor:
        pieces = self.pieces[src]
        if pieces[0].axis == 0:
            return self.rows(src, 0, self.matrix_shape(src)[0])[:, start:stop].contiguous()
        parts = []
        for p in sorted(pieces, key=lambda p: p.start):
            lo, hi = max(start, p.start), min(stop, p.stop)
            if lo < hi:
                parts.append(self.files[p.rank].read(p.name)[:, lo - p.start:hi - p.start])
        return torch.cat(parts, dim=1).contiguous()


def _open_megatron(root: Path, config: str | Path | dict | None
                   ) -> tuple[mlay.RankLayout, MegatronPlan, dict[tuple[int, int, int], mlay.RankFile], list[str]]:
    """Detect TP/PP/EP/ETP, spec, expert style and padded vocabulary from the folders and tensors (and
    vlconvert metadata when present), then check every rank against the plan those sizes imply."""
    layout = mlay.scan_ranks(root, _resolve_two_part)
    files = {k: mlay.RankFile(layout.file(*k)) for k in sorted(layout.folders)}
    notes = list(layout.notes)
    first = files[(0, 0, 0)]
    meta = first.meta
    if config is not None:
        info = load_config(config if isinstance(config, dict) else Path(config))
    elif meta and "hf_config" in meta:
        info = load_config(json.loads(meta["hf_config"]))
        notes.append("model config read from the checkpoint's vlconvert metadata")
    else:
        raise UserError(f"'{root}' carries no model config: pass --assets-dir (or --config) with the "
                        "original Hugging Face config.json")
    sk = build_skeleton(info)
    names = set().union(*(f.tensors for f in files.values()))
    spec = "te" if any(n.endswith("linear_qkv.layer_norm_weight") for n in names) else "local"
    experts = "sequential" if any(".local_experts." in n for n in names) else "grouped"
    notes.append(f"spec {spec} ({'fused layer_norm_weight' if spec == 'te' else 'separate input_layernorm'})")
    stage_layers = []
    for s in range(layout.pp):
        nums = set()
        for n in files[(0, s, 0)].tensors:
            if n.startswith(f"{MLM}decoder.layers."):
                m = _LAYER_NAME.match(n)
                if m is None:
                    raise UserError(f"'{layout.file(0, s, 0)}' holds '{n}', which names no decoder layer number")
                nums.add(int(m.group(1)))
        if nums != set(range(len(nums))):
            raise UserError(f"'{layout.file(0, s, 0)}' numbers its decoder layers {sorted(nums)[:4]}...: "
                            "expected local numbers from 0")
        stage_layers.append(len(nums))
    if sum(stage_layers) != info.layers:
        raise UserError(f"the checkpoint holds {sum(stage_layers)} decoder layers, the config says {info.layers}")
    emb = first.tensors.get(f"{MLM}embedding.word_embeddings.weight")
    if emb is None:
        raise UserError(f"'{layout.file(0, 0, 0)}' lacks {MLM}embedding.word_embeddings.weight: "
                        "not a Megatron-Bridge style Qwen3-VL checkpoint")
    padded = emb.shape[0] * layout.tp
    etp = layout.tp
    if info.is_moe:
        experts_found = [n for n in first.tensors if ".experts." in n and "linear_fc2" in n
                         and n.startswith(f"{MLM}decoder.layers.0.")]
        if experts_found:
            cols = first.tensors[experts_found[0]].shape[1]
            if info.moe_intermediate % cols:
                raise UserError(f"expert linear_fc2 has {cols} columns, not a divisor of {info.moe_intermediate}")
            etp = info.moe_intermediate // cols
            per_rank = len(experts_found)
            if per_rank * layout.ep != info.experts:
                raise UserError(f"{per_rank} experts per rank x EP {layout.ep} != {info.experts} experts")
    if meta:
        for key, found in (("tp", layout.tp), ("pp", layout.pp), ("ep", layout.ep), ("etp", etp)):
            if key in meta and meta[key] != found:
                raise UserError(f"'{root}': folders/tensors say {key}={found}, its metadata says {meta[key]}")
    first_n = stage_layers[0] if layout.pp > 1 and len(set(stage_layers)) > 1 else None
    last_n = stage_layers[-1] if first_n is not None else None
    if first_n is not None and len(set(stage_layers[1:-1])) > 1:
        raise UserError(f"pipeline stages hold {stage_layers} layers: middle stages must be equal")
    plan = plan_megatron_ranks(sk, layout.tp, layout.pp, layout.ep, etp, spec=spec, experts=experts,
                               padded_vocab_size=padded, pp_first_layers=first_n, pp_last_layers=last_n)
    for r in plan.ranks:
        f = files[(r.tp, r.pp, r.ep)]
        want = {t.name: t.shape for t in r.tensors}
        have = {n: lt.shape for n, lt in f.tensors.items()}
        missing = [n for n in want if n not in have]
        extra = [n for n in have if n not in want]
        if missing or extra:
            what = f"lacks '{missing[0]}'" if missing else f"holds unexpected '{extra[0]}'"
            raise UserError(f"'{f.path}' {what} (read as TP={layout.tp} PP={layout.pp} EP={layout.ep} ETP={etp}, "
                            f"spec {spec}, experts {experts})")
        for n, shape in want.items():
            if have[n] != shape:
                raise UserError(f"'{f.path}': '{n}' has shape {list(have[n])}, expected {list(shape)}")
    for r in plan.ranks:  # dtypes from the files (the config's dtype may differ from what is stored)
        f = files[(r.tp, r.pp, r.ep)]
        r.tensors = [RankTensor(t.name, t.shape, f.tensors[t.name].dtype, t.axis, t.segs) for t in r.tensors]
    notes.append(f"read as TP={layout.tp} PP={layout.pp} EP={layout.ep} ETP={etp}, layers per stage "
                 f"{stage_layers}, spec {spec}, experts {experts}, padded vocab {padded}")
    return layout, plan, files, notes


# ------------------------------------------------------------------------------------------ opening
def open_source(path: str | Path, *, config: str | Path | dict | None = None, assets_dir: str | Path | None = None,
                skeleton: Skeleton | None = None, prefix: str | None = None,
                experts_layout: str | None = None, layout: str | None = None) -> Source:
    """Open any checkpoint folder (or an HF model id in the local cache) as a :class:`Source`.

    The layout is detected from its files unless ``layout`` names the one expected (its reader then says
    what is wrong with the folder). ``config``/``assets_dir`` give the model config to sources that carry
    none (a training DCP, another tool's Megatron checkpoint).
    """
    text = str(path)
    folder = Path(text).expanduser()
    if not folder.exists():
        folder = resolve_source(text)  # a model id in the local Hugging Face cache, or a clear error
    if not folder.is_dir():
        raise UserError(f"'{path}' is a file: give the checkpoint folder")
    layout = layout or detect_layout(folder)
    if layout == "hf":
        return HFSource(folder, config=config if config is not None else _assets_config(assets_dir),
                        skeleton=skeleton, experts_layout=experts_layout)
    if layout == "dcp":
        return DCPSource(folder, config=config, skeleton=skeleton, assets_dir=assets_dir, prefix=prefix)
    if layout == "megatron":
        return MegatronSource(folder, config=config, skeleton=skeleton, assets_dir=assets_dir)
    raise UserError(f"'{path}' holds no safetensors, DCP (.metadata) or Megatron (mp_rank_*) checkpoint")


def _assets_config(assets_dir: str | Path | None) -> Path | None:
    if assets_dir is not None and (Path(assets_dir) / "config.json").is_file():
        return Path(assets_dir) / "config.json"
    return None
