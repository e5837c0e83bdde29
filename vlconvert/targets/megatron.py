"""``--to megatron``: Megatron-Core legacy rank files (``release/mp_rank_*/model_optim_rng.pt``, the tracker) at any
TP/PP/EP/ETP, each tensor built from its row map in the family's HF <-> Megatron table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vlconvert.dtypes import DType
from vlconvert.layouts import megatron as mlay
from vlconvert.models.megatron_table import MegatronPlan, plan_megatron_ranks
from vlconvert.plan import ConversionPlan, PlannedFile, out_dtype
from vlconvert.targets.base import Conversion, Target, counted

if TYPE_CHECKING:
    from vlconvert.sources import Source

# the Conversion options that shape a Megatron checkpoint (legacy or torch_dist)
MEGATRON_OPTIONS = frozenset({"tp", "pp", "ep", "etp", "spec", "experts", "pp_first_layers", "pp_last_layers",
                              "padded_vocab_size", "make_vocab_size_divisible_by", "iteration"})


class MegatronTarget(Target):
    """One rank file per (TP, PP, EP) folder; a Megatron source keeps its spec and expert style."""

    name = "megatron"
    options = MEGATRON_OPTIONS

    def plan(self, conv: Conversion, source: Source, dtype: DType | None) -> ConversionPlan:
        o = conv.options
        previous = getattr(source, "plan", None)  # a Megatron source keeps its spec and expert style
        spec = o["spec"] or (previous.spec if isinstance(previous, MegatronPlan) else "te")
        experts = o["experts"] or (previous.experts if isinstance(previous, MegatronPlan) else "grouped")
        source_dtypes = {n: out_dtype(source.spec(n)[1], dtype) for n in source.names()}
        plan = plan_megatron_ranks(source.skeleton, o["tp"], o["pp"], o["ep"], o["etp"], spec=spec, experts=experts,
                                   dtype=dtype, padded_vocab_size=o["padded_vocab_size"],
                                   make_vocab_size_divisible_by=o["make_vocab_size_divisible_by"],
                                   pp_first_layers=o["pp_first_layers"], pp_last_layers=o["pp_last_layers"],
                                   source_dtypes=source_dtypes)
        it = mlay.iteration_folder(o["iteration"])
        files = [PlannedFile(f"{it}/{r.folder}/{mlay.RANK_FILE}", [(t.name, t.shape, t.dtype) for t in r.tensors])
                 for r in plan.ranks]
        return ConversionPlan(str(source.folder), source.layout, "megatron", dtype, None, files,
                              notes=list(plan.notes), megatron=plan, assets=[mlay.TRACKER])

    def write(self, conv: Conversion, stage: Path, plan: ConversionPlan, advance: Callable[[int], None]) -> list[str]:
        mplan = plan.megatron
        assert mplan is not None
        meta = mplan.metadata() if conv.options["metadata"] else None
        iteration = conv.options["iteration"]
        it_dir = stage / mlay.iteration_folder(iteration)
        it_dir.mkdir(exist_ok=True)
        for r in mplan.ranks:
            folder = it_dir / r.folder
            if not conv.owns(f"{it_dir.name}/{r.folder}/{mlay.RANK_FILE}"):
                continue
            folder.mkdir(parents=True, exist_ok=True)
            entries = [mlay.RankEntry(t.name, t.shape, t.dtype) for t in r.tensors]
            mlay.write_rank_file(folder / mlay.RANK_FILE, entries,
                                 lambda i, _e, ts=r.tensors: counted(conv.rank_blocks(ts[i]), advance),
                                 extra={mlay.META_KEY: meta} if meta else None, iteration=iteration or 0)
        if conv.lead:
            mlay.write_tracker(stage, iteration)
        return []


TARGET = MegatronTarget()
