"""``--to dcp``: a PyTorch Distributed Checkpoint (``__0_{i}.distcp`` data files, ``.metadata``, config.json) that
``torch.distributed.checkpoint.load`` reads into the model's state dict."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vlconvert import rowbytes
from vlconvert.dtypes import DType, to_torch
from vlconvert.layouts.dcp import DCPWriter, TensorBlocks
from vlconvert.layouts.filebytes import FileSpan
from vlconvert.layouts.hf import describe_weights
from vlconvert.lazy import torch
from vlconvert.models.base import RuntimeTensor
from vlconvert.models.megatron_table import RankTensor, Src
from vlconvert.plan import ConversionPlan, DCPEntry, PlannedFile, out_dtype, rows_as_bytes
from vlconvert.publish import copy_file, write_bytes
from vlconvert.rowbytes import ByteRows
from vlconvert.targets.base import Conversion, Target, counted, nbytes

if TYPE_CHECKING:
    from vlconvert.sources import Source


@dataclass
class RuntimeEntry(DCPEntry):
    """A record of a run-time tensor (:meth:`~vlconvert.models.family.Family.runtime_tensors`): ``tensor`` is
    its row map over canonical tensors (leading dims flattened)."""

    tensor: RankTensor | None = None
    stacked: bool = False  # a stack of matrices (fused experts), streamed one matrix at a time


class DCPTarget(Target):
    """One data file per source group (HF shard), keys ``--prefix`` + the name in the transformers model's state
    dict (canonical, or the family's run-time names), experts in ``--experts-layout`` (default: the installed
    transformers' run-time orientation)."""

    name = "dcp"
    options = frozenset({"prefix", "tied_lm_head", "experts_layout"})

    def plan(self, conv: Conversion, source: Source, dtype: DType | None) -> ConversionPlan:
        layout = conv.experts_layout("auto")
        sk = source.skeleton
        prefix = conv.options["prefix"]
        runtime = sk.family.runtime_tensors(sk)
        if runtime is not None:
            return self._plan_runtime(conv, source, dtype, runtime, layout)
        outputs: list[tuple[str, str]] = [(n, n) for n in source.names()]
        if sk.info.tied and conv.options["tied_lm_head"]:  # the model's state dict has it; dcp.load is strict
            outputs.append((sk.family.output, sk.family.embed))
        order = sorted(range(len(outputs)), key=lambda i: (source.location(outputs[i][1]), i))
        groups: dict[int, list[DCPEntry]] = {}
        for i in order:
            name, src_name = outputs[i]
            stored = source.spec(src_name)[1]
            key = prefix + name
            entry = DCPEntry(key, src_name, tuple(sk.shape_in(name, layout)), out_dtype(stored, dtype),
                             nesting(key, prefix))
            groups.setdefault(source.location(src_name)[0], []).append(entry)
        dcp_files = [(f"__0_{g}.distcp", entries) for g, entries in sorted(groups.items())]
        files = [PlannedFile(n, [(e.key, e.shape, e.dtype) for e in entries]) for n, entries in dcp_files]
        return ConversionPlan(str(source.folder), source.layout, "dcp", dtype, layout if sk.info.is_moe else None,
                              files, dcp_files=dcp_files, assets=["config.json"])

    def _plan_runtime(self, conv: Conversion, source: Source, dtype: DType | None,
                      runtime: list[RuntimeTensor], layout: str) -> ConversionPlan:
        """Records under the run-time names, each a row map over the canonical tensors the source holds."""
        sk = source.skeleton
        prefix = conv.options["prefix"]
        held = set(source.names())
        groups: dict[int, list[tuple[tuple[int, int], int, DCPEntry]]] = {}
        for i, rt in enumerate(runtime):
            if rt.name == sk.family.output and sk.info.tied and not conv.options["tied_lm_head"]:
                continue
            if not all(name in held for name, _, _ in rt.rows):
                continue
            first = rt.rows[0][0]
            out = out_dtype(source.spec(first)[1], dtype)
            key = prefix + rt.name
            tensor = RankTensor(key, rt.flat_shape, out, 0, tuple((Src(n), a, b) for n, a, b in rt.rows))
            entry = RuntimeEntry(key, first, rt.shape, out, nesting(key, prefix), tensor, rt.stacked)
            where = source.location(first)
            groups.setdefault(where[0], []).append((where, i, entry))
        dcp_files = [(f"__0_{g}.distcp", [e for _, _, e in sorted(items, key=lambda x: (x[0], x[1]))])
                     for g, items in sorted(groups.items())]
        files = [PlannedFile(n, [(e.key, e.shape, e.dtype) for e in entries]) for n, entries in dcp_files]
        return ConversionPlan(str(source.folder), source.layout, "dcp", dtype, layout if sk.info.is_moe else None,
                              files, dcp_files=dcp_files, assets=["config.json"])

    def write(self, conv: Conversion, stage: Path, plan: ConversionPlan, advance: Callable[[int], None]) -> list[str]:
        source = conv.source
        layout = plan.experts_layout or "released"
        writer = DCPWriter(stage)
        try:
            for file_name, entries in plan.dcp_files:
                if not conv.owns(file_name):
                    continue
                writer.open_file(file_name, [(e.key, e.shape, e.dtype, e.nesting) for e in entries])
                for entry in entries:
                    if writer.skipping:  # --resume kept this file: its records are known, nothing to read
                        writer.write(entry.key, TensorBlocks(entry.shape, entry.dtype, ()), entry.nesting)
                        advance(nbytes(entry.shape, entry.dtype))
                        continue
                    if isinstance(entry, RuntimeEntry) and entry.tensor is not None:
                        blocks = counted(runtime_blocks(conv, entry), advance)
                    else:
                        blocks = counted(conv.blocks(entry.source, layout, entry.dtype), advance)
                    writer.write(entry.key, TensorBlocks(entry.shape, entry.dtype, blocks), entry.nesting)
            if conv.world == 1:
                writer.finish()
            else:
                writer.close_file()  # the lead writes .metadata from every rank's records (finish)
        except BaseException:
            writer.abort()
            raise
        if not conv.lead:
            return []
        config = (conv.assets or source.folder) / "config.json"
        if config.is_file():
            copy_file(config, stage / "config.json", within=config.parent)
        else:
            write_bytes(stage / "config.json", (json.dumps(source.skeleton.info.raw, indent=2) + "\n").encode())
        describe_weights(stage / "config.json", None)  # not quantized; the dtype stays the model's (--dtype auto)
        return []

    def finish(self, conv: Conversion, stage: Path, plan: ConversionPlan, entries: dict[str, dict]) -> None:
        finish_dcp(stage, plan, entries)


def runtime_blocks(conv: Conversion, entry: RuntimeEntry) -> Iterator[torch.Tensor | ByteRows | FileSpan]:
    """A run-time tensor's row blocks; a stack (experts fused by transformers) one matrix at a time."""
    tensor = entry.tensor
    assert tensor is not None
    if not entry.stacked:
        yield from conv.rank_blocks(tensor)
        return
    per, offset, parts = entry.shape[1], 0, []
    for src, start, stop in tensor.segs:
        rows = rows_as_bytes(conv.source, src, start, stop, tensor.dtype)
        parts.append(rows if rows is not None else conv.source.rows(src, start, stop).to(to_torch(tensor.dtype)))
        offset += stop - start
        if offset % per == 0:
            if all(rowbytes.is_byte_rows(p) for p in parts):  # no torch: the matrices stacked as bytes
                stacked = rowbytes.concat_rows(parts)
                yield stacked.reshape((1, *stacked.shape))
            else:
                yield torch.cat([p.to_tensor() if rowbytes.is_byte_rows(p) else p for p in parts]).unsqueeze(0)
            parts = []


def finish_dcp(stage: Path, plan: ConversionPlan, entries: dict[str, dict]) -> None:
    """Write ``.metadata`` from the records every rank journaled, in plan order (same bytes as one process)."""
    writer = DCPWriter(stage)
    for name, _ in plan.dcp_files:
        writer.adopt(name, (entries[name].get("state") or {}).get("records", []))
    writer.finish()


def nesting(key: str, prefix: str) -> tuple:
    """DCP planner_data for ``key``: a prefix ``a.b.`` means the state dict was ``{"a": {"b.<name>": ...}}``."""
    if not prefix or "." not in prefix:
        return (key,)
    root = prefix.split(".", 1)[0]
    return (root, key[len(root) + 1:])


TARGET = DCPTarget()
