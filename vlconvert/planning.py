"""``vlconvert plan``: what a conversion would write, computed from the meta-device skeleton alone.

Nothing here reads tensor data or allocates weight memory: the skeleton gives every key, shape and
dtype; the output layouts (HF shards, a DCP folder, Megatron rank folders) are computed from it.
Megatron per-rank sizes follow the split rules of ``reference/megatron-layout.md`` §4: column-parallel
tensors split on dim 0, row-parallel on dim 1, gate and up split separately (same bytes), vocab rows
padded to a multiple of ``make_vocab_size_divisible_by * TP``, experts in contiguous EP blocks and
split by expert-TP, every EP folder repeating the non-expert tensors, the vision tower and the
embedding on the first pipeline stage, the final norm and output layer on the last.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlconvert import ops
from vlconvert.dtypes import BFLOAT16, DType, dtype_name, element_size
from vlconvert.errors import UsageError, UserError
from vlconvert.layouts.hf import PlannedTensor, parse_size, plan_shards, shard_file_names
from vlconvert.locate import resolve_source
from vlconvert.models.base import Skeleton
from vlconvert.models.family import Family
from vlconvert.models.megatron_table import (  # noqa: F401 - re-exported: the plan command's split rules
    MegatronPlan,
    balanced_pp_split,
    canonical_tensors,
    config_bytes,
    layer_of,
    output_dtype,
    plan_megatron_ranks,
    propose_pp_split,
    stage_bytes_inputs,
    stage_costs,
    stage_layer_counts,
)
from vlconvert.models.registry import build_skeleton, load_config
from vlconvert.progress import human_bytes
from vlconvert.publish import empty_folder
from vlconvert.sources import detect_layout, open_source

TARGETS = ("hf", "dcp", "megatron", "torch_dist")
DEFAULT_VOCAB_DIVISOR = 128  # Megatron-LM's --make-vocab-size-divisible-by default
PROBE_BYTES = 64 * 2**20
RECORD_OVERHEAD = 2048  # bytes a torch.save record adds around a DCP tensor (dcp_convert measures ~1.5 KB)

# Megatron tensor-parallel split of each canonical (HF) tensor, by name suffix.
_COLUMN = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
           "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "mlp.gate_proj.weight",
           "mlp.up_proj.weight", "attn.qkv.weight", "attn.qkv.bias", "linear_fc1.weight", "linear_fc1.bias")
_ROW = ("self_attn.o_proj.weight", "mlp.down_proj.weight", "attn.proj.weight", "linear_fc2.weight")


@dataclass
class Check:
    """One validation of the plan: ``ok`` False with ``blocking`` True makes the plan fail."""

    name: str
    ok: bool
    message: str
    blocking: bool = True


@dataclass
class FilePlan:
    """One output file (HF shard, DCP data file)."""

    name: str
    bytes: int
    tensors: int


@dataclass
class RankPlan:
    """One Megatron rank folder: what it holds."""

    folder: str
    tp: int
    pp: int
    ep: int
    bytes: int
    tensors: int
    layers: list[int]  # global [first, last] decoder layers held (empty when none)
    experts: list[int]  # global [first, last] experts held per MoE layer (empty for dense)


@dataclass
class Plan:
    """Everything ``vlconvert plan`` reports; ``to_dict`` is the ``--json`` output."""

    to: str
    family: str
    model: str | None
    dtype: str
    tensor_count: int
    config_bytes: int  # sum over the config's shapes at the output dtype (each tensor once)
    total_bytes: int  # bytes the conversion writes (tensor data; Megatron: summed over rank folders)
    files: list[FilePlan] = field(default_factory=list)
    ranks: list[RankPlan] = field(default_factory=list)
    parallel: dict[str, Any] = field(default_factory=dict)
    vocab: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)
    experts: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    disk: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok or not c.blocking for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.blocking]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


# -------------------------------------------------------------------------------------- disk speed
def measure_disk_speed(folder: str | Path, size: int = PROBE_BYTES) -> tuple[float, Path]:
    """Write ``size`` bytes into ``folder`` (or its nearest existing parent), fsync, delete.

    Returns (bytes per second, folder probed).
    """
    probe_dir = existing_parent(folder)
    path = probe_dir / f".vlconvert-disk-probe-{os.getpid()}"
    block = os.urandom(4 * 2**20)
    written = 0
    try:
        start = time.perf_counter()
        with open(path, "wb") as f:
            while written < size:
                n = min(len(block), size - written)
                f.write(block[:n])
                written += n
            f.flush()
            os.fsync(f.fileno())
        elapsed = max(time.perf_counter() - start, 1e-6)
    except OSError as exc:
        raise UserError(f"cannot write a disk-speed probe in '{probe_dir}': {exc.strerror}") from exc
    finally:
        path.unlink(missing_ok=True)
    return written / elapsed, probe_dir


def measure_checksum_speed(size: int = 16 * 2**20) -> float:
    """Bytes per second this machine hashes with sha256 for the manifest: one core's rate times the hashing
    threads (:data:`vlconvert.hashing.THREADS`: 64 MiB pieces are hashed in parallel)."""
    import hashlib

    from vlconvert.hashing import THREADS

    block = bytes(size)
    start = time.perf_counter()
    hashlib.sha256(block).digest()
    return THREADS * size / max(time.perf_counter() - start, 1e-6)


def startup_seconds() -> float:
    """Seconds this process took to get here (python, torch, the plan): what a conversion pays before its
    first byte. Linux: from the process start time; elsewhere 2 s."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / ticks
        with open("/proc/uptime") as f:
            now = float(f.read().split()[0])
        return max(0.0, now - started)
    except (OSError, ValueError, IndexError):
        return 2.0


def existing_parent(folder: str | Path) -> Path:
    """``folder`` itself if it exists, else its nearest existing ancestor."""
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# ------------------------------------------------------------------------------------- the planners
def _hf_plan(plan: Plan, skeleton: Skeleton, dtype: DType, max_shard_size: int) -> None:
    tensors = canonical_tensors(skeleton, dtype)
    shards = plan_shards(tensors, max_shard_size)
    names = shard_file_names(len(shards))
    plan.files = [FilePlan(n, sum(t.nbytes for t in s), len(s)) for n, s in zip(names, shards, strict=True)]
    plan.total_bytes = sum(f.bytes for f in plan.files)
    experts = "experts in the released orientation; " if skeleton.info.is_moe else ""
    index = "plus model.safetensors.index.json and " if len(shards) > 1 else "plus "
    plan.notes.append(f"{experts}shards of at most {max_shard_size:,} bytes; {index}the assets copied from "
                      "--assets-dir")


def _dcp_plan(plan: Plan, skeleton: Skeleton, dtype: DType, experts_layout: str,
              source: str | Path | None) -> None:
    """As ``hf_to_dcp`` writes: every model key (tied models get an lm_head copy), one data file per
    source shard (``__0_{i}.distcp``), experts in ``experts_layout``."""
    tensors = [PlannedTensor(n, dtype, skeleton.shape_in(n, experts_layout)) for n in skeleton.tensors]
    file_of: dict[str, int] = {}
    if source is not None and detect_layout(Path(source)) == "hf":
        from vlconvert.layouts.hf import HFCheckpoint

        ckpt = HFCheckpoint(source)
        index = {f: i for i, f in enumerate(ckpt.shards)}
        for t in tensors:
            tied_head = t.name == skeleton.family.output and skeleton.info.tied
            src_name = skeleton.family.embed if tied_head else t.name
            if src_name in ckpt.tensors:
                file_of[t.name] = index[ckpt.tensors[src_name].file]
        ckpt.close()
    files: dict[int, FilePlan] = {}
    for t in tensors:
        i = file_of.get(t.name, 0)
        f = files.setdefault(i, FilePlan(f"__0_{i}.distcp", 0, 0))
        f.bytes += t.nbytes
        f.tensors += 1
    plan.files = [files[i] for i in sorted(files)] + [FilePlan(".metadata", 0, 0), FilePlan("config.json", 0, 0)]
    plan.total_bytes = sum(t.nbytes for t in tensors)
    plan.tensor_count = len(tensors)
    plan.experts["layout"] = experts_layout if skeleton.info.is_moe else None
    if skeleton.info.tied:
        plan.notes.append("tied model: lm_head.weight is written as a copy of the embedding (as dcp.save of the "
                          "model's state dict does), so the DCP holds one tensor more than the HF folder")
    if not file_of:
        plan.notes.append("hf-to-dcp writes one data file per source shard: give --source for the split")
    plan.notes.append(f"one torch.save record per tensor (~{RECORD_OVERHEAD} bytes of framing each, not counted "
                      "in the tensor bytes)" + (f"; experts in the '{experts_layout}' orientation"
                                                if skeleton.info.is_moe else ""))


def _megatron_split(name: str, family: Family) -> str:
    if name in (family.embed, family.output):
        return "vocab"
    if family.is_expert(name):
        return "expert_fc1" if name.endswith("gate_up_proj") else "expert_fc2"
    if family.is_routed_expert(name):  # one expert's 2-D gate / up (fc1 halves) or down (fc2) matrix
        return "expert_down" if name.endswith("down_proj.weight") else "expert_half"
    if family.is_vision(name) and not family.vision_tensor_parallel:  # the HF vision tower kept whole
        return "replicated"
    if name.endswith(_COLUMN):
        return "column"
    if name.endswith(_ROW):
        return "row"
    return "replicated"


def _part(name: str, family: Family) -> str:
    """'vision linear_fc1' / 'language gate_proj': which tower a TP check is about (both have a linear_fc1)."""
    tower = "vision" if family.is_vision(name) else "language"
    return f"{tower} {name.split('.')[-2]}"


def _div(n: int, d: int, what: str, checks: list[Check], seen: set[str]) -> int:
    if n % d:
        if what not in seen:
            seen.add(what)
            checks.append(Check(f"divisible:{what}", False, f"{what} = {n} does not divide by {d}"))
        return math.ceil(n / d)
    return n // d


def _megatron_checks(info, family: Family, tp: int, pp: int, ep: int, etp: int, checks: list[Check]) -> None:
    def add(name: str, ok: bool, message: str, blocking: bool = True) -> None:
        checks.append(Check(name, ok, message, blocking))

    for label, value in (("tp", tp), ("pp", pp), ("ep", ep), ("etp", etp)):
        if value < 1:
            raise UsageError(f"--{label} must be at least 1")
    add("heads % tp", info.heads % tp == 0, f"{info.heads} attention heads {'' if info.heads % tp == 0 else 'not '}"
        f"divisible by tp {tp}")
    g = info.kv_heads
    kv_ok = g % tp == 0 or tp % g == 0
    add("kv groups vs tp", kv_ok, f"{g} KV groups must be a multiple or a divisor of tp {tp}: "
        + ("ok" if kv_ok else "fails (Megatron's rule)"))
    if kv_ok and tp > g:
        add("tp > kv groups", False, f"tp {tp} > {g} KV groups: ranks hold row slices inside a group; needs "
            "Megatron-LM with 'Support TP greater than num_kv_heads' (f7dfb99795, 2025-12)", blocking=False)
    if family.vision_tensor_parallel:
        add("vision heads % tp", info.vision_heads % tp == 0,
            f"{info.vision_heads} vision heads {'' if info.vision_heads % tp == 0 else 'not '}divisible by tp {tp}")
    if info.is_moe:
        add("experts % ep", info.experts % ep == 0,
            f"{info.experts} experts {'' if info.experts % ep == 0 else 'not '}divisible by ep {ep}"
            + (f": {info.experts // ep} per EP rank" if info.experts % ep == 0 else ""))
        add("tp % etp", tp % etp == 0 and etp <= tp,
            f"expert TP {etp} must divide tp {tp} (expert shard of folder mp_rank_t is t % etp)")
        add("moe ffn % etp", info.moe_intermediate % etp == 0,
            f"moe_intermediate_size {info.moe_intermediate} by etp {etp}")
    elif ep != 1 or etp not in (1, tp):
        add("ep on dense", False, f"ep {ep} / etp {etp} given for a dense model: use ep 1")
    if pp > info.layers:
        raise UserError(f"--pp {pp} is more than the {info.layers} decoder layers")


def _torch_dist_plan(plan: Plan, skeleton: Skeleton, dtype: DType, consumer: str | None, tp: int,
                     divisible_by: int, padded_size: int | None) -> None:
    """As ``convert --to torch_dist --for CONSUMER`` writes: one data file of global tensors, the framework's
    own files beside it."""
    from vlconvert.layouts.consumers import consumer as consumer_named
    from vlconvert.targets.torch_dist import torch_dist_plan, vocab_rows

    options = {"consumer": consumer, "tp": tp, "pp": 1, "ep": 1, "iteration": None, "padded_vocab_size": padded_size,
               "make_vocab_size_divisible_by": divisible_by}
    flavour = consumer_named(consumer)
    rows = vocab_rows(skeleton.info.vocab, options, flavour)
    tdplan = torch_dist_plan(skeleton, options, dtype, {}, rows, "(config)", "config", "te")
    plan.files = [FilePlan(f.name, f.nbytes, len(f.tensors)) for f in tdplan.files]
    plan.files += [FilePlan(name, 0, 0) for name in tdplan.assets]
    plan.total_bytes = sum(f.nbytes for f in tdplan.files)
    plan.tensor_count = sum(len(f.tensors) for f in tdplan.files)
    pad = rows - skeleton.info.vocab
    plan.vocab = {"rows": skeleton.info.vocab, "padded_rows": rows, "pad_rows": pad,
                  "pad_bytes": pad * skeleton.info.hidden * element_size(dtype) * (1 if skeleton.info.tied else 2)}
    plan.notes += [n for n in tdplan.notes if not n.startswith("--pp/--ep")]


def _megatron_plan(plan: Plan, skeleton: Skeleton, dtype: DType, tp: int, pp: int, ep: int, etp: int,
                   first: int | None, last: int | None, divisible_by: int, padded_size: int | None) -> None:
    info = skeleton.info
    family = skeleton.family
    checks = plan.checks
    _megatron_checks(info, skeleton.family, tp, pp, ep, etp, checks)
    esize = element_size(dtype)
    tensors = canonical_tensors(skeleton, dtype)

    # vocab padding
    try:
        rows = ops.padded_vocab_size(info.vocab, tp, divisible_by, padded_size)
    except UserError as exc:  # an explicit size smaller than the vocabulary or not divisible by tp
        checks.append(Check("padded vocab", False, str(exc)))
        rows = padded_size or info.vocab
    pad_rows = max(0, rows - info.vocab)
    vocab_tensors = 1 if info.tied else 2
    plan.vocab = {"rows": info.vocab, "padded_rows": rows, "pad_rows": pad_rows,
                  "divisible_by": None if padded_size else divisible_by * tp,
                  "pad_bytes": pad_rows * info.hidden * esize * vocab_tensors}

    # pipeline stages
    layer_bytes, first_extra, last_extra = stage_bytes_inputs(skeleton, pp, dtype)
    proposal = propose_pp_split(layer_bytes, pp, first_extra, last_extra)
    source = "given" if (first is not None or last is not None) else "even"
    try:
        counts = stage_layer_counts(info.layers, pp, first, last)
        checks.append(Check("pp layers", True, f"{info.layers} layers over pp {pp}: {counts}"))
    except ValueError as exc:
        hint = ""
        if proposal is not None:
            hint = f"; use --pp-first-layers {proposal[0]} --pp-last-layers {proposal[1]} (stages {proposal[2]})"
        checks.append(Check("pp layers", False, f"{exc}{hint}"))
        if proposal is None:
            counts = [math.ceil(info.layers / pp)] * pp
            counts[-1] = info.layers - sum(counts[:-1])
            source = "invalid"
        else:
            counts, source = proposal[2], "proposed"
    plan.pipeline = {"layers": info.layers, "stage_layers": counts, "source": source,
                     "stage_bytes": stage_costs(counts, layer_bytes, first_extra, last_extra) if pp else []}
    if proposal is not None:
        plan.pipeline["proposal"] = {"pp_first_layers": proposal[0], "pp_last_layers": proposal[1],
                                     "stage_layers": proposal[2], "stage_bytes": proposal[3]}
    stage_of: list[int] = []
    for s, c in enumerate(counts):
        stage_of += [s] * c
    starts = [sum(counts[:s]) for s in range(pp)]

    if family.plan_from_table:  # tensors the split rules below do not know (GDN blocks, MTP): the table's ranks
        _megatron_plan_from_table(plan, skeleton, dtype, tp, pp, ep, etp, counts, first, last, divisible_by,
                                  padded_size)
        return
    # per-tensor bytes in one TP rank of one (stage, EP) folder
    seen: set[str] = set()
    per_stage = [0] * pp  # non-expert bytes in each folder of the stage
    per_stage_n = [0] * pp
    expert_stage = [0] * pp  # expert bytes in each folder of the stage
    expert_stage_n = [0] * pp
    unique = 0
    local_experts = info.experts // ep if info.is_moe and info.experts % ep == 0 else \
        (math.ceil(info.experts / ep) if info.is_moe else 0)
    for t in tensors:
        layer = family.layer_of(t.name)
        if layer is not None:
            stage = stage_of[layer]
        elif family.is_vision(t.name) or t.name == family.embed:
            stage = 0
        else:
            stage = pp - 1
        kind = _megatron_split(t.name, family)
        shape = t.shape
        rest = math.prod(shape[1:]) if len(shape) > 1 else 1
        if kind == "vocab":
            b = _div(rows, tp, "padded vocab rows by tp", checks, seen) * rest * esize
            per_stage[stage] += b
            per_stage_n[stage] += 1
            unique += b * tp
            if t.name == family.embed and info.tied and pp > 1:
                per_stage[pp - 1] += b
                per_stage_n[pp - 1] += 1
                unique += b * tp
        elif kind == "column":
            b = _div(shape[0], tp, f"{_part(t.name, family)} rows by tp", checks, seen) * rest * esize
            per_stage[stage] += b
            per_stage_n[stage] += 1
            unique += b * tp
        elif kind == "row":
            b = shape[0] * _div(shape[1], tp, f"{_part(t.name, family)} columns by tp", checks, seen) * esize
            per_stage[stage] += b
            per_stage_n[stage] += 1
            unique += b * tp
        elif kind in ("expert_half", "expert_down"):
            # per-expert [I, H] gate or up (rows by etp) and [H, I] down (columns by etp); each on one EP rank
            if kind == "expert_half":
                b = _div(shape[0], etp, "moe ffn by etp", checks, seen) * shape[1] * esize
            else:
                b = shape[0] * _div(shape[1], etp, "moe ffn by etp", checks, seen) * esize
            expert = int(re.search(r"\.experts\.(\d+)\.", t.name).group(1))
            if expert < local_experts:  # the experts of EP rank 0 (every EP rank holds as many)
                expert_stage[stage] += b
                expert_stage_n[stage] += kind == "expert_down"
            unique += b * etp
        elif kind in ("expert_fc1", "expert_fc2"):
            # released gate_up [E, H, 2I] -> per expert fc1 [2I/etp, H]; down [E, I, H] -> fc2 [H, I/etp]
            split = shape[2] if kind == "expert_fc1" else shape[1]
            other = shape[1] if kind == "expert_fc1" else shape[2]
            if kind == "expert_fc1":
                per_expert = 2 * _div(split // 2, etp, "moe ffn by etp", checks, seen) * other * esize
            else:
                per_expert = _div(split, etp, "moe ffn by etp", checks, seen) * other * esize
            expert_stage[stage] += local_experts * per_expert
            expert_stage_n[stage] += local_experts
            unique += info.experts * per_expert * etp
        else:
            per_stage[stage] += t.nbytes
            per_stage_n[stage] += 1
            unique += t.nbytes
    ranks = []
    for p in range(pp):
        layers = [starts[p], starts[p] + counts[p] - 1] if counts[p] else []
        for e in range(ep):
            experts = [e * local_experts, (e + 1) * local_experts - 1] if info.is_moe else []
            for t_rank in range(tp):
                folder = f"mp_rank_{t_rank:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
                ranks.append(RankPlan(f"release/{folder}/model_optim_rng.pt", t_rank, p, e,
                                      per_stage[p] + expert_stage[p], per_stage_n[p] + expert_stage_n[p],
                                      layers, experts))
    plan.ranks = ranks
    plan.total_bytes = sum(r.bytes for r in ranks)
    plan.parallel = {"tp": tp, "pp": pp, "ep": ep, "etp": etp, "rank_folders": len(ranks),
                     "min_gpus": pp * math.lcm(tp, ep * etp)}
    plan.experts.update({"per_ep_rank": local_experts if info.is_moe else 0, "experts": info.experts,
                         "expert_bytes_per_folder": expert_stage, "layout": "released→megatron [out, in]"})
    plan.files = []
    plan.source.setdefault("unique_bytes", unique)
    plan.notes.append("bytes are tensor data; each rank file adds pickle/zip framing; every EP folder repeats the "
                      "non-expert tensors" + ("; expert weights repeat in every TP folder when etp < tp"
                                              if info.is_moe and etp < tp else ""))
    plan.notes.append(f"unique bytes (each shard once, incl. vocab padding"
                      f"{' and the last stage output_layer copy' if info.tied and pp > 1 else ''}): {unique:,}")
    if plan.ok and source in ("even", "given"):
        _cross_check_megatron(plan, skeleton, dtype, tp, pp, ep, etp, first, last, divisible_by, padded_size)
    elif source == "proposed" and proposal is not None and all(c.name == "pp layers" for c in plan.failed):
        # the ranks shown are those of the proposed split: count their tensors as the converter would write
        # them with --pp-first-layers/--pp-last-layers, as when the split is given (one count per split)
        flags = plan.parallel.get("training_flags")
        _cross_check_megatron(plan, skeleton, dtype, tp, pp, ep, etp, proposal[0], proposal[1], divisible_by,
                              padded_size)
        if flags is None:
            plan.parallel.pop("training_flags", None)
        else:
            plan.parallel["training_flags"] = flags


def _megatron_plan_from_table(plan: Plan, skeleton: Skeleton, dtype: DType, tp: int, pp: int, ep: int,
                              etp: int, counts: list[int], first: int | None, last: int | None, divisible_by: int,
                              padded_size: int | None) -> None:
    """Per-rank files, bytes and tensors from the converter's own rank plan (the family's Megatron table)."""
    info = skeleton.info
    theirs = _converter_ranks(plan, skeleton, dtype, tp, pp, ep, etp, first, last, divisible_by, padded_size)
    if theirs is None:
        return
    starts = [sum(counts[:s]) for s in range(pp)]
    local = info.experts // ep if info.is_moe else 0
    plan.ranks = [RankPlan(f"release/{r.folder}/model_optim_rng.pt", r.tp, r.pp, r.ep, r.nbytes, len(r.tensors),
                           [starts[r.pp], starts[r.pp] + counts[r.pp] - 1] if counts[r.pp] else [],
                           [r.ep * local, (r.ep + 1) * local - 1] if info.is_moe else []) for r in theirs.ranks]
    plan.total_bytes = theirs.total_bytes
    plan.parallel = {"tp": tp, "pp": pp, "ep": ep, "etp": etp, "rank_folders": len(plan.ranks),
                     "min_gpus": pp * math.lcm(tp, ep * etp), "training_flags": theirs.training_flags()}
    plan.experts.update({"per_ep_rank": local, "experts": info.experts, "layout": "megatron [out, in]"})
    plan.files = []
    plan.checks.append(Check("rank bytes vs converter", True, "per-rank bytes are hf-to-megatron's own rank plan"))
    plan.notes.append("per-rank bytes and tensors from the family's Megatron table (each rank file adds "
                      "pickle/zip framing)")


def _converter_ranks(plan: Plan, skeleton: Skeleton, dtype: DType, tp: int, pp: int, ep: int, etp: int,
                     first: int | None, last: int | None, divisible_by: int,
                     padded_size: int | None) -> MegatronPlan | None:
    """The converter's own rank plan for these sizes, or None after adding the failed check saying why."""
    try:
        return plan_megatron_ranks(skeleton, tp, pp, ep, etp, dtype=dtype, padded_vocab_size=padded_size,
                                   make_vocab_size_divisible_by=divisible_by, pp_first_layers=first,
                                   pp_last_layers=last)
    except UserError as exc:
        plan.checks.append(Check("megatron converter", False, f"hf-to-megatron refuses these sizes: {exc}"))
        return None


def _cross_check_megatron(plan: Plan, skeleton: Skeleton, dtype: DType, tp: int, pp: int, ep: int, etp: int,
                          first: int | None, last: int | None, divisible_by: int, padded_size: int | None) -> None:
    """Take per-rank tensor counts from the converter's own rank planner (``plan_megatron_ranks``) and
    check that its per-rank bytes equal the ones computed here from the split rules."""
    theirs = _converter_ranks(plan, skeleton, dtype, tp, pp, ep, etp, first, last, divisible_by, padded_size)
    if theirs is None:
        return
    by_rank = {(r.tp, r.pp, r.ep): r for r in theirs.ranks}
    differ = []
    for r in plan.ranks:
        other = by_rank.get((r.tp, r.pp, r.ep))
        if other is None or other.nbytes != r.bytes:
            differ.append(r.folder)
            continue
        r.tensors = len(other.tensors)
    plan.checks.append(Check("rank bytes vs converter", not differ and len(by_rank) == len(plan.ranks),
                             "per-rank bytes equal hf-to-megatron's own rank plan" if not differ else
                             f"{len(differ)} rank files differ from hf-to-megatron's plan (first: {differ[0]})"))
    plan.parallel["training_flags"] = theirs.training_flags()


def _source_checks(plan: Plan, skeleton: Skeleton, source: str | Path, config: Any) -> None:
    src = open_source(source, config=config)
    try:
        # the config's tensors in the form this source stores them (a family may keep experts fused or one
        # per expert, MTP present or not: Family.skeleton_for); shapes still come from the config
        stored = getattr(src, "skeleton", None) or skeleton
        expected = {t.name: t.shape for t in canonical_tensors(stored, BFLOAT16)}
        names = set(src.names())
        missing = sorted(set(expected) - names)
        unexpected = sorted(names - set(expected))
        wrong = []
        total = 0
        for name in sorted(names & set(expected)):
            shape, dtype = src.spec(name)
            total += math.prod(shape) * element_size(dtype)
            if tuple(shape) != tuple(expected[name]):
                wrong.append(f"{name} {list(shape)} (config: {list(expected[name])})")
        plan.source.update({"path": str(source), "layout": src.layout, "tensors": len(names), "bytes": total})
        plan.checks.append(Check("source keys", not missing and not unexpected,
                                 f"{len(missing)} missing, {len(unexpected)} unexpected"
                                 + (f"; first missing: {missing[0]}" if missing else "")
                                 + (f"; first unexpected: {unexpected[0]}" if unexpected else "")))
        plan.checks.append(Check("source shapes", not wrong, f"{len(wrong)} shapes differ from the config"
                                 + (f"; first: {wrong[0]}" if wrong else "")))
    finally:
        close = getattr(src, "close", None)
        if close:
            close()


def plan_conversion(config: str | Path | dict | None, to: str, *, tp: int = 1, pp: int = 1, ep: int = 1,
                    etp: int | None = None, pp_first_layers: int | None = None, pp_last_layers: int | None = None,
                    source: str | Path | None = None, target: str | Path | None = None,
                    disk_speed: float | None = None, dtype: str | None = None, max_shard_size: str | int = "5GB",
                    experts_layout: str | None = None, make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR,
                    padded_vocab_size: int | None = None, probe_bytes: int = PROBE_BYTES,
                    consumer: str | None = None) -> Plan:
    """Plan a conversion to ``to`` ('hf', 'dcp', 'megatron', 'torch_dist' for framework ``consumer``) from a
    config alone; touch no weights.

    ``config`` defaults to ``source``'s config.json. ``disk_speed`` is in MiB/s (2^20 bytes); without it
    the speed is measured on ``target`` with a short write+fsync probe of ``probe_bytes``.
    """
    from vlconvert.inspection import identify_model

    if to not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, not '{to}'")
    if source is not None:
        source = resolve_source(source)  # a folder, or a model id in the local Hugging Face cache
    if config is None:
        if source is None:
            raise UsageError("give --config CONFIG.json (or --source DIR holding a config.json)")
        config = Path(source) / "config.json"
        if not config.is_file():
            raise UsageError(f"'{source}' has no config.json: pass --config")
    info = load_config(config)
    skeleton = build_skeleton(info)
    dt = output_dtype(skeleton, dtype)
    cbytes = config_bytes(skeleton, dt)
    plan = Plan(to=to, family=info.family, model=identify_model(info), dtype=dtype_name(dt),
                tensor_count=len(skeleton.hf_keys()), config_bytes=cbytes, total_bytes=0)
    if to == "hf":
        _hf_plan(plan, skeleton, dt, parse_size(max_shard_size))
    elif to == "dcp":
        _dcp_plan(plan, skeleton, dt, experts_layout or skeleton.runtime_experts, source)
    elif to == "torch_dist":
        _torch_dist_plan(plan, skeleton, dt, consumer, tp, make_vocab_size_divisible_by, padded_vocab_size)
    else:
        _megatron_plan(plan, skeleton, dt, tp, pp, ep, etp if etp is not None else tp, pp_first_layers,
                       pp_last_layers, make_vocab_size_divisible_by, padded_vocab_size)
    if to not in ("megatron", "torch_dist") and (tp, pp, ep, etp or 1) != (1, 1, 1, 1):
        plan.notes.append(f"--tp/--pp/--ep apply to --to megatron only; ignored for {to}")
    if consumer is not None and to != "torch_dist":
        raise UsageError(f"--for {consumer} applies to --to torch_dist (the format those frameworks load)")
    if source is not None:
        _source_checks(plan, skeleton, source, config)

    # disk: free space and speed; a target that is (or holds, or lies in) an input is neither probed nor free
    overlap = None
    if target is not None:
        from vlconvert.publish import check_no_overlap

        try:
            check_no_overlap(target, {"--source": source,
                                      "--config": config if isinstance(config, (str, Path)) else None}, name="--target")
        except UserError as exc:
            overlap = str(exc)
    if overlap is not None:
        plan.disk.update({"target": str(target)})
        plan.checks.append(Check("target free", False, f"{overlap} (convert refuses it whatever the flags: an input "
                                 "is never written; nothing was probed there)"))
    elif target is not None:
        probe_dir = existing_parent(target)
        free = shutil.disk_usage(probe_dir).free
        plan.disk.update({"target": str(target), "free_bytes": free})
        plan.checks.append(Check("free disk", free >= plan.total_bytes,
                                 f"{human_bytes(free)} free in '{probe_dir}', "
                                 f"{human_bytes(plan.total_bytes)} needed"))
        if Path(target).exists() and not empty_folder(Path(target)):
            plan.checks.append(Check("target free", False, f"'{target}' exists: the conversion refuses it "
                                     "unless --overwrite", blocking=False))
    if disk_speed is not None:
        if disk_speed <= 0:
            raise UsageError("--disk-speed must be positive (MiB/s)")
        plan.disk.update({"speed_mib_s": float(disk_speed), "speed_source": "given"})
    elif target is not None and overlap is None:
        speed, where = measure_disk_speed(target, probe_bytes)
        plan.disk.update({"speed_mib_s": round(speed / 2**20, 1), "speed_source": f"measured in '{where}' "
                          f"({probe_bytes / 2**20:.0f} MiB write+fsync)"})
    if "speed_mib_s" in plan.disk:
        # a run is start-up (python, torch, the plan) plus the bytes at the slower of the disk and the sha256
        # every byte gets for the manifest (written and hashed in parallel threads, pieces on every core)
        checksum = measure_checksum_speed()
        startup = startup_seconds()
        rate = min(plan.disk["speed_mib_s"] * 2**20, checksum)
        plan.disk.update({"checksum_mib_s": round(checksum / 2**20, 1), "startup_seconds": round(startup, 1),
                          "estimated_seconds": round(startup + plan.total_bytes / rate, 1)})
    return plan
