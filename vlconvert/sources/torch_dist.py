"""Megatron-Core ``torch_dist`` checkpoints as a :class:`~vlconvert.sources.base.Source`.

Each global torch_dist tensor (sliced at its layer / expert index) is the tp=1 legacy tensor of the
same parameter, so the tp=1 plan of :func:`plan_megatron_ranks` gives every row map back to HF.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlconvert.dtypes import DType, to_torch
from vlconvert.errors import UsageError, UserError
from vlconvert.layouts import megatron as mlay
from vlconvert.layouts import torch_dist as tdl
from vlconvert.layouts.dcp import DCPReader
from vlconvert.layouts.filebytes import FileSpan
from vlconvert.lazy import torch
from vlconvert.locate import resolve_source
from vlconvert.models.base import Skeleton
from vlconvert.models.megatron_table import RankTensor, Src, hf_vision_tensors, plan_megatron_ranks
from vlconvert.models.registry import build_skeleton, load_config, megatron_language_prefixes
from vlconvert.publish import note_input
from vlconvert.rowbytes import ByteRows
from vlconvert.sources.base import RankMappedSource, check_config_sizes, read_spans, skeleton_for

_ALT_NORM = ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
HF_VISION_PREFIXES = ("visual.visual.", "vision_model.")


def _bridge_hf_folder(folder: Path) -> Path | None:
    """The local HF folder (or cached model id) named by ``model.hf_model_id`` in Bridge's run_config.yaml."""
    path = folder / tdl.RUN_CONFIG
    try:
        if not path.is_file() or path.stat().st_size > 2**22:
            return None
        import yaml

        model = (yaml.safe_load(note_input(path).read_text(encoding="utf-8")) or {}).get("model") or {}
        found = resolve_source(str(model["hf_model_id"]))
    except Exception:  # noqa: BLE001 - no usable record: the user gives --assets-dir
        return None
    return note_input(found) if (found / "config.json").is_file() else None


def _config_origin(folder: Path, config: str | Path | dict | None, assets_dir: str | Path | None) -> str:
    """Where :func:`skeleton_for` took the config from, for a message."""
    if isinstance(config, dict):
        return "given"
    if config is not None:
        return f"'{config}'"
    if assets_dir is not None and (Path(assets_dir) / "config.json").is_file():
        return f"'{Path(assets_dir) / 'config.json'}'"
    return f"'{folder / 'config.json'}'"


def _held_sizes(tensors: dict, prefix: str) -> dict[str, int]:
    """Decoder layers, experts, hidden size and vision blocks, counted from a torch_dist checkpoint's metadata
    (layers stacked on the first axis, experts on the second; or numbered per layer / block)."""
    held: dict[str, int] = {}
    emb = tensors.get(f"{prefix}embedding.word_embeddings.weight")
    if emb is not None and len(emb.shape) == 2:
        held["hidden size"] = emb.shape[1]

    def count(head: str) -> int | None:
        found = []
        for key, t in tensors.items():
            if key.startswith(head):
                first = key[len(head):].split(".", 1)[0]
                if first.isdigit():
                    found.append(int(first) + 1)  # numbered per layer
                elif t.shape:
                    found.append(t.shape[0])  # stacked on the first axis
        return max(found) if found else None

    layers = count(f"{prefix}decoder.layers.")
    if layers is not None:
        held["decoder layers"] = layers
    fc1 = tensors.get(f"{prefix}decoder.layers.mlp.experts.experts.linear_fc1.weight")
    if fc1 is not None and len(fc1.shape) >= 2:
        held["experts"] = fc1.shape[1]
    for head in ("vision_model.decoder.layers.", "visual.visual.blocks.", "vision_model.blocks."):
        blocks = count(head)
        if blocks is not None:
            held["vision blocks"] = blocks
            break
    return held


def _detect_consumer(folder: Path, common: dict, prefix: str, hf_vision: str | None) -> str:
    """Which framework saved this checkpoint, from what its save leaves (said in the notes)."""
    if (folder / tdl.RUN_CONFIG).is_file():
        return "megatron-bridge-0.3" if hf_vision == "vision_model." else "megatron-bridge"
    if hf_vision:
        return "ms-swift"
    if not prefix:
        return "megatron-lm"
    meta = common.get(mlay.META_KEY)
    if isinstance(meta, dict) and isinstance(meta.get("consumer"), str):
        return meta["consumer"]
    return "megatron-core (Megatron-Bridge / mbridge names)"


@dataclass(frozen=True)
class _Piece:
    tensor: int  # index into TorchDistSource.tensors
    axis: int
    start: int
    stop: int
    offset: int


class TorchDistSource(RankMappedSource):
    """A megatron-core ``torch_dist`` checkpoint (Megatron-LM, Megatron-Bridge, ms-swift...) at any TP/PP/EP.

    Optimizer, rng and other non-model entries are dropped (counted in ``notes``); ``common.pt`` is read
    with the restricted unpickler only for vlconvert's own facts (config, sizes).
    """

    layout = "torch_dist"

    def __init__(self, folder: str | Path, config: str | Path | dict | None = None,
                 skeleton: Skeleton | None = None, assets_dir: str | Path | None = None):
        self.folder = Path(folder)
        found = tdl.find_torch_dist_dir(self.folder)
        if found is None:
            raise UserError(f"'{folder}' is not a torch_dist checkpoint (no metadata.json with "
                            "sharded_backend torch_dist)")
        self.iter_dir, self.iteration = found
        self.reader = DCPReader(self.iter_dir)
        self.common = tdl.load_common(self.iter_dir, self.reader)
        meta = self.common.get("vlconvert") if isinstance(self.common.get("vlconvert"), dict) else {}
        self.notes: list[str] = []
        self.assets: Path | None = None
        origin = "given"
        if skeleton is None:
            skeleton = skeleton_for(self.folder, config, assets_dir)
            origin = _config_origin(self.folder, config, assets_dir)
        if skeleton is None and assets_dir is None and config is None:
            self.assets = _bridge_hf_folder(self.iter_dir)
            if self.assets is not None:  # Megatron-Bridge records the HF model it was made from
                skeleton = skeleton_for(self.folder, None, self.assets)
                origin = f"'{self.assets / 'config.json'}', hf_model_id in {tdl.RUN_CONFIG}"
                self.notes.append(f"config and assets from '{self.assets}' (hf_model_id in {tdl.RUN_CONFIG})")
        if skeleton is None and isinstance(meta.get("hf_config"), str):
            skeleton = build_skeleton(load_config(json.loads(meta["hf_config"])))
            origin = "the checkpoint's vlconvert metadata"
            self.notes.append("model config read from the checkpoint's vlconvert metadata")
        if skeleton is None:
            raise UsageError(f"'{folder}' carries no model config: pass --assets-dir (or --config) with the "
                            "original Hugging Face config.json")
        self.skeleton = skeleton
        self.saved_from = {k: meta[k] for k in ("tp", "pp", "ep", "etp") if isinstance(meta.get(k), int)} or None
        self.parallel = self.saved_from  # what inspect reports ("saved from"; any size loads it)
        info = skeleton.info
        prefix = next((p for p in megatron_language_prefixes() if f"{p}embedding.word_embeddings.weight"
                       in self.reader.tensors), None)
        if prefix is None:
            raise UserError(f"'{self.iter_dir}' lacks language_model.embedding.word_embeddings.weight (and "
                            "embedding.word_embeddings.weight): not a Qwen3-VL or Qwen3 torch_dist checkpoint")
        emb = self.reader.tensors[f"{prefix}embedding.word_embeddings.weight"]
        self.prefix = prefix
        check_config_sizes(info, _held_sizes(self.reader.tensors, prefix), origin,
                           self.iter_dir)  # before the plan, which is per layer and per expert
        self.plan = plan_megatron_ranks(skeleton, 1, 1, 1, spec="te", experts="sequential",
                                        padded_vocab_size=emb.shape[0])
        # the HF vision tower kept as a plain module: ms-swift (visual.visual.), Megatron-Bridge 0.3 (vision_model.)
        hf_vision = next((p for p in HF_VISION_PREFIXES if f"{p}blocks.0.norm1.weight" in self.reader.tensors), None)
        self.consumer = _detect_consumer(self.iter_dir, self.common, prefix, hf_vision)
        mlm, mvis = skeleton.family.megatron_prefixes.language, skeleton.family.megatron_prefixes.vision
        self._mvis = mvis
        self.tensors: list[RankTensor] = list(self.plan.ranks[0].tensors)
        if hf_vision:
            self.tensors = hf_vision_tensors(skeleton, {}, hf_vision) + [
                t for t in self.tensors if not (mvis and t.name.startswith(mvis))]
        self.locations: list[tuple[str, tuple[int, ...]]] = []
        used: set[str] = set()
        mergers = len(info.deepstack)
        missing_vision = 0
        for t in list(self.tensors):
            name = prefix + t.name[len(mlm):] if t.name.startswith(mlm) else t.name
            gk = tdl.global_key(name, info.layers, info.vision_depth, mergers, info.experts or 0, prefix)
            try:
                key, index = self._resolve(gk, name)
            except UserError:
                if not (mvis and t.name.startswith(mvis) or hf_vision and t.name.startswith(hf_vision)):
                    raise
                self.tensors.remove(t)  # a language-model-only checkpoint (megatron-core GPTModel)
                missing_vision += 1
                continue
            stored = self.reader.tensors[key]
            if tuple(stored.shape[len(index):]) != tuple(t.shape):
                raise UserError(f"'{self.iter_dir}': '{key}' has shape {list(stored.shape)}, expected "
                                f"{[*gk.stack, *t.shape] if index else list(t.shape)}")
            self.locations.append((key, index))
            used.add(key)
        self.pieces: dict[Src, list[_Piece]] = {}
        self._dtypes: dict[Src, DType] = {}
        for i, t in enumerate(self.tensors):
            off = 0
            for src, a, b in t.segs:
                if src is not None:
                    self.pieces.setdefault(src, []).append(_Piece(i, t.axis, a, b, off))
                    self._dtypes[src] = self.reader.tensors[self.locations[i][0]].dtype
                off += b - a
        if missing_vision:
            self.notes.append(f"no vision tower: {missing_vision} vision_model tensors absent (language model only)")
        extra = [k for k in self.reader.tensors if k not in used]
        if self.reader.non_tensors or extra:
            self.notes.append(f"dropped {len(extra)} non-model tensor entries (optimizer, rng, ...) and "
                              f"{len(self.reader.non_tensors)} byte entries (_extra_state, common state)")
        self.notes.append(f"torch_dist {self.iter_dir.name} ({self.consumer}): padded vocab {emb.shape[0]}"
                          + (f", saved from {self.saved_from}" if self.saved_from else ""))

    def _resolve(self, gk: tdl.GlobalKey, name: str) -> tuple[str, tuple[int, ...]]:
        """The stored key (stacked, or per layer) and index; MoE norms may carry the local spec's name."""
        def alt_norm(key: str) -> str:
            return key[:-len(_ALT_NORM[0])] + _ALT_NORM[1] if key.endswith(_ALT_NORM[0]) else key

        options = [(gk.key, gk.index), (alt_norm(gk.key), gk.index)]
        if self._mvis and gk.key.startswith(self._mvis):
            # megatron-core's local ViT spec keeps its norms' own names (no TE-name mapping on save)
            options += [(gk.key.replace(te, local), gk.index) for local, te in tdl.LOCAL_NORM_NAMES if te in gk.key]
        if gk.alt is not None:
            options += [(gk.alt, gk.index[1:]), (alt_norm(gk.alt), gk.index[1:])]
        for key, index in options:
            if key in self.reader.tensors:
                return key, index
        raise UserError(f"'{self.iter_dir}' lacks '{gk.key}' (for {name})")

    def _rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of located tensor ``i`` (``global[index]``), from the chunks' rows only."""
        key, index = self.locations[i]
        return self.reader.read_rows(key, start, stop, index)

    def names(self) -> list[str]:
        stacked = self.skeleton.family.is_stacked_expert
        return [n for n in self.skeleton.hf_keys() if (Src(n, 0) if stacked(n) else Src(n)) in self.pieces]

    def row_span(self, src: Src, start: int, stop: int) -> FileSpan | None:
        if self.stacked(src) or self._value_op_of(src) is not None:  # stored through the family's value op: read
            return None
        return self._stored_span(src, start, stop)

    def row_bytes(self, src: Src, start: int, stop: int) -> ByteRows | None:
        tensor = None if self.stacked(src) else self._value_op_of(src)
        if tensor is None:
            return super().row_bytes(src, start, stop)
        rows = read_spans(lambda r: self._stored_span(src, r, stop), start, stop)  # as stored, then undone
        return None if rows is None else self.skeleton.family.to_hf_value_bytes(tensor, rows)

    def _value_op_of(self, src: Src) -> RankTensor | None:
        """The rank tensor that stores ``src`` through the family's value op, or None where none does."""
        tensor = self.tensors[self.pieces[src][0].tensor]
        return tensor if tensor.value_op is not None else None

    def _stored_span(self, src: Src, start: int, stop: int) -> FileSpan | None:
        """Where rows ``start:`` of ``src`` lie as stored (before any value op is undone)."""
        for p in self.pieces[src]:
            if p.axis == 1 or p.start <= start < p.stop:  # axis 1: the whole source (tp 1)
                key, index = self.locations[p.tensor]
                shift, end = (0, stop) if p.axis == 1 else (p.offset - p.start, min(stop, p.stop))
                return self._as_rows(src, self.reader.span(key, start + shift, end + shift, index))
        return None

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        if self.stacked(src):
            return self.stacked_rows(src, start, stop)
        pieces = self.pieces[src]
        tensor = self.tensors[pieces[0].tensor]
        if tensor.value_op is not None:  # stored as the family's value op of the HF value: undo it
            return self.skeleton.family.to_hf_value(tensor, self._source_rows(src, pieces, start, stop))
        return self._source_rows(src, pieces, start, stop)

    def _source_rows(self, src: Src, pieces: list[_Piece], start: int, stop: int) -> torch.Tensor:
        shape = self.matrix_shape(src)
        if pieces[0].axis == 1:  # a row-parallel weight: the whole source at tp 1
            return self._rows(pieces[0].tensor, start, stop)
        out = torch.empty((stop - start, *shape[1:]), dtype=to_torch(self._dtypes[src]))
        covered = 0
        for p in pieces:
            lo, hi = max(start, p.start), min(stop, p.stop)
            if lo < hi:
                out[lo - start:hi - start] = self._rows(p.tensor, p.offset + lo - p.start, p.offset + hi - p.start)
                covered += hi - lo
        if covered != stop - start:
            raise UserError(f"the checkpoint does not hold rows {start}:{stop} of '{src}'")
        return out

    def close(self) -> None:
        self.reader.close()
        super().close()

