"""``vlconvert inspect``: describe a checkpoint folder from its metadata alone (no tensor data is read).

Layout (HF, DCP, Megatron), model family and size (matched against the released sizes each family
module lists), parallel sizes, dtypes, parameter counts (total; active per token for MoE), tied embeddings,
expert orientation, the tokenizer's think-tag state, and every inconsistency with the config.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from vlconvert.dtypes import dtype_name, element_size
from vlconvert.errors import UserError
from vlconvert.locate import resolve_source
from vlconvert.models.base import ModelInfo, Skeleton, expert_layout_of
from vlconvert.models.family import Family
from vlconvert.models.registry import FAMILIES, any_is_expert, family_named, guess_family, known_sizes, load_config
from vlconvert.sources import MegatronSource, detect_layout, open_source
from vlconvert.sources.base import skeleton_of

# Every family's released sizes (models/<family>.py ``known_sizes``): the dims that tell them apart.
KNOWN_MODELS: dict[str, dict[str, Any]] = known_sizes()
_SHAPE_KEYS = ("family", "hidden", "layers", "experts", "vision_depth", "vision_hidden")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def identify_model(info: ModelInfo | dict[str, Any]) -> str | None:
    """The released size whose dims ``info`` has ('Qwen3-VL-8B', ...), or None for another shape.

    ``info`` is a ModelInfo (all dims compared) or a dict of the dims seen in tensor shapes.
    """
    for name, known in KNOWN_MODELS.items():
        dims = {k: getattr(info, k) for k in known} if isinstance(info, ModelInfo) else info
        if all(dims.get(k) == v for k, v in known.items() if k in dims):
            return name
    return None


def parameter_counts(shapes: dict[str, tuple[int, ...]], experts_per_token: int = 0,
                     experts: int = 0, family: Family | None = None) -> dict[str, int]:
    """Total / text / vision / expert parameters of canonical tensors, and active per token for MoE.

    Active = total - expert parameters * (1 - top_k / E): every token uses top_k of the E experts and all
    other weights (embedding and vision tower included).
    """
    family = family or _family_of(shapes)
    total = sum(math.prod(s) for s in shapes.values())
    vision = sum(math.prod(s) for n, s in shapes.items() if family.is_vision(n))
    expert = sum(math.prod(s) for n, s in shapes.items() if family.is_routed_expert(n))
    out = {"total": total, "text": total - vision, "vision": vision}
    if expert and experts:
        out["experts"] = expert
        out["active_per_token"] = total - expert + expert * experts_per_token // experts
    return out


def skeleton_parameter_counts(skeleton: Skeleton) -> dict[str, int]:
    """Parameter counts of a config (its HF tensors)."""
    shapes = {n: skeleton.shape_in(n, "released") for n in skeleton.hf_keys()}
    return parameter_counts(shapes, skeleton.info.experts_per_token, skeleton.info.experts, skeleton.family)


def _family_of(shapes: dict[str, tuple[int, ...]]) -> Family:
    """The family whose names a folder without a config holds (the first registered one if none matches)."""
    return guess_family(shapes) or FAMILIES[0]


def dims_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Model dims read off canonical tensor names and shapes (for folders without a config)."""
    dims: dict[str, Any] = {}
    family = _family_of(shapes)
    embed = family.embed
    if embed in shapes and len(shapes[embed]) == 2:
        dims["hidden"] = shapes[embed][1]
        dims["vocab_rows"] = shapes[embed][0]
    layers = {layer for n in shapes if (layer := family.layer_of(n)) is not None}
    if layers:
        dims["layers"] = max(layers) + 1
    blocks = {int(m.group(1)) for n in shapes if family.is_vision(n) and (m := _BLOCK.search(n))}
    if blocks:
        dims["vision_depth"] = max(blocks) + 1
    patch = shapes.get(family.vision_patch) if family.vision_patch else None
    if patch:
        dims["vision_hidden"] = patch[0]
    fused = next((s for n, s in shapes.items() if family.is_stacked_expert(n)), None)
    per_expert = {m.group(1) for n in shapes if family.is_routed_expert(n) and not family.is_stacked_expert(n)
                  and (m := re.search(r"\.experts\.(\d+)\.", n))}
    moe = fused is not None or bool(per_expert)
    dims["family"] = family.model_type_for(moe)
    dims["experts"] = fused[0] if fused is not None else len(per_expert)
    dims["tied"] = family.output not in shapes
    return dims


def think_tag_state(folder: Path, rows: bool = False) -> dict[str, Any]:
    """The tokenizer's ``<think>``/``</think>`` state; uses ``vlconvert.retag.think_tag_report`` if present."""
    try:
        from vlconvert.retag import think_tag_report  # type: ignore[attr-defined]
    except ImportError:
        think_tag_report = None
    if think_tag_report is not None:
        try:
            return dict(think_tag_report(folder, weights=rows))
        except UserError as exc:
            return {"error": str(exc)}
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return {"tokenizer": None}
    try:
        added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"error": f"'{path}' is not valid JSON"}
    by_content = {t.get("content"): t for t in added}
    state: dict[str, Any] = {"tokenizer": "tokenizer.json", "added_tokens": len(added),
                             "max_added_id": max((t.get("id", -1) for t in added), default=None)}
    for tag in ("<think>", "</think>"):
        t = by_content.get(tag)
        state[tag] = None if t is None else {"id": t.get("id"), "special": bool(t.get("special"))}
    template = _chat_template(Path(folder))
    if template is not None:
        state["chat_template_emits_think"] = "<think>" in template
    return state


def _chat_template(folder: Path) -> str | None:
    for name in ("chat_template.jinja",):
        if (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8", errors="replace")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                continue
            if isinstance(value, str):
                return value
    return None


def _find_config(path: Path, config: str | Path | None, assets_dir: str | Path | None) -> Path | None:
    for candidate in (config, assets_dir and Path(assets_dir) / "config.json", path / "config.json",
                      path.parent / "config.json" if path.name in ("release",) else None):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def inspect_checkpoint(path: str | Path, config: str | Path | None = None,
                       assets_dir: str | Path | None = None, rows: bool = False) -> dict[str, Any]:
    """Describe a checkpoint folder from metadata only; see the module docstring for what is reported.

    ``rows=True`` also reads the embedding matrices of an HF folder to compare the think tags' rows
    with trained rows (norm against the median row norm).
    """
    path = resolve_source(path)  # a folder, or a model id in the local Hugging Face cache
    layout = detect_layout(path)
    if layout == "unknown":
        raise UserError(f"'{path}' holds no safetensors, DCP (.metadata) or Megatron (mp_rank_*) checkpoint")
    cfg_path = _find_config(path, config, assets_dir)
    info = load_config(cfg_path) if cfg_path else None
    skeleton = skeleton_of(info, None, path) if info else None  # the stored form this folder holds
    if info is not None and layout != "hf" and family_named(info.family).stored_forms:
        skeleton = None  # the reader takes the stored form from the tensors it holds
    src = open_source(path, config=cfg_path, skeleton=skeleton)
    if skeleton is None and getattr(src, "skeleton", None) is not None:  # e.g. config kept in Megatron metadata
        skeleton = src.skeleton
        info = skeleton.info
    issues: list[str] = []
    try:
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: Counter[str] = Counter()
        for name in src.names():
            shape, dtype = src.spec(name)
            shapes[name] = tuple(shape)
            dtypes[dtype_name(dtype)] += math.prod(shape) * element_size(dtype)
        config_text = str(cfg_path) if cfg_path else ("from checkpoint metadata" if info else None)
        report: dict[str, Any] = {"path": str(path), "layout": layout, "config": config_text,
                                  "tensors": len(shapes), "bytes": sum(dtypes.values()),
                                  "dtypes": dict(dtypes.most_common())}
        if getattr(src, "consumer", None):  # torch_dist: which framework's save this looks like
            report["saved_by"] = src.consumer
        report.update(_layout_details(src, layout, skeleton, issues))
    finally:
        close = getattr(src, "close", None)
        if close:
            close()

    dims = dims_from_shapes(shapes)
    report["family"] = info.family if info else dims["family"]
    report["model"] = identify_model(info) if info else identify_model({k: dims[k] for k in _SHAPE_KEYS if k in dims})
    shape_model = identify_model({k: dims[k] for k in _SHAPE_KEYS if k in dims})
    if info and report["model"] != shape_model and shapes:
        issues.append(f"config says {report['model'] or 'an unreleased size'}, tensor shapes say "
                      f"{shape_model or 'an unreleased size'}")
    k, e = (info.experts_per_token, info.experts) if info else (8 if dims["experts"] else 0, dims["experts"])
    report["parameters"] = parameter_counts(shapes, k, e)
    has_head = (skeleton.family if skeleton is not None else _family_of(shapes)).output in shapes
    report["tied_embeddings"] = {"config": info.tied if info else None, "lm_head_stored": has_head}
    if info:
        if info.tied and has_head:
            issues.append("config says tied embeddings but lm_head.weight is stored")
        if not info.tied and not has_head:
            issues.append("config says untied embeddings but lm_head.weight is missing")
        report["config_dtype"] = dtype_name(info.dtype) if info.dtype else None
        if info.dtype and set(dtypes) - {dtype_name(info.dtype)}:
            issues.append(f"config dtype is {dtype_name(info.dtype)}, tensors are stored as {', '.join(dtypes)}")
        issues.extend(_compare_with_skeleton(shapes, skeleton))
    tok_dir = path if (path / "tokenizer.json").is_file() else (Path(assets_dir) if assets_dir else None)
    report["think_tags"] = think_tag_state(tok_dir, rows=rows) if tok_dir else {"tokenizer": None}
    max_id = report["think_tags"].get("max_added_id")
    rows = dims.get("vocab_rows")
    if isinstance(max_id, int) and rows is not None and max_id >= rows:
        issues.append(f"tokenizer has token id {max_id} but the embedding has only {rows} rows")
    report["inconsistencies"] = issues
    return report


def _compare_with_skeleton(shapes: dict[str, tuple[int, ...]], skeleton: Skeleton | None) -> list[str]:
    if skeleton is None:
        return []
    expected = {n: skeleton.shape_in(n, "released") for n in skeleton.hf_keys()}
    issues = []
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing:
        issues.append(f"{len(missing)} tensors of the config are missing (first: {missing[0]})")
    if unexpected:
        issues.append(f"{len(unexpected)} tensors are not in the config (first: {unexpected[0]})")
    wrong = [n for n in sorted(set(expected) & set(shapes)) if tuple(expected[n]) != tuple(shapes[n])]
    if wrong:
        issues.append(f"{len(wrong)} tensors have shapes other than the config's (first: {wrong[0]} "
                      f"{list(shapes[wrong[0]])}, config {list(expected[wrong[0]])})")
    return issues


def _layout_details(src: Any, layout: str, skeleton: Skeleton | None, issues: list[str]) -> dict[str, Any]:
    """What only one layout knows: shards and index (HF), ranks and files (DCP), rank folders (Megatron)."""
    out: dict[str, Any] = {}
    if layout == "hf":
        ckpt = src.checkpoint
        out["files"] = len(ckpt.shards)
        out["parallel"] = None
        orientations = {n: src.stored_layout(n) for n in src.names() if any_is_expert(n)}
        out["experts_orientation"] = _summarise_orientation(orientations)
        index = ckpt.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                total = json.loads(index.read_text())["metadata"]["total_size"]
                if int(total) != ckpt.total_bytes:
                    issues.append(f"model.safetensors.index.json total_size {total} != {ckpt.total_bytes} "
                                  "bytes of tensors in the shards")
            except (KeyError, TypeError, ValueError, json.JSONDecodeError):
                issues.append("model.safetensors.index.json has no metadata.total_size")
        return out
    if isinstance(src, MegatronSource):
        mp = src.plan
        out["parallel"] = {"tp": mp.tp, "pp": mp.pp, "ep": mp.ep, "etp": mp.etp, "stage_layers": mp.stage_layers,
                           "padded_vocab": mp.padded_vocab, "spec": mp.spec, "experts": mp.experts}
        out["files"] = len(src.files)
        out["iteration"] = src.layout_info.iteration
        out["notes"] = list(src.notes)
        if skeleton is not None and skeleton.info.is_moe:
            out["experts_orientation"] = f"megatron per-expert [out, in] ({mp.experts})"
        return out
    for attr in ("parallel_sizes", "parallel"):
        value = getattr(src, attr, None)
        if value is not None:
            out["parallel"] = value() if callable(value) else value
            break
    else:
        out["parallel"] = {k: getattr(src, k) for k in ("tp", "pp", "ep") if hasattr(src, k)} or None
    stored = getattr(src, "stored_layout", None) or getattr(src, "experts_layout", None)
    if callable(stored):
        orientations = {n: stored(n) for n in src.names() if any_is_expert(n)}
        out["experts_orientation"] = _summarise_orientation(orientations)
    elif isinstance(stored, str):
        out["experts_orientation"] = stored
    elif layout == "megatron":
        out["experts_orientation"] = "megatron per-expert [out, in]" if any(any_is_expert(n) for n in src.names()) \
            else None
    if layout == "dcp":
        out.update(_dcp_details(src, skeleton))
    elif layout == "torch_dist":
        reader = getattr(src, "reader", None)
        if reader is not None:  # the data files of the iteration folder (.metadata, common.pt beside them)
            out["files"] = len({c.file.name for t in reader.tensors.values() for c in t.chunks})
        out["iteration"] = getattr(src, "iteration", None)
        if out.get("experts_orientation") is None and skeleton is not None and skeleton.info.is_moe:
            # one global tensor per projection with the expert axis sharded: sequential and grouped experts
            # (--experts) save the same keys and load from either
            out["experts_orientation"] = "megatron per-expert [out, in] (global, sequential or grouped modules)"
    return out


def _dcp_details(src: Any, skeleton: Skeleton | None) -> dict[str, Any]:
    from vlconvert.layouts.dcp import DCPReader

    reader = getattr(src, "reader", None)
    if not isinstance(reader, DCPReader):
        reader = DCPReader(src.folder)
    files = {c.file.name for t in reader.tensors.values() for c in t.chunks}
    ranks = {int(m.group(1)) for f in files if (m := re.match(r"__(\d+)_\d+\.distcp$", f))}
    max_chunks = max((len(t.chunks) for t in reader.tensors.values()), default=0)
    out: dict[str, Any] = {"files": len(files), "dcp_writer_ranks": len(ranks) or None,
                           "max_chunks_per_tensor": max_chunks, "non_tensor_entries": len(reader.non_tensors)}
    if out.get("experts_orientation") is None and skeleton is not None:
        found = {}
        for key, entry in reader.tensors.items():
            for name in skeleton.tensors:
                if skeleton.family.is_expert(name) and key.endswith(name):
                    found[name] = expert_layout_of(name, entry.shape, skeleton)
        if found:
            out["experts_orientation_stored"] = _summarise_orientation(found)
    return out


def _summarise_orientation(orientations: dict[str, str | None]) -> str | None:
    values = {v for v in orientations.values() if v}
    if not values:
        return None
    if len(values) > 1:
        return "mixed: " + ", ".join(sorted(values))
    return values.pop()
