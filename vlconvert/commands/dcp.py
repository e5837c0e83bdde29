"""``vlconvert hf-to-dcp`` and ``vlconvert dcp-to-hf``."""

from __future__ import annotations

import click

from vlconvert.commands.common import (
    asset_rows,
    check_spelling_reads,
    file_count,
    files_text,
    merge_lora_option,
    show_dry_run,
    written,
)
from vlconvert.console import VERBOSE_ASSETS, DtypeParam, Reporter, handle_errors, human_bytes, output_options
from vlconvert.errors import UsageError


@click.command("hf-to-dcp")
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--prefix", default="", show_default=True,
              help="Prepend this to every key, for frameworks that nest the model (e.g. 'model.').")
@click.option("--dtype", type=DtypeParam("keep", "auto", "config"), default="keep", show_default=True,
              help="Cast floating tensors: keep, auto (= keep for HF), config (config.json's), bf16, fp16, fp32.")
@click.option("--experts-layout", type=click.Choice(["auto", "released", "transformers5"]), default="auto",
              show_default=True, help="MoE expert orientation to write; auto = the installed transformers'.")
@click.option("--no-tied-lm-head", is_flag=True,
              help="For tied models, do not write lm_head.weight (the model's state dict has it).")
@merge_lora_option
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new one is complete).")
@click.option("--resume", is_flag=True,
              help="Finish the staged output of an interrupted run of the same command, keeping its verified files.")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, bytes, notes) and write nothing.")
@output_options(quiet="the output folder's path")
@handle_errors
def hf_to_dcp_command(src: str, dst: str, prefix: str, dtype: str, experts_layout: str, no_tied_lm_head: bool,
                      merge_lora: str | None, overwrite: bool, resume: bool, dry_run: bool, as_json: bool,
                      quiet: bool) -> None:
    """Convert the Hugging Face checkpoint SRC (folder or cached model id) to a DCP folder DST.

    The DCP loads with torch.distributed.checkpoint.load into the model's state dict, built on the
    meta device or sharded with FSDP2.
    """
    from vlconvert.dtypes import dtype_name
    from vlconvert.engine import Converter

    check_spelling_reads("hf-to-dcp", src, dst)
    reporter = Reporter(as_json, quiet)
    # the Converter vlconvert.dcp_convert.hf_to_dcp builds, plus --merge-lora
    conv = Converter(src, dst, to="dcp", prefix=prefix, dtype=dtype or "keep", experts_layout=experts_layout,
                     tied_lm_head=not no_tied_lm_head, merge_lora=merge_lora, overwrite=overwrite, resume=resume,
                     info=reporter.info, source_layout="hf")
    if dry_run:
        show_dry_run(reporter, conv, dst, "hf-to-dcp")
        return
    reporter.expect(conv.plan().files)  # the progress bar counts files and tensors
    result = conv.run(reporter.bytes_progress)
    plan = result.plan
    summary = {  # the summary hf_to_dcp returns
        "command": "hf-to-dcp", "source": plan.source, "output": str(result.output.absolute()),
        "tensors": sum(len(f.tensors) for f in plan.files), "bytes_read": plan.tensor_bytes,
        "bytes_written": result.bytes_written, "files": result.files,
        "dtype": dtype_name(plan.dtype) if plan.dtype else "keep", "experts_layout": plan.experts_layout,
        "prefix": prefix, "tied": conv.source.skeleton.info.tied, "notes": result.notes,
        "tensor_files": len(plan.files),
        "seconds": round(reporter.elapsed, 3),
    }
    reporter.summary("hf-to-dcp", summary, _rows(summary, reporter))


@click.command("dcp-to-hf")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--assets-dir", required=True,
              help="The original Hugging Face folder (or cached model id): config, tokenizer and processor "
                   "files are copied from it.")
@click.option("--dtype", type=DtypeParam("config", "keep", "auto"), default="config", show_default=True,
              help="Output dtype: config (the one config.json names), keep, auto (= config), bf16, fp16, fp32.")
@click.option("--experts-layout", type=click.Choice(["released", "transformers5"]), default="released",
              show_default=True, help="MoE expert orientation to write.")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest safetensors file: 5GB is 5*10^9 bytes (as transformers), 5GiB 5*2^30.")
@click.option("--src-prefix", "prefix", default=None,
              help="Key prefix of the DCP to strip (default: detected); as convert --src-prefix.")
@click.option("--prefix", "old_prefix", default=None, hidden=True, expose_value=True)
@click.option("--allow-missing", is_flag=True, help="Write even if the DCP lacks some model tensors.")
@click.option("--allow-unexpected", is_flag=True, help="Drop tensors the model does not have instead of failing.")
@merge_lora_option
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new one is complete).")
@click.option("--resume", is_flag=True,
              help="Finish the staged output of an interrupted run of the same command, keeping its verified files.")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, bytes, notes) and write nothing.")
@output_options(verbose=VERBOSE_ASSETS, quiet="the output folder's path")
@handle_errors
def dcp_to_hf_command(src: str, dst: str, assets_dir: str, dtype: str, experts_layout: str, max_shard_size: str,
                      prefix: str | None, old_prefix: str | None, allow_missing: bool, allow_unexpected: bool,
                      merge_lora: str | None, overwrite: bool, resume: bool, dry_run: bool, as_json: bool,
                      quiet: bool) -> None:
    """Convert the DCP folder SRC (from vlconvert or an FSDP2 training job) to a Hugging Face folder DST."""
    if old_prefix is not None:  # one meaning per option name: --prefix is the prefix a DCP output gets
        raise UsageError(f"--prefix names the key prefix a DCP output gets (hf-to-dcp, convert --to dcp); "
                         f"the prefix to strip from this DCP's keys is --src-prefix {old_prefix}")
    from vlconvert.dcp_convert import run_dcp_to_hf
    from vlconvert.engine import Converter

    check_spelling_reads("dcp-to-hf", src, dst, assets_dir)
    reporter = Reporter(as_json, quiet)
    # the Converter vlconvert.dcp_convert.dcp_to_hf builds, plus --merge-lora
    conv = Converter(src, dst, to="hf", assets_dir=assets_dir, dtype=dtype or "keep", experts_layout=experts_layout,
                     max_shard_size=max_shard_size, src_prefix=prefix, allow_missing=allow_missing,
                     allow_unexpected=allow_unexpected, merge_lora=merge_lora, overwrite=overwrite, resume=resume,
                     info=reporter.info, source_layout="dcp")
    if dry_run:
        show_dry_run(reporter, conv, dst, "dcp-to-hf")
        return
    summary = run_dcp_to_hf(conv, src, reporter)
    summary["tensor_files"] = len(conv.plan().files)
    summary["tensor_bytes"] = summary["bytes_written"]
    summary["bytes_written"] = written(summary["output"])  # bytes on disk, as in every command
    reporter.summary("dcp-to-hf", summary, _rows(summary, reporter))


def _rows(summary: dict, reporter: Reporter) -> list[tuple[str, str]]:
    """The summary table: the same rows, units and asset reporting as every converter."""
    from vlconvert.dcp_convert import summary_rows

    rows = [r for r in summary_rows(summary) if r[0] != "assets copied"]
    at = next((i for i, r in enumerate(rows) if r[0] == "written"), len(rows))
    rows[at] = ("written", f"{human_bytes(summary['bytes_written'])} on disk")
    rows[at + 1:at + 1] = [("files", files_text(file_count(summary["output"]), summary["tensor_files"]))]
    notes = [i for i, r in enumerate(rows) if r[0] == "note"]
    at = notes[0] if notes else len(rows)
    rows[at:at] = asset_rows(summary.get("assets_copied") or [], reporter.verbose)
    return rows
