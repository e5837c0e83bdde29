"""``--to hf``: a Hugging Face folder (safetensors shards, index, the assets copied from the original folder)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vlconvert.dtypes import DType
from vlconvert.errors import UsageError
from vlconvert.layouts.hf import (
    INDEX_NAME,
    PlannedTensor,
    SafetensorsFileWriter,
    asset_files,
    copy_assets,
    describe_weights,
    parse_size,
    plan_shards,
    shard_file_names,
    write_index,
)
from vlconvert.plan import ConversionPlan, PlannedFile, out_dtype
from vlconvert.targets.base import Conversion, Target, counted, nbytes

if TYPE_CHECKING:
    from vlconvert.sources import Source


class HFTarget(Target):
    """Shards of at most ``--max-shard-size`` in the source's tensor order, experts in ``--experts-layout``."""

    name = "hf"
    options = frozenset({"max_shard_size", "allow_missing", "experts_layout"})
    allows_missing = True

    def plan(self, conv: Conversion, source: Source, dtype: DType | None) -> ConversionPlan:
        if conv.assets is None and source.layout != "hf":
            raise UsageError(f"'{conv.src}' is a {source.layout} checkpoint: pass --assets-dir with the original "
                            "Hugging Face folder (config, tokenizer and processor files are copied from it)")
        layout = conv.experts_layout("released")
        sk = source.skeleton
        planned = []
        for name in source.names():
            stored = source.spec(name)[1]
            planned.append(PlannedTensor(name, out_dtype(stored, dtype), tuple(sk.shape_in(name, layout))))
        shards = plan_shards(planned, parse_size(conv.options["max_shard_size"]))
        names = shard_file_names(len(shards))
        files = [PlannedFile(n, [(t.name, t.shape, t.dtype) for t in s]) for n, s in zip(names, shards, strict=True)]
        assets = conv.assets or source.folder
        return ConversionPlan(str(source.folder), source.layout, "hf", dtype, layout if sk.info.is_moe else None,
                              files, assets=[str(p.relative_to(assets)) for p in asset_files(assets)],
                              hf_shards=shards)

    def extra_bytes(self, conv: Conversion, source: Source) -> int:
        return sum(p.stat().st_size for p in asset_files(conv.assets or source.folder))

    def write(self, conv: Conversion, stage: Path, plan: ConversionPlan, advance: Callable[[int], None]) -> list[str]:
        source = conv.source
        layout = plan.experts_layout or "released"
        assets = conv.assets or source.folder
        copied = copy_assets(assets, stage) if conv.lead else []
        if conv.lead:  # from SRC, --assets-dir or --config alike: it must describe these weights
            describe_weights(stage / "config.json", written_dtype(plan))
        weight_map = {t.name: f.name for f, shard in zip(plan.files, plan.hf_shards, strict=True) for t in shard}
        for planned_file, shard in zip(plan.files, plan.hf_shards, strict=True):
            if not conv.owns(planned_file.name):
                continue
            writer = SafetensorsFileWriter(stage / planned_file.name, shard)
            ok = False
            try:
                for t in shard:
                    if writer.kept:  # --resume kept this shard
                        advance(t.nbytes)
                        continue
                    writer.write_blocks(t.name, counted(conv.blocks(t.name, layout, t.dtype), advance))
                ok = True
            finally:
                if ok:
                    writer.close()
                else:
                    writer.abort()  # keep the original error; the staged folder is removed anyway
        if len(plan.files) > 1 and conv.lead:
            write_index(stage, weight_map, plan.tensor_bytes)
        elif (stage / INDEX_NAME).exists() and conv.lead:
            (stage / INDEX_NAME).unlink()
        return copied


def written_dtype(plan: ConversionPlan) -> DType | None:
    """The dtype of the weights a plan writes: ``--dtype``'s, else the floating dtype holding the most bytes."""
    if plan.dtype is not None:
        return plan.dtype
    held: dict[DType, int] = {}
    for f in plan.files:
        for _, shape, dtype in f.tensors:
            if dtype.is_floating_point:
                held[dtype] = held.get(dtype, 0) + nbytes(shape, dtype)
    return max(held, key=lambda d: held[d]) if held else None


TARGET = HFTarget()
