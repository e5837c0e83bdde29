"""``hf-to-dcp`` and ``dcp-to-hf``: thin spellings of :class:`vlconvert.engine.Converter` with their summaries.

The DCP reader (key mapping, wrapper stripping, prefix detection, expert orientation) lives in
:mod:`vlconvert.sources`, the DCP writer in :mod:`vlconvert.layouts.dcp`.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlconvert.console import Reporter, human_bytes
from vlconvert.dtypes import dtype_name
from vlconvert.engine import Converter
from vlconvert.sources import DCPSource, map_dcp_keys, stored_expert_layout, strip_wrappers

__all__ = ["dcp_to_hf", "dump_summary", "hf_to_dcp", "map_dcp_keys", "stored_expert_layout", "strip_wrappers",
           "summary_rows"]


def hf_to_dcp(src: str | Path, dst: str | Path, *, prefix: str = "", dtype: str | None = None,
              experts_layout: str = "auto", tied_lm_head: bool = True, overwrite: bool = False,
              resume: bool = False, reporter: Reporter | None = None) -> dict:
    """Convert a Hugging Face Qwen3-VL folder (or cached model id) to a DCP folder; return a summary.

    Keys are the installed transformers model's state-dict names (with ``prefix`` prepended); experts are
    written in ``experts_layout`` (``auto`` = the installed transformers' run-time orientation). Tied
    models also get ``lm_head.weight`` (a copy of the embedding), as ``dcp.save`` of a tied model writes it.
    """
    reporter = reporter or Reporter(quiet=True)
    conv = Converter(src, dst, to="dcp", prefix=prefix, dtype=dtype or "keep", experts_layout=experts_layout,
                     tied_lm_head=tied_lm_head, overwrite=overwrite, resume=resume, info=reporter.info,
                     source_layout="hf")
    reporter.expect(conv.plan().files)  # the progress bar counts files and tensors
    result = conv.run(reporter.bytes_progress)
    plan = result.plan
    sk = conv.source.skeleton
    return {
        "command": "hf-to-dcp", "source": plan.source, "output": str(result.output.absolute()),
        "tensors": sum(len(f.tensors) for f in plan.files), "bytes_read": plan.tensor_bytes,
        "bytes_written": result.bytes_written, "files": result.files,
        "dtype": dtype_name(plan.dtype) if plan.dtype else "keep", "experts_layout": plan.experts_layout,
        "prefix": prefix, "tied": sk.info.tied, "notes": result.notes, "seconds": round(reporter.elapsed, 3),
    }


def dcp_to_hf(src: str | Path, dst: str | Path, *, assets_dir: str | Path, dtype: str | None = "config",
              experts_layout: str = "released", max_shard_size: str | int = "5GB", prefix: str | None = None,
              allow_missing: bool = False, allow_unexpected: bool = False, overwrite: bool = False,
              resume: bool = False, reporter: Reporter | None = None) -> dict:
    """Convert a DCP folder to a Hugging Face folder with the assets of ``assets_dir``; return a summary.

    ``dtype``: ``config`` (default: the dtype config.json names, so fp32 master weights become bf16),
    ``keep``, or bf16/fp16/fp32. Experts are written in ``experts_layout`` (default: released).
    """
    reporter = reporter or Reporter(quiet=True)
    conv = Converter(src, dst, to="hf", assets_dir=assets_dir, dtype=dtype or "keep", experts_layout=experts_layout,
                     max_shard_size=max_shard_size, src_prefix=prefix, allow_missing=allow_missing,
                     allow_unexpected=allow_unexpected, overwrite=overwrite, resume=resume, info=reporter.info,
                     source_layout="dcp")
    return run_dcp_to_hf(conv, src, reporter)


def run_dcp_to_hf(conv: Converter, src: str | Path, reporter: Reporter) -> dict:
    """Run a DCP -> HF ``conv`` (``dcp_to_hf``'s, or the command's with ``--merge-lora``); its summary."""
    reporter.expect(conv.plan().files)  # the progress bar counts files and tensors
    result = conv.run(reporter.bytes_progress)
    plan = result.plan
    source = conv.source
    dcp = getattr(source, "inner", source)  # the DCP reader, also under --merge-lora's wrapper
    keys = dcp.keys if isinstance(dcp, DCPSource) else None
    for rel in result.assets:
        reporter.detail(f"copied {rel}")
    return {
        "command": "dcp-to-hf", "source": str(Path(src).absolute()), "output": str(result.output.absolute()),
        "tensors": sum(len(f.tensors) for f in plan.files), "bytes_written": plan.tensor_bytes,
        "files": [f.name for f in plan.files], "dtype": dtype_name(plan.dtype) if plan.dtype else "keep",
        "experts_layout": plan.experts_layout, "prefix": keys.prefix if keys else None,
        "assets_copied": result.assets, "dropped_non_model_tensors": keys.dropped_non_model if keys else 0,
        "dropped_non_tensor_entries": keys.dropped_non_tensor if keys else 0,
        "dropped_unexpected": list(keys.unexpected) if keys else [], "missing": plan.missing,
        "tied_lm_head_dropped": bool(getattr(dcp, "tied_lm_head_dropped", False)), "notes": result.notes,
        "seconds": round(reporter.elapsed, 3),
    }


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """Rows for the human-readable summary table."""
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
    rows += [("note", n) for n in summary.get("notes", [])]
    return rows


def dump_summary(summary: dict) -> str:
    """The summary as JSON text."""
    return json.dumps(summary, indent=2, default=str)
