"""Hugging Face safetensors <-> PyTorch DCP (FSDP2), planned from metadata, then streamed.

``hf_to_dcp`` writes the keys a training job's transformers model has (``model.state_dict()``), so
``dcp.load`` fills a meta-device-built, ``to_empty`` model or an FSDP2-sharded one directly.
``dcp_to_hf`` reads DCPs written by vlconvert or by training (FSDP2 chunks, nested optimizer state,
wrapper prefixes) and writes a Hugging Face folder with the original assets copied byte for byte.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlconvert.console import Reporter
from vlconvert.dtypes import dtype_name, parse_dtype
from vlconvert.errors import UserError
from vlconvert.layouts.dcp import DCPReader, DCPTensor, DCPWriter, is_row_slab
from vlconvert.layouts.hf import (
    HFCheckpoint,
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
from vlconvert.layouts.publish import staged_output
from vlconvert.models.qwen3vl import (
    EMBED,
    EXPERT_LAYOUTS,
    LM_HEAD,
    Skeleton,
    build_skeleton,
    convert_expert,
    expert_layout_of,
    is_expert,
    read_config_json,
)

WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module", "module"})
NON_MODEL_ROOTS = frozenset({"optimizer", "optim", "optimizers", "lr_scheduler", "scheduler", "dataloader",
                             "train_state", "extra_state", "rng_state", "rng", "args", "step"})
_RECORD_OVERHEAD = 2048  # bytes a torch.save record adds around the data (measured ~1.5 KB)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def _resolve_experts_layout(choice: str, skeleton: Skeleton) -> str:
    if choice == "auto":
        return skeleton.runtime_experts
    if choice not in EXPERT_LAYOUTS:
        raise UserError(f"unknown experts layout '{choice}': use auto, {' or '.join(EXPERT_LAYOUTS)}")
    return choice


def _source_layout_hint(config: dict) -> str:
    """For square expert tensors only: transformers 5 writes its run-time layout, 4.57 the released one."""
    return "transformers5" if str(config.get("transformers_version", "")).startswith("5") else "released"


def _nesting(key: str, prefix: str) -> tuple:
    """DCP planner_data for ``key``: a prefix ``a.b.`` means the state dict was ``{"a": {"b.<name>": ...}}``."""
    if not prefix or "." not in prefix:
        return (key,)
    root = prefix.split(".", 1)[0]
    return (root, key[len(root) + 1:])


@dataclass
class _DCPSourceMap:
    """How the keys of a DCP map onto a model's Hugging Face keys."""

    prefix: str
    mapped: dict[str, str] = field(default_factory=dict)  # HF key -> DCP key
    unexpected: list[str] = field(default_factory=list)
    dropped_non_model: int = 0
    dropped_non_tensor: int = 0


def strip_wrappers(key: str) -> str:
    """Remove wrapper components (``_orig_mod``, ``_checkpoint_wrapped_module``, ...) from a key."""
    return ".".join(p for p in key.split(".") if p not in WRAPPER_PARTS)


def map_dcp_keys(reader: DCPReader, known: set[str], prefix: str | None = None) -> _DCPSourceMap:
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
    result = _DCPSourceMap(prefix=prefix, dropped_non_model=dropped, dropped_non_tensor=len(reader.non_tensors))
    for clean, key in candidates.items():
        name = clean[len(prefix):] if clean.startswith(prefix) else None
        if name in known and name not in result.mapped:
            result.mapped[name] = key
        else:
            result.unexpected.append(key)
    return result


def _preview(keys: list[str]) -> str:
    return f"'{keys[0]}'" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")


# ---------------------------------------------------------------------------------------- hf -> dcp
def hf_to_dcp(src: str | Path, dst: str | Path, *, prefix: str = "", dtype: str | None = None,
              experts_layout: str = "auto", tied_lm_head: bool = True, overwrite: bool = False,
              reporter: Reporter | None = None) -> dict:
    """Convert a Hugging Face Qwen3-VL folder (or cached model id) to a DCP folder; return a summary.

    Streams one tensor at a time: peak memory is about the largest tensor. Keys are the installed
    transformers model's state-dict names (with ``prefix`` prepended); experts are written in
    ``experts_layout`` (``auto`` = the installed transformers' run-time orientation). Tied models also
    get ``lm_head.weight`` (a copy of the embedding), as ``dcp.save`` of a tied model writes it.
    """
    reporter = reporter or Reporter(quiet=True)
    ckpt = HFCheckpoint(src)
    config = read_config_json(ckpt.config_path())
    skeleton = build_skeleton(config)
    target_layout = _resolve_experts_layout(experts_layout, skeleton)
    out_dtype = parse_dtype(dtype)
    hint = _source_layout_hint(config)

    # plan: every model key -> (source key, source expert layout)
    plan: list[tuple[str, str, str | None]] = []
    expected = set(skeleton.tensors)
    unexpected = [k for k in ckpt.tensors if k not in expected]
    if unexpected:
        raise UserError(f"'{ckpt.folder}' holds {len(unexpected)} tensors its config.json does not describe "
                        f"({_preview(unexpected)}): do the weights and config.json belong together?")
    if skeleton.info.tied and LM_HEAD in ckpt.tensors:
        reporter.info("note: tied model ships lm_head.weight; the embedding is used for it, as transformers does")
    for name, spec in skeleton.tensors.items():
        source = name
        if name == LM_HEAD and skeleton.info.tied:
            if not tied_lm_head:
                continue
            source = EMBED
        if source not in ckpt.tensors:
            raise UserError(f"'{ckpt.folder}' has no tensor '{source}' that its config.json requires")
        shape = ckpt.tensors[source].shape
        layout = None
        if is_expert(name):
            layout = expert_layout_of(name, shape, skeleton, hint)
        elif shape != spec.shape:
            raise UserError(f"'{source}' has shape {list(shape)} but config.json implies {list(spec.shape)}")
        plan.append((name, source, layout))
    file_index = {f: i for i, f in enumerate(ckpt.shards)}
    plan.sort(key=lambda p: (file_index[ckpt.tensors[p[1]].file], ckpt.tensors[p[1]].start))

    def out_bytes(source: str) -> int:
        info = ckpt.tensors[source]
        if out_dtype is None or not info.dtype.is_floating_point:
            return info.nbytes
        return info.nbytes // torch.empty((), dtype=info.dtype).element_size() * \
            torch.empty((), dtype=out_dtype).element_size()

    total_in = sum(ckpt.tensors[s].nbytes for _, s, _ in plan)
    total_out = sum(out_bytes(s) for _, s, _ in plan)
    dst = Path(dst)
    with staged_output(dst, overwrite=overwrite, needed_bytes=total_out + _RECORD_OVERHEAD * len(plan)) as stage:
        writer = DCPWriter(stage)
        current_file = None
        previous: tuple[str, torch.Tensor] | None = None  # a tied lm_head follows its embedding: read once
        with reporter.bytes_progress("hf-to-dcp", total_in) as advance:
            for name, source, layout in plan:
                shard = ckpt.tensors[source].file
                if shard != current_file:
                    writer.open_file(f"__0_{file_index[shard]}.distcp")
                    current_file = shard
                if previous is not None and previous[0] != source:
                    previous = None  # drop it before reading the next tensor: one tensor in memory
                tensor = previous[1] if previous is not None else ckpt.read(source)
                previous = (source, tensor) if source == EMBED and skeleton.info.tied else None
                if layout is not None:
                    tensor = convert_expert(tensor, layout, target_layout)
                key = prefix + name
                writer.write(key, _cast(tensor, out_dtype), _nesting(key, prefix))
                advance(ckpt.tensors[source].nbytes)
                del tensor
        writer.finish()
        shutil.copyfile(ckpt.config_path(), stage / "config.json")
    ckpt.close()
    return {
        "command": "hf-to-dcp", "source": str(ckpt.folder), "output": str(dst.absolute()),
        "tensors": len(plan), "bytes_read": total_in, "bytes_written": _folder_bytes(dst),
        "files": len(writer.files) + 2, "dtype": dtype_name(out_dtype) if out_dtype else "keep",
        "experts_layout": target_layout if skeleton.info.is_moe else None, "prefix": prefix,
        "tied": skeleton.info.tied, "seconds": round(reporter.elapsed, 3),
    }


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------- dcp -> hf
@dataclass(frozen=True)
class _TensorRecipe:
    name: str
    entry: DCPTensor
    layout: str | None  # source expert layout, None for non-experts
    view_as: tuple[int, ...] | None  # 3-D shape to view a 2-D stored expert as


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
                    f"{list(skeleton.tensors[name].shape)} (or its transpose)")


def _expert_recipe(name: str, entry: DCPTensor, skeleton: Skeleton) -> _TensorRecipe:
    layout, view_as = stored_expert_layout(name, entry.shape, skeleton)
    return _TensorRecipe(name, entry, layout, view_as)


def dcp_to_hf(src: str | Path, dst: str | Path, *, assets_dir: str | Path, dtype: str | None = "config",
              experts_layout: str = "released", max_shard_size: str | int = "5GB", prefix: str | None = None,
              allow_missing: bool = False, allow_unexpected: bool = False, overwrite: bool = False,
              reporter: Reporter | None = None) -> dict:
    """Convert a DCP folder to a Hugging Face folder with the assets of ``assets_dir``; return a summary.

    ``dtype``: ``config`` (default: the dtype config.json names, so fp32 master weights become bf16),
    ``keep``, or bf16/fp16/fp32. Experts are written in ``experts_layout`` (default: released).
    Keys are checked against the meta-device skeleton of the assets' config before anything is written.
    """
    reporter = reporter or Reporter(quiet=True)
    try:
        assets = resolve_source(assets_dir)  # a folder, or a model id in the local Hugging Face cache
    except UserError as exc:
        raise UserError(f"assets folder '{assets_dir}' does not exist (nor is it a cached model id)") from exc
    config = read_config_json(assets / "config.json")
    skeleton = build_skeleton(config)
    target_layout = _resolve_experts_layout(experts_layout, skeleton)
    reader = DCPReader(src)
    hf_keys = skeleton.hf_keys()
    source_map = map_dcp_keys(reader, set(skeleton.tensors), prefix)
    if not source_map.mapped:
        raise UserError(f"'{src}' holds no tensor of a {skeleton.info.family} model with this config "
                        f"(first keys: {list(reader.tensors)[:2]}); check --assets-dir or pass --prefix")
    tied_dropped = skeleton.info.tied and LM_HEAD in source_map.mapped
    if not skeleton.info.tied and LM_HEAD not in source_map.mapped:
        raise UserError(f"'{src}' has no lm_head.weight but config.json says the embeddings are untied: "
                        "an untied model needs its own lm_head")
    missing = [k for k in hf_keys if k not in source_map.mapped]
    if missing and not allow_missing:
        raise UserError(f"'{src}' lacks {len(missing)} tensors the model needs ({_preview(missing)}); "
                        "pass --allow-missing to write a partial checkpoint anyway")
    if source_map.unexpected and not allow_unexpected:
        raise UserError(f"'{src}' holds {len(source_map.unexpected)} tensors the model does not have "
                        f"({_preview(source_map.unexpected)}); pass --allow-unexpected to drop them")

    if dtype == "config":
        out_dtype = skeleton.info.dtype
    else:
        out_dtype = parse_dtype(dtype)

    recipes: list[_TensorRecipe] = []
    planned: list[PlannedTensor] = []
    for name in hf_keys:
        if name not in source_map.mapped:
            continue
        entry = reader.tensors[source_map.mapped[name]]
        if is_expert(name):
            recipe = _expert_recipe(name, entry, skeleton)
            shape = skeleton.shape_in(name, target_layout)
        else:
            if entry.shape != skeleton.tensors[name].shape:
                raise UserError(f"'{entry.key}' has shape {list(entry.shape)} but config.json implies "
                                f"{list(skeleton.tensors[name].shape)}")
            recipe = _TensorRecipe(name, entry, None, None)
            shape = entry.shape
        recipes.append(recipe)
        out = out_dtype if (out_dtype is not None and entry.dtype.is_floating_point) else entry.dtype
        planned.append(PlannedTensor(name, out, tuple(shape)))

    shards = plan_shards(planned, parse_size(max_shard_size))
    names = shard_file_names(len(shards))
    by_name = {r.name: r for r in recipes}
    total_out = sum(t.nbytes for t in planned)
    total_in = sum(r.entry.nbytes for r in recipes)
    asset_bytes = sum(p.stat().st_size for p in asset_files(assets))
    dst = Path(dst)
    with staged_output(dst, overwrite=overwrite, needed_bytes=total_out + asset_bytes) as stage:
        weight_map: dict[str, str] = {}
        with reporter.bytes_progress("dcp-to-hf", total_in) as advance:
            for fname, shard in zip(names, shards, strict=True):
                writer = SafetensorsFileWriter(stage / fname, shard)
                for planned_tensor in shard:
                    _stream_tensor(reader, by_name[planned_tensor.name], planned_tensor, target_layout, writer)
                    weight_map[planned_tensor.name] = fname
                    advance(by_name[planned_tensor.name].entry.nbytes)
                writer.close()
        if len(names) > 1:
            write_index(stage, weight_map, total_out)
        copied = copy_assets(assets, stage)
    reader.close()
    for rel in copied:
        reporter.info(f"copied {rel}")
    return {
        "command": "dcp-to-hf", "source": str(Path(src).absolute()), "output": str(dst.absolute()),
        "tensors": len(planned), "bytes_written": total_out, "files": names,
        "dtype": dtype_name(out_dtype) if out_dtype else "keep",
        "experts_layout": target_layout if skeleton.info.is_moe else None, "prefix": source_map.prefix,
        "assets_copied": copied, "dropped_non_model_tensors": source_map.dropped_non_model,
        "dropped_non_tensor_entries": source_map.dropped_non_tensor,
        "dropped_unexpected": source_map.unexpected, "missing": missing,
        "tied_lm_head_dropped": tied_dropped, "seconds": round(reporter.elapsed, 3),
    }


def _stream_tensor(reader: DCPReader, recipe: _TensorRecipe, planned: PlannedTensor, target_layout: str,
                   writer: SafetensorsFileWriter) -> None:
    """Write one output tensor: chunk by chunk when chunks are row slabs, else assembled once."""
    entry = recipe.entry
    direct = recipe.view_as is None and all(is_row_slab(c, entry.shape) for c in entry.chunks)
    if direct:
        for chunk in sorted(entry.chunks, key=lambda c: c.offsets[:1]):
            if 0 in chunk.sizes:
                continue
            piece = reader.read_chunk(chunk)
            if recipe.layout is not None:
                piece = convert_expert(piece, recipe.layout, target_layout)
            writer.write(planned.name, piece.to(planned.dtype), row_offset=chunk.offsets[0] if chunk.offsets else 0)
        return
    tensor = reader.read(entry.key)
    if recipe.view_as is not None:
        tensor = tensor.reshape(recipe.view_as)
    if recipe.layout is not None:
        tensor = convert_expert(tensor, recipe.layout, target_layout)
    writer.write(planned.name, tensor.to(planned.dtype))


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """Rows for the human-readable summary table."""
    from vlconvert.console import human_bytes

    rows = [("output", summary["output"]), ("tensors", str(summary["tensors"])),
            ("written", human_bytes(summary["bytes_written"])), ("dtype", summary["dtype"]),
            ("time", f"{summary['seconds']:.1f} s")]
    if summary.get("experts_layout"):
        rows.append(("experts", summary["experts_layout"]))
    if summary.get("prefix"):
        rows.append(("key prefix", summary["prefix"]))
    for key in ("dropped_non_model_tensors", "dropped_non_tensor_entries"):
        if summary.get(key):
            rows.append((key.replace("_", " "), str(summary[key])))
    if summary.get("assets_copied"):
        rows.append(("assets copied", ", ".join(summary["assets_copied"])))
    return rows


def dump_summary(summary: dict) -> str:
    """The summary as JSON text."""
    return json.dumps(summary, indent=2, default=str)
