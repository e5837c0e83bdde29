"""HF <-> Megatron-Core legacy checkpoints, and Megatron -> Megatron resharding: plan, then stream.

* :func:`plan_megatron_ranks` (pure, no weights): every rank folder's tensors (local names, shapes,
  dtypes) and, for each, the source rows or columns it is made of, in canonical (HF) terms.
* A *source reader* answers "rows a..b (or columns) of this source matrix" from a HF folder
  (:class:`HFSourceReader`) or from a Megatron checkpoint (:class:`MegatronSourceReader`, which knows
  which rank tensors hold which rows). Conversions are the plan executed against a reader, one tensor at
  a time: HF -> Megatron and Megatron -> Megatron share the same writer, so ``reshard`` produces the
  same bytes as a direct conversion.
* :class:`MegatronCheckpoint` is the canonical read interface (``names``/``spec``/``read``) over a Megatron
  checkpoint, for ``verify`` and ``inspect``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlconvert import ops
from vlconvert.errors import UserError
from vlconvert.layouts import megatron as mlay
from vlconvert.layouts.hf import (
    HFCheckpoint,
    PlannedTensor,
    SafetensorsFileWriter,
    copy_assets,
    parse_size,
    plan_shards,
    shard_file_names,
    write_index,
)
from vlconvert.layouts.publish import staged_output
from vlconvert.models.qwen3vl import (
    EMBED,
    LM_HEAD,
    ModelInfo,
    Skeleton,
    build_skeleton,
    expert_layout_of,
    is_expert,
    load_config,
)
from vlconvert.models.qwen3vl_megatron import MLM, Param, Src, megatron_params, source_shape

Seg = tuple[Src | None, int, int]
_BLOCK = 64 * 2**20


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class RankTensor:
    """One tensor of one rank file: local name, shape, dtype, and its recipe.

    ``axis`` 0: the tensor is the concatenation along dim 0 of ``segs`` (rows of sources; ``None`` = zero
    rows). ``axis`` 1: it is columns ``segs[0][1]:segs[0][2]`` of the single source ``segs[0][0]``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    axis: int
    segs: tuple[Seg, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class RankPlan:
    """One rank folder of the output: its ranks and its tensors in write order."""

    tp: int
    pp: int
    ep: int
    folder: str
    tensors: list[RankTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class MegatronPlan:
    """Everything a Megatron checkpoint of given parallel sizes holds, computed from the config alone."""

    skeleton: Skeleton
    tp: int
    pp: int
    ep: int
    etp: int
    spec: str
    experts: str
    vocab: int
    padded_vocab: int
    stage_layers: list[int]
    ranks: list[RankPlan]
    dtype: torch.dtype | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.ranks)

    def listing(self) -> list[tuple[str, list[tuple[str, tuple[int, ...], torch.dtype]]]]:
        """Per rank folder: (folder, [(megatron name, shape, dtype), ...]) in write order."""
        return [(r.folder, [(t.name, t.shape, t.dtype) for t in r.tensors]) for r in self.ranks]

    def metadata(self) -> dict:
        """Plain-data facts stored in each rank file under ``vlconvert`` (Megatron ignores the key)."""
        return {"format": 1, "tp": self.tp, "pp": self.pp, "ep": self.ep, "etp": self.etp, "spec": self.spec,
                "experts": self.experts, "vocab": self.vocab, "padded_vocab": self.padded_vocab,
                "stage_layers": list(self.stage_layers),
                "hf_config": json.dumps(self.skeleton.info.raw, sort_keys=True)}

    def training_flags(self) -> str:
        """The Megatron-LM flags that reproduce these shapes."""
        flags = [f"--tensor-model-parallel-size {self.tp}", f"--pipeline-model-parallel-size {self.pp}"]
        if self.skeleton.info.is_moe:
            flags += [f"--expert-model-parallel-size {self.ep}", f"--expert-tensor-parallel-size {self.etp}"]
        if self.pp > 1 and len(set(self.stage_layers)) > 1:
            flags += [f"--decoder-first-pipeline-num-layers {self.stage_layers[0]}",
                      f"--decoder-last-pipeline-num-layers {self.stage_layers[-1]}"]
        flags.append(f"--padded-vocab-size {self.padded_vocab}")
        return " ".join(flags)


def _as_skeleton(model: Skeleton | ModelInfo | dict | str | Path) -> Skeleton:
    return model if isinstance(model, Skeleton) else build_skeleton(model)


def plan_megatron_ranks(model: Skeleton | ModelInfo | dict | str | Path, tp: int = 1, pp: int = 1, ep: int = 1,
                        etp: int | None = None, *, spec: str = "te", experts: str = "grouped",
                        dtype: torch.dtype | None = None, padded_vocab_size: int | None = None,
                        make_vocab_size_divisible_by: int = 128, pp_first_layers: int | None = None,
                        pp_last_layers: int | None = None,
                        source_dtypes: dict[str, torch.dtype] | None = None) -> MegatronPlan:
    """Plan a Megatron-Core legacy checkpoint: per rank folder, every tensor's local name, shape, dtype.

    ``model``: a skeleton, ModelInfo, config dict or config path. ``etp`` defaults to ``tp``. Tensor
    dtypes are ``dtype`` if given, else ``source_dtypes[hf_name]``, else the config's dtype. Raises
    UserError (one line) for sizes that do not divide the model. Touches no weights.
    """
    sk = _as_skeleton(model)
    info = sk.info
    etp = tp if etp is None else etp
    for flag, value in (("--tp", tp), ("--pp", pp), ("--ep", ep), ("--etp", etp)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1")
    _check_heads(info, tp)
    if not info.is_moe and (ep > 1 or etp != tp):
        raise UserError(f"{info.family} is a dense model: --ep and --etp apply only to MoE models")
    if tp % etp:
        raise UserError(f"--etp {etp} must divide --tp {tp} (each TP folder holds expert-TP rank tp % etp)")
    if info.is_moe:
        ops.local_experts(info.experts, ep, 0)
    try:
        stage_layers = ops.pipeline_layers(info.layers, pp, pp_first_layers, pp_last_layers)
    except UserError as exc:
        if pp_first_layers is not None or pp_last_layers is not None:
            raise
        from vlconvert.planning import balanced_pp_split  # planning imports this module

        proposal = balanced_pp_split(sk, pp, dtype)
        if proposal is None:
            raise
        raise UserError(f"{info.layers} layers do not split evenly over --pp {pp}: pass --pp-first-layers "
                        f"{proposal[0]} --pp-last-layers {proposal[1]} (stages {proposal[2]}, balanced for the "
                        "vision tower and embedding on the first stage)") from exc
    vocab = sk.shape_in(EMBED, "released")[0]
    padded = ops.padded_vocab_size(vocab, tp, make_vocab_size_divisible_by, padded_vocab_size)
    params = megatron_params(sk, spec=spec, experts=experts, padded_vocab=padded)
    check_coverage(params, sk)
    offsets = [sum(stage_layers[:i]) for i in range(pp)]
    ranks: list[RankPlan] = []
    for s in range(pp):
        for e in range(ep):
            for t in range(tp):
                tensors = []
                for p in params:
                    where = _placement(p, info, s, e, pp, ep, offsets[s], stage_layers[s])
                    if where is None:
                        continue
                    layer, expert = where
                    size, rank = (etp, t % etp) if p.group == "etp" else (tp, t)
                    axis, segs, shape = _split(p, size, rank)
                    src_dtype = _dtype_for(p, sk, dtype, source_dtypes)
                    tensors.append(RankTensor(p.local_name(layer, expert), shape, src_dtype, axis, segs))
                ranks.append(RankPlan(t, s, e, mlay.rank_folder(t, s, e, pp, ep), tensors))
    plan = MegatronPlan(sk, tp, pp, ep, etp, spec, experts, vocab, padded, stage_layers, ranks, dtype)
    if padded != vocab:
        plan.notes.append(f"vocabulary padded from {vocab} to {padded} rows with zeros "
                          f"(train with --padded-vocab-size {padded})")
    return plan


def _check_heads(info: ModelInfo, tp: int) -> None:
    if info.heads % tp:
        raise UserError(f"--tp {tp} must divide the {info.heads} attention heads")
    if info.kv_heads % tp and tp % info.kv_heads:
        raise UserError(f"--tp {tp} must be a multiple or a divisor of the {info.kv_heads} KV groups")
    if info.vision_heads % tp:
        raise UserError(f"--tp {tp} must divide the {info.vision_heads} vision attention heads "
                        "(the ViT is TP-sharded like the language model)")


def _placement(p: Param, info: ModelInfo, stage: int, ep_rank: int, pp: int, ep: int, offset: int,
               count: int) -> tuple[int | None, int | None] | None:
    """(local layer, local expert) if rank (stage, ep_rank) holds ``p``, else None."""
    if p.stage == "first":
        return (None, None) if stage == 0 else None
    if p.stage == "last":
        if stage != pp - 1:
            return None
        if p.name.endswith("output_layer.weight") and info.tied and pp == 1:
            return None  # tied, one stage: the output layer reuses the word embeddings
        return (None, None)
    if not offset <= p.layer < offset + count:
        return None
    if p.expert is None:
        return (p.layer - offset, None)
    per = info.experts // ep
    if not ep_rank * per <= p.expert < (ep_rank + 1) * per:
        return None
    return (p.layer - offset, p.expert - ep_rank * per)


def _split(p: Param, size: int, rank: int) -> tuple[int, tuple[Seg, ...], tuple[int, ...]]:
    rows = list(p.rows)
    try:
        if p.split == "none" or size == 1 and p.split != "cols":
            return 0, tuple(rows), p.shape
        if p.split == "rows":
            a, b = ops.chunk_range(p.shape[0], size, rank, p.name.format(layer="L", expert="E"))
            segs = ops.slice_row_map(rows, a, b)
            return 0, tuple(segs), (b - a, *p.shape[1:])
        if p.split == "halves":
            half = p.shape[0] // 2
            a, b = ops.chunk_range(half, size, rank, p.name.format(layer="L", expert="E"))
            segs = ops.slice_row_map(rows, a, b) + ops.slice_row_map(rows, half + a, half + b)
            return 0, tuple(segs), (2 * (b - a), *p.shape[1:])
        if p.split == "cols":
            a, b = ops.chunk_range(p.shape[1], size, rank, p.name.format(layer="L", expert="E"))
            return 1, ((rows[0][0], a, b),), (p.shape[0], b - a)
    except UserError as exc:
        raise UserError(f"cannot split {p.name.format(layer='L', expert='E')}: {exc}") from exc
    raise AssertionError(p.split)


def _dtype_for(p: Param, sk: Skeleton, dtype: torch.dtype | None,
               source_dtypes: dict[str, torch.dtype] | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    src = p.sources()[0]
    if source_dtypes and src.hf in source_dtypes:
        return source_dtypes[src.hf]
    return sk.tensors[src.hf].dtype


def check_coverage(params: list[Param], sk: Skeleton) -> None:
    """Every HF tensor feeds some Megatron parameter, and every row map stays inside its source."""
    used: set[str] = set()
    for p in params:
        for src, a, b in p.rows:
            if src is None:
                continue
            if src.hf not in sk.tensors:
                raise UserError(f"mapping error: '{src.hf}' is not a tensor of this {sk.info.family} model")
            used.add(src.hf)
            shape = source_shape(sk, src)
            lim = shape[1] if p.split == "cols" else shape[0]
            if not 0 <= a < b <= max(lim, shape[0]):
                raise UserError(f"mapping error: rows {a}:{b} of '{src}' outside {list(shape)}")
    missing = [k for k in sk.hf_keys() if k not in used]
    if missing:
        raise UserError(f"the Megatron mapping does not cover '{missing[0]}'"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


# ------------------------------------------------------------------------------------------- readers
class HFSourceReader:
    """Source matrices from a Hugging Face folder (experts of either orientation)."""

    def __init__(self, ckpt: HFCheckpoint, sk: Skeleton):
        self.ckpt, self.sk = ckpt, sk
        self._layouts: dict[str, str] = {}
        self._cache: tuple[Src, torch.Tensor] | None = None
        missing = [k for k in sk.hf_keys() if k not in ckpt.tensors]
        if missing:
            raise UserError(f"'{ckpt.folder}' lacks '{missing[0]}', which the config expects"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [k for k in ckpt.tensors if k not in sk.tensors or k == LM_HEAD and sk.info.tied]
        if extra:
            raise UserError(f"'{ckpt.folder}' holds '{extra[0]}', which the config does not expect")
        for name in sk.hf_keys():
            info = ckpt.tensors[name]
            if is_expert(name):
                self._layouts[name] = expert_layout_of(name, info.shape, sk)
            elif info.shape != sk.tensors[name].shape:
                raise UserError(f"'{name}' has shape {list(info.shape)} in '{info.file.name}', "
                                f"the config expects {list(sk.tensors[name].shape)}")

    def dtype(self, src: Src) -> torch.dtype:
        return self.ckpt.tensors[src.hf].dtype

    def _expert(self, src: Src) -> torch.Tensor:
        if self._cache is not None and self._cache[0] == src:
            return self._cache[1]
        block = self.ckpt.read_rows(src.hf, src.expert, src.expert + 1)[0]
        # released stores [in, out] per expert; Megatron wants [out, in]
        mat = block.t().contiguous() if self._layouts[src.hf] == "released" else block
        self._cache = (src, mat)
        return mat

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        if src.expert is not None:
            return self._expert(src)[start:stop]
        return self.ckpt.read_rows(src.hf, start, stop)

    def cols(self, src: Src, start: int, stop: int) -> torch.Tensor:
        if src.expert is not None:
            return self._expert(src)[:, start:stop].contiguous()
        info = self.ckpt.tensors[src.hf]
        rows = info.shape[0]
        out = torch.empty((rows, stop - start, *info.shape[2:]), dtype=info.dtype)
        step = max(1, _BLOCK // max(1, info.nbytes // rows))  # row blocks of about 64 MiB
        for a in range(0, rows, step):
            b = min(rows, a + step)
            out[a:b] = self.ckpt.read_rows(src.hf, a, b)[:, start:stop]
        return out


@dataclass(frozen=True)
class _Piece:
    rank: tuple[int, int, int]
    name: str
    axis: int
    start: int  # range of the source covered (rows for axis 0, columns for axis 1)
    stop: int
    offset: int  # first row of the rank tensor holding ``start`` (axis 0)


class MegatronSourceReader:
    """Source matrices assembled from the rank tensors of a Megatron checkpoint that holds them."""

    def __init__(self, plan: MegatronPlan, layout: mlay.RankLayout, files: dict[tuple[int, int, int], mlay.RankFile]):
        self.plan, self.layout, self.files = plan, layout, files
        self.pieces: dict[Src, list[_Piece]] = {}
        self._dtypes: dict[Src, torch.dtype] = {}
        seen: set[tuple] = set()
        for r in plan.ranks:
            key = (r.tp, r.pp, r.ep)
            for t in r.tensors:
                off = 0
                for src, a, b in t.segs:
                    if src is not None and (src, t.axis, a, b) not in seen:
                        seen.add((src, t.axis, a, b))
                        self.pieces.setdefault(src, []).append(_Piece(key, t.name, t.axis, a, b, off))
                        self._dtypes[src] = files[key].tensors[t.name].dtype
                    off += b - a

    def dtype(self, src: Src) -> torch.dtype:
        return self._dtypes[src]

    def shape(self, src: Src) -> tuple[int, ...]:
        return source_shape(self.plan.skeleton, src)

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        pieces = self.pieces[src]
        shape = self.shape(src)
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
            return self.rows(src, 0, self.shape(src)[0])[:, start:stop].contiguous()
        parts = []
        for p in sorted(pieces, key=lambda p: p.start):
            lo, hi = max(start, p.start), min(stop, p.stop)
            if lo < hi:
                parts.append(self.files[p.rank].read(p.name)[:, lo - p.start:hi - p.start])
        return torch.cat(parts, dim=1).contiguous()


def build_tensor(t: RankTensor, reader, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Execute one rank tensor's recipe against a source reader."""
    out_dtype = dtype or t.dtype
    if t.axis == 1:
        src, a, b = t.segs[0]
        return reader.cols(src, a, b).to(out_dtype)
    parts = []
    for src, a, b in t.segs:
        if src is None:
            parts.append(torch.zeros((b - a, *t.shape[1:]), dtype=out_dtype))
        else:
            parts.append(reader.rows(src, a, b).to(out_dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ----------------------------------------------------------------------------------- reading Megatron
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


@dataclass
class OpenedMegatron:
    """A Megatron checkpoint with its detected parallel sizes, its plan and a reader."""

    layout: mlay.RankLayout
    plan: MegatronPlan
    files: dict[tuple[int, int, int], mlay.RankFile]
    reader: MegatronSourceReader
    notes: list[str]


def open_megatron(root: str | Path, config: str | Path | dict | None = None) -> OpenedMegatron:
    """Open a Megatron legacy checkpoint: detect TP/PP/EP/ETP, spec, expert style and padded vocabulary
    from its folders and tensors (and vlconvert metadata when present), then check every rank against
    the plan those sizes imply. ``config``: HF config.json, folder or dict (needed for checkpoints that
    vlconvert did not write)."""
    layout = mlay.scan_ranks(Path(root), _resolve_two_part)
    files = {k: mlay.RankFile(layout.file(*k)) for k in sorted(layout.folders)}
    notes = list(layout.notes)
    first = files[(0, 0, 0)]
    meta = first.meta
    if config is not None:
        raw = config if isinstance(config, dict) else None
        info = load_config(raw if raw is not None else Path(config))
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
    # layers per stage, from the decoder layer numbers each stage holds
    stage_layers = []
    for s in range(layout.pp):
        nums = {int(n.split(".")[3]) for n in files[(0, s, 0)].tensors if n.startswith(f"{MLM}decoder.layers.")}
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
                               padded_vocab_size=padded, pp_first_layers=first_n, pp_last_layers=last_n,
                               )
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
    # plan dtypes from the files (the config's dtype may differ from what is stored)
    for r in plan.ranks:
        f = files[(r.tp, r.pp, r.ep)]
        r.tensors = [RankTensor(t.name, t.shape, f.tensors[t.name].dtype, t.axis, t.segs) for t in r.tensors]
    notes.append(f"read as TP={layout.tp} PP={layout.pp} EP={layout.ep} ETP={etp}, layers per stage "
                 f"{stage_layers}, spec {spec}, experts {experts}, padded vocab {padded}")
    reader = MegatronSourceReader(plan, layout, files)
    return OpenedMegatron(layout, plan, files, reader, notes)


class MegatronCheckpoint:
    """A Megatron legacy checkpoint seen as canonical HF tensors (the ``CanonicalSource`` protocol).

    Names are HF on-disk names; experts come in the released orientation ([E, H, 2I] / [E, I, H]);
    vocabulary padding is dropped; tied models have no ``lm_head.weight``.
    """

    layout = "megatron"

    def __init__(self, folder: str | Path, config: str | Path | dict | None = None):
        self.opened = open_megatron(folder, config)
        self.skeleton = self.opened.plan.skeleton
        self.notes = self.opened.notes

    def names(self) -> list[str]:
        return self.skeleton.hf_keys()

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        shape = self.skeleton.shape_in(name, "released")
        src = Src(name, 0) if is_expert(name) else Src(name)
        return shape, self.opened.reader.dtype(src)

    def read(self, name: str) -> torch.Tensor:
        reader = self.opened.reader
        if not is_expert(name):
            return reader.rows(Src(name), 0, self.skeleton.shape_in(name, "released")[0])
        n = self.skeleton.shape_in(name, "released")[0]
        return torch.stack([read_expert_released(reader, name, e) for e in range(n)])


def read_expert_released(reader, name: str, expert: int) -> torch.Tensor:
    """Expert ``expert`` of fused tensor ``name`` in the released orientation ([H, 2I] or [I, H])."""
    src = Src(name, expert)
    rows = source_shape(reader.plan.skeleton if hasattr(reader, "plan") else reader.sk, src)[0]
    return reader.rows(src, 0, rows).t().contiguous()


# --------------------------------------------------------------------------------------- conversions
@dataclass
class Result:
    """What a conversion did, for the summary."""

    output: Path
    files: int
    bytes: int
    notes: list[str]
    plan: MegatronPlan | None = None
    extra: dict = field(default_factory=dict)


def write_megatron(plan: MegatronPlan, reader, dst: Path, *, overwrite: bool = False, iteration: int | None = None,
                   progress: Callable[[int], None] | None = None, metadata: bool = True) -> Result:
    """Stream ``plan`` into a new Megatron checkpoint at ``dst`` (published atomically).

    ``metadata=False`` leaves out the ``vlconvert`` key (the files then look like another tool's).
    """
    meta = plan.metadata() if metadata else None
    files = 0
    with staged_output(Path(dst), overwrite=overwrite, needed_bytes=int(plan.total_bytes * 1.01) + 2**20) as stage:
        it_dir = stage / mlay.iteration_folder(iteration)
        it_dir.mkdir()
        for r in plan.ranks:
            folder = it_dir / r.folder
            folder.mkdir()
            entries = [mlay.RankEntry(t.name, t.shape, t.dtype) for t in r.tensors]
            mlay.write_rank_file(folder / mlay.RANK_FILE, entries,
                                 lambda i, _e, ts=r.tensors: build_tensor(ts[i], reader),
                                 extra={mlay.META_KEY: meta} if meta else None, iteration=iteration or 0,
                                 on_bytes=progress)
            files += 1
        mlay.write_tracker(stage, iteration)
    return Result(Path(dst), files, plan.total_bytes, list(plan.notes), plan)


def hf_to_megatron(src: str | Path, dst: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1,
                   etp: int | None = None, spec: str = "te", experts: str = "grouped",
                   dtype: torch.dtype | None = None, padded_vocab_size: int | None = None,
                   make_vocab_size_divisible_by: int = 128, pp_first_layers: int | None = None,
                   pp_last_layers: int | None = None, overwrite: bool = False, iteration: int | None = None,
                   progress_factory=None) -> Result:
    """Convert a Hugging Face Qwen3-VL folder to Megatron-Core legacy rank files."""
    ckpt = HFCheckpoint(src)
    sk = build_skeleton(ckpt.config_path())
    reader = HFSourceReader(ckpt, sk)
    plan = plan_megatron_ranks(sk, tp, pp, ep, etp, spec=spec, experts=experts, dtype=dtype,
                               padded_vocab_size=padded_vocab_size,
                               make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                               pp_first_layers=pp_first_layers, pp_last_layers=pp_last_layers,
                               source_dtypes={k: v.dtype for k, v in ckpt.tensors.items()})
    with _progress(progress_factory, "hf -> megatron", plan.total_bytes) as advance:
        result = write_megatron(plan, reader, Path(dst), overwrite=overwrite, iteration=iteration, progress=advance)
    ckpt.close()
    return result


def reshard(src: str | Path, dst: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
            spec: str | None = None, experts: str | None = None, dtype: torch.dtype | None = None,
            padded_vocab_size: int | None = None, make_vocab_size_divisible_by: int = 128,
            pp_first_layers: int | None = None, pp_last_layers: int | None = None,
            config: str | Path | None = None, overwrite: bool = False, iteration: int | None = None,
            progress_factory=None) -> Result:
    """Megatron -> Megatron with new TP/PP/EP sizes, directly (same bytes as converting from HF)."""
    opened = open_megatron(src, config)
    sk = opened.plan.skeleton
    source_dtypes = {s.hf: opened.reader.dtype(s) for s in opened.reader.pieces}
    plan = plan_megatron_ranks(sk, tp, pp, ep, etp, spec=spec or opened.plan.spec,
                               experts=experts or opened.plan.experts, dtype=dtype,
                               padded_vocab_size=padded_vocab_size,
                               make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                               pp_first_layers=pp_first_layers, pp_last_layers=pp_last_layers,
                               source_dtypes=source_dtypes)
    if Path(dst).absolute() == Path(src).absolute():
        raise UserError("reshard cannot write over its own source: choose another output folder")
    with _progress(progress_factory, "reshard", plan.total_bytes) as advance:
        result = write_megatron(plan, opened.reader, Path(dst), overwrite=overwrite, iteration=iteration,
                                progress=advance)
    result.notes = opened.notes + result.notes
    return result


def megatron_to_hf(src: str | Path, dst: str | Path, *, assets_dir: str | Path, max_shard_size: str | int = "5GB",
                   dtype: torch.dtype | None = None, overwrite: bool = False, progress_factory=None) -> Result:
    """Megatron legacy rank files -> Hugging Face folder: weights from the ranks, every other file copied
    byte for byte from ``assets_dir`` (the original HF folder); experts in the released orientation."""
    assets = Path(assets_dir)
    if not (assets / "config.json").is_file():
        raise UserError(f"--assets-dir '{assets}' has no config.json: give the original Hugging Face folder")
    opened = open_megatron(src, assets / "config.json")
    sk = opened.plan.skeleton
    reader = opened.reader
    planned = []
    for name in sk.hf_keys():
        src_ref = Src(name, 0) if is_expert(name) else Src(name)
        planned.append(PlannedTensor(name, dtype or reader.dtype(src_ref), sk.shape_in(name, "released")))
    shards = plan_shards(planned, parse_size(max_shard_size))
    fnames = shard_file_names(len(shards))
    total = sum(t.nbytes for t in planned)
    weight_map: dict[str, str] = {}
    with staged_output(Path(dst), overwrite=overwrite, needed_bytes=total + 2**20) as stage, \
            _progress(progress_factory, "megatron -> hf", total) as advance:
        copied = copy_assets(assets, stage)
        for fname, shard in zip(fnames, shards, strict=True):
            writer = SafetensorsFileWriter(stage / fname, shard)
            ok = False
            try:
                for t in shard:
                    weight_map[t.name] = fname
                    if is_expert(t.name):
                        for e in range(t.shape[0]):
                            block = read_expert_released(reader, t.name, e).to(t.dtype)
                            advance(writer.write(t.name, block.unsqueeze(0), row_offset=e))
                    else:
                        advance(writer.write(t.name, reader.rows(Src(t.name), 0, t.shape[0]).to(t.dtype)))
                ok = True
            finally:
                if ok:
                    writer.close()
                else:
                    writer.abort()  # keep the original error; the staged folder is removed anyway
        if len(fnames) > 1:
            write_index(stage, weight_map, total)
        elif (stage / "model.safetensors.index.json").exists():
            (stage / "model.safetensors.index.json").unlink()
    return Result(Path(dst), len(fnames), total, opened.notes, opened.plan, {"assets": copied})


class _NullProgress:
    def __enter__(self):
        return lambda n: None

    def __exit__(self, *exc):
        return False


def _progress(factory, description: str, total: int):
    return factory(description, total) if factory is not None else _NullProgress()


__all__ = ["MegatronCheckpoint", "MegatronPlan", "RankPlan", "RankTensor", "hf_to_megatron", "megatron_to_hf",
           "open_megatron", "plan_megatron_ranks", "reshard", "EMBED"]
