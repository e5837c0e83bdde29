"""Family-neutral Megatron machinery: the parameter-table row types, rank plans, TP/EP/PP splits.

A family's table (:meth:`vlconvert.models.family.Family.megatron_params`) lists each Megatron parameter as
one :class:`Param`: its global name (global layer and expert numbers; :mod:`vlconvert.megatron_convert`
renumbers them per rank), its full (unsplit) shape, the rows it is made of (a row map over HF source
matrices) and how tensor parallelism splits it. :func:`plan_megatron_ranks` turns the table into one
:class:`RankPlan` per rank folder; nothing here names a family or a tensor.

Source matrices (:class:`Src`) are canonical HF tensors in HF orientation, except fused experts:
``Src(name, e)`` is expert ``e`` of a fused expert tensor seen in Megatron orientation ``[out, in]``
(``gate_up`` -> [2I, H], ``down`` -> [H, I]), whatever orientation the file stores.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from vlconvert import ops
from vlconvert.dtypes import BFLOAT16, FLOAT32, DType, as_dtype, element_size, is_torch_dtype, parse_dtype
from vlconvert.errors import UsageError, UserError
from vlconvert.layouts.hf import PlannedTensor
from vlconvert.layouts.megatron import rank_folder
from vlconvert.models.base import ModelInfo, Skeleton
from vlconvert.models.family import EXPERT_STYLES, SPECS, Family

__all__ = ["EXPERT_STYLES", "SPECS", "MegatronPlan", "Param", "RankPlan", "RankTensor", "Seg", "Src",
           "balanced_pp_split", "canonical_tensors", "check_coverage", "config_bytes", "hf_vision_tensors", "layer_of",
           "megatron_params", "output_dtype", "plan_megatron_ranks", "propose_pp_split", "source_shape",
           "stage_bytes_inputs", "stage_costs", "stage_layer_counts"]


@dataclass(frozen=True)
class Src:
    """A source matrix: a whole HF tensor, or expert ``expert`` of a fused expert tensor ([out, in])."""

    hf: str
    expert: int | None = None

    def __str__(self) -> str:
        return self.hf if self.expert is None else f"{self.hf}[{self.expert}]"


@dataclass(frozen=True)
class Param:
    """One Megatron parameter, globally numbered, and how to build it from HF source matrices.

    ``rows``: the full tensor's dim-0 rows as ``(Src | None, start, stop)``; ``None`` = zero rows
    (vocab padding). ``split``: ``none`` (replicated), ``rows`` (column parallel / vocab: chunk of
    ``rows``), ``halves`` (gated fc1: each half of ``rows`` chunked separately), ``cols`` (row parallel:
    chunk of dim 1 of the single source), ``blocks`` (consecutive row blocks of sizes ``blocks``, a field of
    the family's Param subclass, each chunked separately: GDN ``in_proj`` / ``conv1d``). ``group``: ``tp`` or
    ``etp`` (expert tensor parallel). ``stage``: ``first`` (ViT, embedding), ``last`` (final norm, output
    layer) or ``layer``.
    """

    name: str  # global name; layer/expert numbers are placeholders {layer} and {expert}
    shape: tuple[int, ...]
    rows: tuple[tuple[Src | None, int, int], ...]
    split: str
    group: str = "tp"
    stage: str = "first"
    layer: int | None = None
    expert: int | None = None

    def local_name(self, layer: int | None = None, expert: int | None = None) -> str:
        """The name inside a rank file (local layer and expert numbers)."""
        return self.name.format(layer=layer, expert=expert)

    def sources(self) -> list[Src]:
        """Every source matrix this parameter reads."""
        seen: dict[Src, None] = {}
        for src, _, _ in self.rows:
            if src is not None:
                seen[src] = None
        return list(seen)


def _whole(src: Src, shape: tuple[int, ...], name: str, split: str = "none", **kw) -> Param:
    return Param(name, shape, ((src, 0, shape[0]),), split, **kw)


def source_shape(skeleton: Skeleton, src: Src) -> tuple[int, ...]:
    """Shape of a source matrix (experts: one expert, Megatron orientation), as the family says."""
    return skeleton.family.source_shape(skeleton, src)


def megatron_params(skeleton: Skeleton, *, spec: str = "te", experts: str = "grouped",
                    padded_vocab: int | None = None) -> list[Param]:
    """Every Megatron parameter of the model in state-dict order, globally numbered, with its recipe (the
    model family's table)."""
    if spec not in SPECS:
        raise UsageError(f"unknown --spec '{spec}': use one of {', '.join(SPECS)}")
    if experts not in EXPERT_STYLES:
        raise UsageError(f"unknown --experts '{experts}': use one of {', '.join(EXPERT_STYLES)}")
    return skeleton.family.megatron_params(skeleton, spec=spec, experts=experts, padded_vocab=padded_vocab)


# ------------------------------------------------------------------------------------- rank plans
Seg = tuple[Src | None, int, int]


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class RankTensor:
    """One tensor of one rank file: local name, shape, dtype, and its recipe.

    ``axis`` 0: the tensor is the concatenation along dim 0 of ``segs`` (rows of sources; ``None`` = zero
    rows). ``axis`` 1: it is columns ``segs[0][1]:segs[0][2]`` of the single source ``segs[0][0]``.
    ``value_op``: the family's value op (Megatron value = op(HF value), e.g. ``minus_one``), or None.
    """

    name: str
    shape: tuple[int, ...]
    dtype: DType
    axis: int
    segs: tuple[Seg, ...]
    value_op: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


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
    dtype: DType | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.ranks)

    def listing(self) -> list[tuple[str, list[tuple[str, tuple[int, ...], DType]]]]:
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
    if isinstance(model, Skeleton):
        return model
    from vlconvert.models.registry import build_skeleton

    return build_skeleton(model)


def plan_megatron_ranks(model: Skeleton | ModelInfo | dict | str | Path, tp: int = 1, pp: int = 1, ep: int = 1,
                        etp: int | None = None, *, spec: str = "te", experts: str = "grouped",
                        dtype: DType | None = None, padded_vocab_size: int | None = None,
                        make_vocab_size_divisible_by: int = 128, pp_first_layers: int | None = None,
                        pp_last_layers: int | None = None,
                        source_dtypes: dict[str, DType] | None = None) -> MegatronPlan:
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
            raise UsageError(f"{flag} must be at least 1")
    sk.family.check_tensor_parallel(info, tp)
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
        proposal = balanced_pp_split(sk, pp, dtype)
        if proposal is None:
            raise
        raise UserError(f"{info.layers} layers do not split evenly over --pp {pp}: pass --pp-first-layers "
                        f"{proposal[0]} --pp-last-layers {proposal[1]} (stages {proposal[2]}, balanced for the "
                        "vision tower and embedding on the first stage)") from exc
    vocab = sk.shape_in(sk.family.embed, "released")[0]
    padded = ops.padded_vocab_size(vocab, tp, make_vocab_size_divisible_by, padded_vocab_size)
    params = megatron_params(sk, spec=spec, experts=experts, padded_vocab=padded)
    check_coverage(params, sk)
    offsets = [sum(stage_layers[:i]) for i in range(pp)]
    held: dict[tuple[int, int], list[tuple[Param, int | None, int | None]]] = {}
    per_rank = info.experts // ep if info.is_moe else 0
    for p in params:  # which (stage, EP rank) holds each parameter, in state-dict order
        for s in _stages_of(p, pp, offsets, stage_layers):
            # a routed expert lives on one EP rank only; anything else may be on every one
            for e in range(ep) if p.expert is None or not per_rank else (p.expert // per_rank,):
                where = _placement(p, info, s, e, pp, ep, offsets[s], stage_layers[s])
                if where is not None:
                    held.setdefault((s, e), []).append((p, *where))
    ranks: list[RankPlan] = []
    for s in range(pp):
        for e in range(ep):
            for t in range(tp):
                tensors = []
                for p, layer, expert in held.get((s, e), []):
                    size, rank = (etp, t % etp) if p.group == "etp" else (tp, t)
                    axis, segs, shape = _split(p, size, rank)
                    src_dtype = _dtype_for(p, sk, dtype, source_dtypes)
                    tensors.append(RankTensor(p.local_name(layer, expert), shape, src_dtype, axis, segs,
                                              getattr(p, "value_op", None)))
                ranks.append(RankPlan(t, s, e, rank_folder(t, s, e, pp, ep), tensors))
    plan = MegatronPlan(sk, tp, pp, ep, etp, spec, experts, vocab, padded, stage_layers, ranks, dtype)
    if padded != vocab:
        plan.notes.append(f"vocabulary padded from {vocab} to {padded} rows with zeros "
                          f"(train with --padded-vocab-size {padded})")
    return plan


def _stages_of(p: Param, pp: int, offsets: list[int], counts: list[int]) -> list[int]:
    """The pipeline stages that may hold ``p`` (``_placement`` decides the rest)."""
    if p.stage == "first":
        return [0]
    if p.stage == "last":
        return [pp - 1]
    return [s for s in range(pp) if offsets[s] <= p.layer < offsets[s] + counts[s]]


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
        if p.expert is not None:  # an MTP layer's routed expert: EP-placed like the decoder's
            per = info.experts // ep
            return (None, p.expert - ep_rank * per) if ep_rank * per <= p.expert < (ep_rank + 1) * per else None
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
    rows = p.rows  # (the except below names the parameter: formatting it on every call cost 0.2 s for a 235B)
    try:
        if p.split == "none" or size == 1 and p.split != "cols":
            return 0, tuple(rows), p.shape
        if p.split == "rows":
            a, b = ops.chunk_range(p.shape[0], size, rank)
            segs = ops.slice_row_map(rows, a, b)
            return 0, tuple(segs), (b - a, *p.shape[1:])
        if p.split == "halves":
            half = p.shape[0] // 2
            a, b = ops.chunk_range(half, size, rank)
            segs = ops.slice_row_map(rows, a, b) + ops.slice_row_map(rows, half + a, half + b)
            return 0, tuple(segs), (2 * (b - a), *p.shape[1:])
        if p.split == "cols":
            a, b = ops.chunk_range(p.shape[1], size, rank)
            return 1, ((rows[0][0], a, b),), (p.shape[0], b - a)
        if p.split == "blocks":  # consecutive row blocks (``p.blocks``), each chunked over the ranks separately
            segs, start = [], 0
            for n in getattr(p, "blocks", ()):
                a, b = ops.chunk_range(n, size, rank)
                segs += ops.slice_row_map(rows, start + a, start + b)
                start += n
            return 0, tuple(ops.merge_row_map(segs)), (ops.total_rows(segs), *p.shape[1:])
    except UserError as exc:
        raise UserError(f"cannot split {p.name.format(layer='L', expert='E')}: {exc}") from exc
    raise AssertionError(p.split)


def _dtype_for(p: Param, sk: Skeleton, dtype: DType | None,
               source_dtypes: dict[str, DType] | None) -> DType:
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


# ------------------------------------------------------------------------------------ output tensors
def output_dtype(skeleton: Skeleton, dtype: str | DType | None) -> DType:
    """The dtype a conversion writes: the one asked for, else the config's, else bf16."""
    if isinstance(dtype, DType) or is_torch_dtype(dtype):
        return as_dtype(dtype)
    return parse_dtype(dtype) or skeleton.info.dtype or BFLOAT16


def canonical_tensors(skeleton: Skeleton, dtype: DType) -> list[PlannedTensor]:
    """The tensors a Hugging Face folder of this config holds (released expert orientation)."""
    return [PlannedTensor(n, dtype, skeleton.shape_in(n, "released")) for n in skeleton.hf_keys()]


def config_bytes(skeleton: Skeleton, dtype: DType | None = None) -> int:
    """Sum over the config's shapes (each HF tensor once) at ``dtype`` (default: the config's)."""
    dtype = dtype or output_dtype(skeleton, None)
    return sum(t.nbytes for t in canonical_tensors(skeleton, dtype))


def layer_of(name: str, family: Family | None = None) -> int | None:
    """The decoder layer index of a canonical name of ``family`` (default: the first registered family whose
    layer names match), or None."""
    if family is not None:
        return family.layer_of(name)
    from vlconvert.models.registry import FAMILIES

    for candidate in FAMILIES:
        layer = candidate.layer_of(name)
        if layer is not None:
            return layer
    return None


def hf_vision_tensors(skeleton: Skeleton, dtypes: dict[str, DType], prefix: str) -> list[RankTensor]:
    """The HF vision tower kept as a plain module (ms-swift, Megatron-Bridge 0.3): every vision tensor under
    ``prefix`` + its name inside the tower, HF shape and row order, unstacked."""
    family = skeleton.family
    vision = family.hf_vision_prefix or ""
    out = []
    for name in skeleton.hf_keys():
        if family.is_vision(name):
            shape = tuple(skeleton.shape_in(name, "released"))
            dtype = dtypes.get(name) or skeleton.info.dtype or FLOAT32
            out.append(RankTensor(prefix + name[len(vision):], shape, dtype, 0, ((Src(name), 0, shape[0]),)))
    return out


# ----------------------------------------------------------------------------------- pipeline stages
def stage_layer_counts(layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Decoder layers per pipeline stage: :func:`vlconvert.ops.pipeline_layers` (the rule the Megatron
    converter applies), raising ValueError, a failed plan check, instead of a user error."""
    if first is None and last is None and pp > 1 and layers % pp:
        # the plan proposes balanced counts itself (propose_pp_split), so no generic suggestion here
        raise ValueError(f"{layers} layers do not divide by pp {pp}")
    try:
        return ops.pipeline_layers(layers, pp, first, last)
    except UserError as exc:
        raise ValueError(str(exc)) from exc


def stage_costs(counts: list[int], layer_bytes: list[int], first_extra: int, last_extra: int) -> list[int]:
    """Bytes per pipeline stage for given layer counts (extras: vision+embedding first, head last)."""
    costs, start = [], 0
    for count in counts:
        costs.append(sum(layer_bytes[start:start + count]))
        start += count
    costs[0] += first_extra
    costs[-1] += last_extra
    return costs


def stage_bytes_inputs(skeleton: Skeleton, pp: int, dtype: DType | None = None
                       ) -> tuple[list[int], int, int]:
    """Bytes per decoder layer, plus what the first stage (vision tower, embedding) and the last stage
    (final norm, output layer: its own copy when embeddings are tied) carry besides layers."""
    info = skeleton.info
    dtype = dtype or info.dtype or BFLOAT16
    layer_bytes = [0] * info.layers
    first_extra = last_extra = 0
    family = skeleton.family
    for t in canonical_tensors(skeleton, dtype):
        stage = family.stage_of(t.name)
        if stage == "layer":
            layer_bytes[family.layer_of(t.name)] += t.nbytes
        elif stage == "first":
            first_extra += t.nbytes
        else:
            last_extra += t.nbytes
    if info.tied and pp > 1:
        last_extra += info.vocab * info.hidden * element_size(dtype)
    return layer_bytes, first_extra, last_extra


def balanced_pp_split(skeleton: Skeleton, pp: int, dtype: DType | None = None
                      ) -> tuple[int, int, list[int], list[int]] | None:
    """First/last-stage layer counts balancing bytes per pipeline stage for this model (see
    :func:`propose_pp_split`); returns (first, last, counts, stage bytes) or None."""
    layer_bytes, first_extra, last_extra = stage_bytes_inputs(skeleton, pp, dtype)
    return propose_pp_split(layer_bytes, pp, first_extra, last_extra)


def propose_pp_split(layer_bytes: list[int], pp: int, first_extra: int, last_extra: int
                     ) -> tuple[int, int, list[int], list[int]] | None:
    """First/last-stage layer counts that minimise the largest stage (ties: the most even stages).

    Returns (first, last, counts, stage bytes), or None for pp < 2 or too few layers.
    """
    layers = len(layer_bytes)
    if pp < 2 or layers < pp:
        return None
    best = None
    for first in range(1, layers):
        for last in range(1, layers - first + 1):
            try:
                counts = stage_layer_counts(layers, pp, first, last)
            except ValueError:
                continue
            costs = stage_costs(counts, layer_bytes, first_extra, last_extra)
            key = (max(costs), max(costs) - min(costs), abs(first - last))
            if best is None or key < best[0]:
                best = (key, first, last, counts, costs)
    if best is None:
        return None
    return best[1], best[2], best[3], best[4]
