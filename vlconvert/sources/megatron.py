"""Megatron-Core legacy rank files as a :class:`~vlconvert.sources.base.Source`."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from vlconvert import rowbytes
from vlconvert.dtypes import DType, to_torch
from vlconvert.errors import UsageError, UserError
from vlconvert.layouts import megatron as mlay
from vlconvert.layouts.filebytes import FileSpan
from vlconvert.lazy import torch
from vlconvert.models.base import Skeleton
from vlconvert.models.megatron_table import MegatronPlan, RankTensor, Src, plan_megatron_ranks
from vlconvert.models.registry import load_config, megatron_language_prefixes
from vlconvert.rowbytes import ByteRows
from vlconvert.sources.base import RankMappedSource, skeleton_of


# ---------------------------------------------------------------------------------------- Megatron
@dataclass(frozen=True)
class _Piece:
    rank: tuple[int, int, int]
    name: str
    axis: int
    start: int  # range of the source covered (rows for axis 0, columns for axis 1)
    stop: int
    offset: int  # first row of the rank tensor holding ``start`` (axis 0)
    value_op: str | None = None  # the family's value op on this tensor (undone on read)


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
    return "ep" if any(f"{p}embedding.word_embeddings.weight" in rf.tensors for p in megatron_language_prefixes()) \
        else "pp"


class MegatronSource(RankMappedSource):
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
        self.layout_info, self.plan, self.files, self.notes = _open_megatron(self.folder, config, assets_dir)
        self.skeleton = self.plan.skeleton
        self.pieces: dict[Src, list[_Piece]] = {}
        self._dtypes: dict[Src, DType] = {}
        seen: set[tuple] = set()
        for r in self.plan.ranks:
            key = (r.tp, r.pp, r.ep)
            for t in r.tensors:
                off = 0
                for src, a, b in t.segs:
                    if src is not None and (src, t.axis, a, b) not in seen:
                        seen.add((src, t.axis, a, b))
                        self.pieces.setdefault(src, []).append(_Piece(key, t.name, t.axis, a, b, off, t.value_op))
                        self._dtypes[src] = self.files[key].tensors[t.name].dtype
                    off += b - a

    def names(self) -> list[str]:
        return self.skeleton.hf_keys()

    def row_span(self, src: Src, start: int, stop: int) -> FileSpan | None:
        if self.stacked(src):
            return None
        for p in self.pieces[src]:
            if p.axis == 0 and p.start <= start < p.stop and p.value_op is None:
                return self._as_rows(src, self.files[p.rank].span(p.name, p.offset + start - p.start,
                                                                  p.offset + min(stop, p.stop) - p.start))
        return None  # split over columns: read

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        if self.stacked(src):
            return self.stacked_rows(src, start, stop)
        pieces = self.pieces[src]
        if pieces[0].value_op is not None:  # stored as the family's value op of the HF value: undo it
            return self.skeleton.family.to_hf_value(pieces[0], self._rows(src, pieces, start, stop))
        return self._rows(src, pieces, start, stop)

    def row_bytes(self, src: Src, start: int, stop: int) -> ByteRows | None:
        if self.stacked(src):
            return None
        pieces = self.pieces[src]
        rows = self._row_bytes(src, pieces, start, stop)
        if rows is None or pieces[0].value_op is None:
            return rows
        return self.skeleton.family.to_hf_value_bytes(pieces[0], rows)  # stored as the family's value op: undone

    def _row_bytes(self, src: Src, pieces: list[_Piece], start: int, stop: int) -> ByteRows | None:
        """The stored rows ``start:stop`` of ``src`` as bytes (TP columns gathered, row pieces joined)."""
        shape = self.matrix_shape(src)
        if pieces[0].axis == 1:
            ordered = sorted(pieces, key=lambda p: p.start)
            parts = [self.files[p.rank].read_row_bytes(p.name, start, stop) for p in ordered]
            if any(part is None or len(part.shape) != 2 for part in parts):
                return None
            out = rowbytes.concat_columns(parts)
            if out.shape[1] != shape[1]:
                raise UserError(f"the checkpoint holds {out.shape[1]} of {shape[1]} columns of '{src}'")
            return out
        found: list[tuple[int, ByteRows]] = []
        for p in pieces:
            lo, hi = max(start, p.start), min(stop, p.stop)
            if lo < hi:
                part = self.files[p.rank].read_row_bytes(p.name, p.offset + lo - p.start, p.offset + hi - p.start)
                rows = (hi - lo, *shape[1:])
                if part is None or math.prod(part.shape) != math.prod(rows):
                    return None
                found.append((lo, part.reshape(rows)))
        found.sort(key=lambda f: f[0])
        at = start
        for lo, part in found:
            if lo != at:
                break
            at += part.shape[0]
        if at != stop:
            raise UserError(f"the checkpoint does not hold rows {start}:{stop} of '{src}'")
        if not found:
            return rowbytes.empty((0, *shape[1:]), self._dtypes[src])
        return rowbytes.concat_rows([part for _, part in found])

    def _rows(self, src: Src, pieces: list[_Piece], start: int, stop: int) -> torch.Tensor:
        shape = self.matrix_shape(src)
        if pieces[0].axis == 1:
            parts = [self.files[p.rank].read_rows(p.name, start, stop) for p in sorted(pieces, key=lambda p: p.start)]
            out = torch.cat(parts, dim=1)
            if out.shape[1] != shape[1]:
                raise UserError(f"the checkpoint holds {out.shape[1]} of {shape[1]} columns of '{src}'")
            return out
        out = torch.empty((stop - start, *shape[1:]), dtype=to_torch(self._dtypes[src]))
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

def _open_megatron(root: Path, config: str | Path | dict | None, assets_dir: str | Path | None = None
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
        raise UsageError(f"'{root}' carries no model config: pass --assets-dir (or --config) with the "
                        "original Hugging Face config.json")
    sk = skeleton_of(info, None, assets_dir)
    mlm = sk.family.megatron_prefixes.language
    layer_name = re.compile(rf"^{re.escape(mlm)}decoder\.layers\.(\d+)\.")
    names = set().union(*(f.tensors for f in files.values()))
    spec = "te" if any(n.endswith("linear_qkv.layer_norm_weight") for n in names) else "local"
    experts = "sequential" if any(".local_experts." in n for n in names) else "grouped"
    notes.append(f"spec {spec} ({'fused layer_norm_weight' if spec == 'te' else 'separate input_layernorm'})")
    stage_layers = []
    for s in range(layout.pp):
        nums = set()
        for n in files[(0, s, 0)].tensors:
            if n.startswith(f"{mlm}decoder.layers."):
                m = layer_name.match(n)
                if m is None:
                    raise UserError(f"'{layout.file(0, s, 0)}' holds '{n}', which names no decoder layer number")
                nums.add(int(m.group(1)))
        if nums != set(range(len(nums))):
            raise UserError(f"'{layout.file(0, s, 0)}' numbers its decoder layers {sorted(nums)[:4]}...: "
                            "expected local numbers from 0")
        stage_layers.append(len(nums))
    if sum(stage_layers) != info.layers:
        raise UserError(f"the checkpoint holds {sum(stage_layers)} decoder layers, the config says {info.layers}")
    emb = first.tensors.get(f"{mlm}embedding.word_embeddings.weight")
    if emb is None:
        raise UserError(f"'{layout.file(0, 0, 0)}' lacks {mlm}embedding.word_embeddings.weight: "
                        f"not a Megatron-Bridge style {info.family} checkpoint")
    padded = emb.shape[0] * layout.tp
    etp = layout.tp
    if info.is_moe:
        experts_found = [n for n in first.tensors if ".experts." in n and "linear_fc2" in n
                         and n.startswith(f"{mlm}decoder.layers.0.")]
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
        r.tensors = [RankTensor(t.name, t.shape, f.tensors[t.name].dtype, t.axis, t.segs, t.value_op)
                     for t in r.tensors]
    notes.append(f"read as TP={layout.tp} PP={layout.pp} EP={layout.ep} ETP={etp}, layers per stage "
                 f"{stage_layers}, spec {spec}, experts {experts}, padded vocab {padded}")
    return layout, plan, files, notes


