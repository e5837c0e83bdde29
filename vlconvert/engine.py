"""One engine: any layout in, any layout out, in one pass — a plan, then a stream.

:class:`Converter` opens the source (:mod:`vlconvert.sources`, layout detected), checks it against the
model skeleton, plans the output for the target layout (plain data: files, the tensors each holds, and
for Megatron each tensor's row map), then streams the plan from the source to the target's writer
(:mod:`vlconvert.layouts`) inside :func:`vlconvert.publish.staged_output` (overlap checks, one run per
output, manifest, ``--resume``). Memory stays near one tensor (one expert for fused experts).

    from vlconvert import Converter
    conv = Converter("Qwen3-VL-30B-A3B-Instruct", "mg", to="megatron", tp=2, ep=4)
    print(conv.plan().to_dict()["files"][:3])
    result = conv.run()
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlconvert.dtypes import dtype_name, element_size, parse_dtype
from vlconvert.errors import UserError
from vlconvert.layouts import megatron as mlay
from vlconvert.layouts.dcp import DCPWriter
from vlconvert.layouts.hf import (
    INDEX_NAME,
    PlannedTensor,
    SafetensorsFileWriter,
    asset_files,
    copy_assets,
    parse_size,
    plan_shards,
    resolve_source,
    shard_file_names,
    write_index,
)
from vlconvert.models.qwen3vl import EMBED, EXPERT_LAYOUTS, LM_HEAD, is_expert
from vlconvert.models.qwen3vl_megatron import MegatronPlan, RankTensor, Src, plan_megatron_ranks
from vlconvert.publish import copy_file, staged_output, write_bytes
from vlconvert.sources import Source, open_source, preview

TARGETS = ("hf", "dcp", "megatron")
_ROW_BLOCK = 64 * 2**20  # bytes per row block when a large tensor is streamed into a safetensors file
_RECORD_OVERHEAD = 2048  # bytes a torch.save record adds around the data (measured ~1.5 KB)

Progress = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


# ------------------------------------------------------------------------------------------ plans
@dataclass
class PlannedFile:
    """One output file and the tensors it holds, in write order."""

    name: str  # path relative to the output folder
    tensors: list[tuple[str, tuple[int, ...], torch.dtype]]  # (name in the file, shape, dtype)

    @property
    def nbytes(self) -> int:
        total = 0
        for _, shape, dtype in self.tensors:
            n = 1
            for d in shape:
                n *= d
            total += n * element_size(dtype)
        return total


@dataclass
class DCPEntry:
    """One DCP record: its key, the canonical tensor it is made of, shape, dtype and nesting."""

    key: str
    source: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nesting: tuple


@dataclass
class ConversionPlan:
    """What a conversion writes, as data: ``files`` for printing and checks, plus each target's recipe."""

    source: str
    source_layout: str
    target: str
    dtype: torch.dtype | None
    experts_layout: str | None
    files: list[PlannedFile]
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    assets: list[str] = field(default_factory=list)
    hf_shards: list[list[PlannedTensor]] = field(default_factory=list)
    dcp_files: list[tuple[str, list[DCPEntry]]] = field(default_factory=list)
    megatron: MegatronPlan | None = None

    @property
    def tensor_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-able data."""
        data: dict[str, Any] = {
            "source": self.source, "source_layout": self.source_layout, "target": self.target,
            "dtype": dtype_name(self.dtype) if self.dtype else "keep", "experts_layout": self.experts_layout,
            "bytes": self.tensor_bytes, "notes": self.notes, "missing": self.missing, "dropped": self.dropped,
            "assets": self.assets,
            "files": [{"name": f.name, "bytes": f.nbytes, "tensors": len(f.tensors)} for f in self.files]}
        if self.megatron is not None:
            m = self.megatron
            data["megatron"] = {"tp": m.tp, "pp": m.pp, "ep": m.ep, "etp": m.etp, "spec": m.spec,
                                "experts": m.experts, "stage_layers": m.stage_layers, "vocab": m.vocab,
                                "padded_vocab": m.padded_vocab, "flags": m.training_flags()}
        return data


@dataclass
class Result:
    """What a run did."""

    output: Path
    plan: ConversionPlan
    files: int
    bytes_written: int  # bytes on disk, every file of the output
    notes: list[str]
    assets: list[str]


# ---------------------------------------------------------------------------------------- options
def resolve_dtype(choice: str | torch.dtype | None, source: Source) -> torch.dtype | None:
    """The output dtype: ``auto`` = the config's for a DCP (training jobs keep fp32 master weights), else
    the stored one; ``config``; ``keep``; or bf16 / fp16 / fp32."""
    if isinstance(choice, torch.dtype):
        return choice
    if choice in (None, "keep"):
        return None
    if choice == "auto":
        return source.skeleton.info.dtype if source.layout == "dcp" else None
    if choice == "config":
        return source.skeleton.info.dtype
    try:
        return parse_dtype(choice)
    except UserError as exc:
        raise UserError(f"unknown dtype '{choice}': use auto, keep, config, bf16, fp16 or fp32") from exc


def _out_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class Converter:
    """Convert checkpoint ``src`` (HF folder or cached model id, DCP, Megatron) to layout ``to`` in ``dst``.

    Options mirror ``vlconvert convert``: ``dtype`` (auto, keep, config, bf16, fp16, fp32),
    ``assets_dir`` (the original HF folder: config, tokenizer, processor files), ``config``,
    ``experts_layout`` (released / transformers5; for DCP also ``auto`` = the installed transformers'),
    ``prefix`` (DCP: key prefix to write; for a DCP source, ``src_prefix`` forces the one to strip),
    ``max_shard_size`` (HF), ``tied_lm_head`` (DCP), ``allow_missing`` / ``allow_unexpected``, and the
    Megatron sizes ``tp pp ep etp spec experts pp_first_layers pp_last_layers padded_vocab_size
    make_vocab_size_divisible_by iteration``. ``overwrite`` and ``resume`` as on the command line.
    """

    def __init__(self, src: str | Path, dst: str | Path, *, to: str, dtype: str | torch.dtype | None = "auto",
                 assets_dir: str | Path | None = None, config: str | Path | None = None,
                 experts_layout: str | None = None, prefix: str = "", src_prefix: str | None = None,
                 max_shard_size: str | int = "5GB", tied_lm_head: bool = True, allow_missing: bool = False,
                 allow_unexpected: bool = False, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                 spec: str | None = None, experts: str | None = None, pp_first_layers: int | None = None,
                 pp_last_layers: int | None = None, padded_vocab_size: int | None = None,
                 make_vocab_size_divisible_by: int = 128, iteration: int | None = None,
                 overwrite: bool = False, resume: bool = False, metadata: bool = True,
                 source_layout: str | None = None, info: Callable[[str], None] = lambda s: None):
        if to not in TARGETS:
            raise UserError(f"unknown target '{to}': use {', '.join(TARGETS)}")
        self.src, self.dst, self.to = src, Path(dst), to
        self.options = dict(dtype=dtype, experts_layout=experts_layout, prefix=prefix, src_prefix=src_prefix,
                            max_shard_size=max_shard_size, tied_lm_head=tied_lm_head, allow_missing=allow_missing,
                            allow_unexpected=allow_unexpected, tp=tp, pp=pp, ep=ep, etp=etp, spec=spec,
                            experts=experts, pp_first_layers=pp_first_layers, pp_last_layers=pp_last_layers,
                            padded_vocab_size=padded_vocab_size,
                            make_vocab_size_divisible_by=make_vocab_size_divisible_by, iteration=iteration,
                            metadata=metadata)
        self.assets_dir, self.config = assets_dir, config
        self.overwrite, self.resume, self.info = overwrite, resume, info
        self.source_layout = source_layout  # the older spellings (hf-to-dcp, ...) name the layout they read
        self._source: Source | None = None
        self._plan: ConversionPlan | None = None
        self.assets: Path | None = None

    # -------------------------------------------------------------------------------- open + plan
    @property
    def source(self) -> Source:
        """The opened source (layout detected from its files)."""
        if self._source is None:
            if self.assets_dir is not None:
                try:
                    self.assets = resolve_source(self.assets_dir)
                except UserError as exc:
                    raise UserError(f"--assets-dir '{self.assets_dir}' does not exist "
                                    "(nor is it a model id in the local Hugging Face cache)") from exc
                if not (self.assets / "config.json").is_file():
                    raise UserError(f"--assets-dir '{self.assets_dir}' has no config.json: give the original "
                                    "Hugging Face folder")
            self._source = open_source(self.src, config=self.config, assets_dir=self.assets,
                                       prefix=self.options["src_prefix"], layout=self.source_layout)
            if self._source.skeleton is None:
                raise UserError(f"'{self.src}' has no config.json: pass --config or --assets-dir")
        return self._source

    def plan(self) -> ConversionPlan:
        """Check the source against the model and plan every output file, reading no weights."""
        if self._plan is None:
            source = self.source
            dtype = resolve_dtype(self.options["dtype"], source)
            missing = self._check(source)
            planner = {"hf": self._plan_hf, "dcp": self._plan_dcp, "megatron": self._plan_megatron}[self.to]
            self._plan = planner(source, dtype)
            self._plan.missing = missing
            self._plan.notes = list(source.notes) + self._plan.notes
        return self._plan

    def _check(self, source: Source) -> list[str]:
        """Refuse sources that do not fit the model (missing, unexpected tensors, wrong shapes)."""
        sk = source.skeleton
        names = source.names()
        if not names:
            raise UserError(f"'{self.src}' holds no tensor of a {sk.info.family} model with this config: "
                            "check --assets-dir or pass --prefix")
        if not sk.info.tied and LM_HEAD not in names:
            raise UserError(f"'{self.src}' has no lm_head.weight but config.json says the embeddings are untied: "
                            "an untied model needs its own lm_head")
        held = set(names)
        missing = [k for k in sk.hf_keys() if k not in held]
        if missing and not (self.options["allow_missing"] and self.to == "hf"):
            hint = ("pass --allow-missing to write a partial checkpoint anyway" if self.to == "hf"
                    else f"a {self.to} checkpoint needs every tensor")
            raise UserError(f"'{self.src}' lacks {len(missing)} tensors the model needs ({preview(missing)}); {hint}")
        extra = [n for n in source.extra_names() if not (n == LM_HEAD and sk.info.tied)]
        if extra and not self.options["allow_unexpected"]:
            raise UserError(f"'{self.src}' holds {len(extra)} tensors the model does not have ({preview(extra)}): "
                            "do the weights and config.json belong together? (--allow-unexpected drops them)")
        for name in names:
            shape = tuple(source.spec(name)[0])
            want = sk.shape_in(name, "released")
            if shape != want:
                raise UserError(f"'{name}' has shape {list(shape)} in '{self.src}' but config.json implies "
                                f"{list(want)}")
        return missing

    def _experts_layout(self, default: str) -> str:
        choice = self.options["experts_layout"] or default
        if choice == "auto":
            return self.source.skeleton.runtime_experts
        if choice not in EXPERT_LAYOUTS:
            raise UserError(f"unknown experts layout '{choice}': use auto, {' or '.join(EXPERT_LAYOUTS)}")
        return choice

    def _plan_hf(self, source: Source, dtype: torch.dtype | None) -> ConversionPlan:
        if self.assets is None and source.layout != "hf":
            raise UserError(f"'{self.src}' is a {source.layout} checkpoint: pass --assets-dir with the original "
                            "Hugging Face folder (config, tokenizer and processor files are copied from it)")
        layout = self._experts_layout("released")
        sk = source.skeleton
        planned = []
        for name in source.names():
            stored = source.spec(name)[1]
            planned.append(PlannedTensor(name, _out_dtype(stored, dtype), tuple(sk.shape_in(name, layout))))
        shards = plan_shards(planned, parse_size(self.options["max_shard_size"]))
        names = shard_file_names(len(shards))
        files = [PlannedFile(n, [(t.name, t.shape, t.dtype) for t in s]) for n, s in zip(names, shards, strict=True)]
        assets = self.assets or source.folder
        return ConversionPlan(str(source.folder), source.layout, "hf", dtype, layout if sk.info.is_moe else None,
                              files, assets=[str(p.relative_to(assets)) for p in asset_files(assets)],
                              hf_shards=shards)

    def _plan_dcp(self, source: Source, dtype: torch.dtype | None) -> ConversionPlan:
        layout = self._experts_layout("auto")
        sk = source.skeleton
        prefix = self.options["prefix"]
        outputs: list[tuple[str, str]] = [(n, n) for n in source.names()]
        if sk.info.tied and self.options["tied_lm_head"]:  # the model's state dict has it; dcp.load is strict
            outputs.append((LM_HEAD, EMBED))
        order = sorted(range(len(outputs)), key=lambda i: (source.location(outputs[i][1]), i))
        groups: dict[int, list[DCPEntry]] = {}
        for i in order:
            name, src_name = outputs[i]
            stored = source.spec(src_name)[1]
            key = prefix + name
            entry = DCPEntry(key, src_name, tuple(sk.shape_in(name, layout)), _out_dtype(stored, dtype),
                             _nesting(key, prefix))
            groups.setdefault(source.location(src_name)[0], []).append(entry)
        dcp_files = [(f"__0_{g}.distcp", entries) for g, entries in sorted(groups.items())]
        files = [PlannedFile(n, [(e.key, e.shape, e.dtype) for e in entries]) for n, entries in dcp_files]
        return ConversionPlan(str(source.folder), source.layout, "dcp", dtype, layout if sk.info.is_moe else None,
                              files, dcp_files=dcp_files, assets=["config.json"])

    def _plan_megatron(self, source: Source, dtype: torch.dtype | None) -> ConversionPlan:
        o = self.options
        previous = getattr(source, "plan", None)  # a Megatron source keeps its spec and expert style
        spec = o["spec"] or (previous.spec if isinstance(previous, MegatronPlan) else "te")
        experts = o["experts"] or (previous.experts if isinstance(previous, MegatronPlan) else "grouped")
        source_dtypes = {n: _out_dtype(source.spec(n)[1], dtype) for n in source.names()}
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

    # --------------------------------------------------------------------------------------- run
    def fingerprint(self) -> dict:
        """What ``--resume`` must find unchanged: the command, the source and every option."""
        plan = self.plan()
        table = repr([(f.name, f.tensors) for f in plan.files])
        return {"target": self.to, "source": str(Path(plan.source).resolve()),
                "assets": str(self.assets.resolve()) if self.assets else None,
                "options": {k: str(v) for k, v in sorted(self.options.items())},
                "plan": hashlib.sha256(table.encode()).hexdigest()}

    def run(self, progress: Progress | None = None) -> Result:
        """Write the output (published atomically when complete); ``progress(description, total)`` may
        return a context manager yielding ``advance(n_bytes)``."""
        plan = self.plan()
        source = self.source
        inputs: dict[str, str | Path | None] = {"SRC": source.folder, "--assets-dir": self.assets,
                                                "--config": self.config}
        needed = plan.tensor_bytes + sum(_RECORD_OVERHEAD for f in plan.files for _ in f.tensors) + 2**20
        if self.to == "hf":
            needed += sum(p.stat().st_size for p in asset_files(self.assets or source.folder))
        bar = progress(f"{source.layout} -> {self.to}", plan.tensor_bytes) if progress else nullcontext(lambda n: None)
        assets: list[str] = []
        try:
            with staged_output(self.dst, inputs=inputs, overwrite=self.overwrite, resume=self.resume,
                               needed_bytes=needed, fingerprint=self.fingerprint(), info=self.info) as stage, \
                    bar as advance:
                if self.to == "hf":
                    assets = self._write_hf(stage.path, plan, advance)
                elif self.to == "dcp":
                    self._write_dcp(stage.path, plan, advance)
                else:
                    self._write_megatron(stage.path, plan, advance)
                notes = list(stage.notes)
        finally:
            source.close()
        written = sum(p.stat().st_size for p in self.dst.rglob("*") if p.is_file())
        files = sum(1 for p in self.dst.rglob("*") if p.is_file())
        return Result(self.dst, plan, files, written, plan.notes + notes, assets)

    def _write_hf(self, stage: Path, plan: ConversionPlan, advance: Callable[[int], None]) -> list[str]:
        source = self.source
        layout = plan.experts_layout or "released"
        assets = self.assets or source.folder
        copied = copy_assets(assets, stage)
        weight_map: dict[str, str] = {}
        for planned_file, shard in zip(plan.files, plan.hf_shards, strict=True):
            writer = SafetensorsFileWriter(stage / planned_file.name, shard)
            ok = False
            try:
                for t in shard:
                    weight_map[t.name] = planned_file.name
                    if writer.kept:  # --resume kept this shard
                        advance(t.nbytes)
                    elif is_expert(t.name):
                        for e in range(t.shape[0]):
                            matrix = source.rows(Src(t.name, e), 0, source.matrix_shape(Src(t.name, e))[0])
                            block = matrix.t() if layout == "released" else matrix  # Megatron's is [out, in]
                            advance(writer.write(t.name, _cast(block, t.dtype).unsqueeze(0), row_offset=e))
                    else:
                        _stream_rows(source, t, writer, advance)
                ok = True
            finally:
                if ok:
                    writer.close()
                else:
                    writer.abort()  # keep the original error; the staged folder is removed anyway
        if len(plan.files) > 1:
            write_index(stage, weight_map, plan.tensor_bytes)
        elif (stage / INDEX_NAME).exists():
            (stage / INDEX_NAME).unlink()
        return copied

    def _write_dcp(self, stage: Path, plan: ConversionPlan, advance: Callable[[int], None]) -> None:
        source = self.source
        layout = plan.experts_layout or "released"
        writer = DCPWriter(stage)
        previous: tuple[str, torch.Tensor] | None = None  # a tied lm_head follows its embedding: read once
        try:
            for file_name, entries in plan.dcp_files:
                writer.open_file(file_name)
                for entry in entries:
                    stored = source.nbytes(entry.source)
                    if writer.skipping:  # --resume kept this file: its records are known, nothing to read
                        writer.write(entry.key, torch.empty(entry.shape, device="meta"), entry.nesting)
                        advance(stored)
                        continue
                    if previous is not None and previous[0] != entry.source:
                        previous = None  # drop it before reading the next tensor: one tensor in memory
                    tensor = previous[1] if previous is not None else _whole(source, entry.source, layout)
                    previous = (entry.source, tensor) if entry.source == EMBED else None
                    writer.write(entry.key, _cast(tensor, entry.dtype), entry.nesting)
                    advance(stored)
                    del tensor
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        config = (self.assets or source.folder) / "config.json"
        if config.is_file():
            copy_file(config, stage / "config.json")
        else:
            import json

            write_bytes(stage / "config.json", (json.dumps(source.skeleton.info.raw, indent=2) + "\n").encode())

    def _write_megatron(self, stage: Path, plan: ConversionPlan, advance: Callable[[int], None]) -> None:
        source = self.source
        mplan = plan.megatron
        assert mplan is not None
        meta = mplan.metadata() if self.options["metadata"] else None
        iteration = self.options["iteration"]
        it_dir = stage / mlay.iteration_folder(iteration)
        it_dir.mkdir(exist_ok=True)
        for r in mplan.ranks:
            folder = it_dir / r.folder
            folder.mkdir(exist_ok=True)
            entries = [mlay.RankEntry(t.name, t.shape, t.dtype) for t in r.tensors]
            mlay.write_rank_file(folder / mlay.RANK_FILE, entries,
                                 lambda i, _e, ts=r.tensors: build_tensor(ts[i], source),
                                 extra={mlay.META_KEY: meta} if meta else None, iteration=iteration or 0,
                                 on_bytes=advance)
        mlay.write_tracker(stage, iteration)


# ------------------------------------------------------------------------------------------- ops
def _nesting(key: str, prefix: str) -> tuple:
    """DCP planner_data for ``key``: a prefix ``a.b.`` means the state dict was ``{"a": {"b.<name>": ...}}``."""
    if not prefix or "." not in prefix:
        return (key,)
    root = prefix.split(".", 1)[0]
    return (root, key[len(root) + 1:])


def _whole(source: Source, name: str, layout: str) -> torch.Tensor:
    """A whole canonical tensor, experts in ``layout`` (assembled one expert at a time)."""
    if not is_expert(name):
        shape = source.spec(name)[0]
        return source.rows(Src(name), 0, shape[0] if shape else 1)
    experts = source.spec(name)[0][0]
    first = source.rows(Src(name, 0), 0, source.matrix_shape(Src(name, 0))[0])
    matrix_shape = tuple(first.shape) if layout == "transformers5" else (first.shape[1], first.shape[0])
    out = torch.empty((experts, *matrix_shape), dtype=first.dtype)
    for e in range(experts):
        matrix = first if e == 0 else source.rows(Src(name, e), 0, first.shape[0])
        out[e] = matrix if layout == "transformers5" else matrix.t()
    return out


def _stream_rows(source: Source, t: PlannedTensor, writer: SafetensorsFileWriter,
                 advance: Callable[[int], None]) -> None:
    """Write a non-expert tensor in row blocks of about 64 MiB."""
    if not t.shape:
        advance(writer.write(t.name, _cast(source.rows(Src(t.name), 0, 1), t.dtype)))
        return
    rows = t.shape[0]
    row_bytes = max(1, t.nbytes // rows) if rows else 1
    step = max(1, _ROW_BLOCK // row_bytes)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        advance(writer.write(t.name, _cast(source.rows(Src(t.name), a, b), t.dtype), row_offset=a))


def build_tensor(t: RankTensor, source: Source, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Execute one Megatron rank tensor's recipe (a row map, or a column block) against a source."""
    out_dtype = dtype or t.dtype
    if t.axis == 1:
        src, a, b = t.segs[0]
        return source.cols(src, a, b).to(out_dtype)
    parts = []
    for src, a, b in t.segs:
        if src is None:
            parts.append(torch.zeros((b - a, *t.shape[1:]), dtype=out_dtype))
        else:
            parts.append(source.rows(src, a, b).to(out_dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def convert(src: str | Path, dst: str | Path, *, to: str, progress: Progress | None = None, **options: Any) -> Result:
    """``Converter(src, dst, to=to, **options).run(progress)``."""
    return Converter(src, dst, to=to, **options).run(progress)
