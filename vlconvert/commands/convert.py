"""``vlconvert convert SRC DST --to hf|dcp|megatron``: any layout to any layout, in one pass."""

from __future__ import annotations

from pathlib import Path

import click

from vlconvert.commands.common import asset_rows, files_text, merge_lora_option, show_dry_run
from vlconvert.console import VERBOSE_ASSETS, DtypeParam, Reporter, handle_errors, human_bytes, output_options
from vlconvert.layouts.consumers import CONSUMERS, DEFAULT_CONSUMER

TARGETS = ("hf", "dcp", "megatron", "torch_dist")


@click.command("convert")
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option("--to", "to", type=click.Choice(TARGETS), required=True, help="Target layout.")
@click.option("--assets-dir", default=None,
              help="The original Hugging Face folder (or cached model id): config, tokenizer and processor files. "
                   "Needed for --to hf from DCP or Megatron, and for sources that carry no config.")
@click.option("--config", type=click.Path(exists=True), default=None, help="config.json for sources without one.")
@click.option("--dtype", type=DtypeParam("auto", "keep", "config"), default="auto", show_default=True,
              help="auto (a DCP's config dtype, else keep), keep, config, bf16, fp16, fp32.")
@click.option("--experts-layout", type=click.Choice(["auto", "released", "transformers5"]), default=None,
              help="MoE expert orientation to write: hf default released; dcp default auto (the installed "
                   "transformers').")
@click.option("--prefix", default="", help="DCP output: prepend this to every key (e.g. 'model.').")
@click.option("--src-prefix", default=None, help="DCP source: key prefix to strip (default: detected).")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="HF output: largest safetensors file: 5GB is 5*10^9 bytes (as transformers), 5GiB 5*2^30.")
@click.option("--no-tied-lm-head", is_flag=True, help="DCP output of a tied model: leave lm_head.weight out.")
@click.option("--allow-missing", is_flag=True, help="HF output: write even if the source lacks some tensors.")
@click.option("--allow-unexpected", is_flag=True, help="Drop source tensors the model does not have.")
@click.option("--tp", type=int, default=1, show_default=True, help="Megatron: tensor-parallel size.")
@click.option("--pp", type=int, default=1, show_default=True, help="Megatron: pipeline-parallel size.")
@click.option("--ep", type=int, default=1, show_default=True, help="Megatron: expert-parallel size (MoE).")
@click.option("--etp", type=int, default=None, help="Megatron: expert tensor-parallel size (default: --tp).")
@click.option("--spec", type=click.Choice(["te", "local"]), default=None,
              help="Megatron: te (norms fused into linear_qkv/fc1) or local (default: te, or the source's).")
@click.option("--experts", "experts", type=click.Choice(["grouped", "sequential"]), default=None,
              help="Megatron expert style (default: grouped, or the source's).")
@click.option("--pp-first-layers", type=int, default=None, help="Megatron: decoder layers on the first stage.")
@click.option("--pp-last-layers", type=int, default=None, help="Megatron: decoder layers on the last stage.")
@click.option("--make-vocab-size-divisible-by", type=int, default=128, show_default=True,
              help="Megatron: pad the vocabulary to a multiple of this times --tp.")
@click.option("--padded-vocab-size", type=int, default=None, help="Megatron: exact padded vocabulary rows.")
@click.option("--iteration", type=int, default=None,
              help="Megatron: write iter_NNNNNNN/ (default: release/; torch_dist: as the --for framework saves).")
@click.option("--for", "consumer", type=click.Choice(list(CONSUMERS)), default=None,
              help="torch_dist: the framework that will load it; the output matches that framework's own save "
                   f"(keys, common state, folders, vocabulary padding). Default: {DEFAULT_CONSUMER}.")
@merge_lora_option
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Stay under this peak memory (e.g. 1GiB): smaller blocks, or a refusal up front.")
@click.option("--workers", default="auto", show_default=True, metavar="N|auto",
              help="Processes that write the output's bytes together (auto: one per GiB of output, at most 8 and "
                   "half the cores; 1 on two cores). The output is the same whatever N.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new one is complete).")
@click.option("--resume", is_flag=True,
              help="Finish the staged output of an interrupted run of the same command, keeping its verified files.")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, bytes, checks) and write nothing.")
@output_options(verbose=VERBOSE_ASSETS, quiet="the output folder's path")
@handle_errors
def convert_command(src: str, dst: Path, to: str, assets_dir: str | None, config: str | None, dtype: str,
                    experts_layout: str | None, prefix: str, src_prefix: str | None, max_shard_size: str,
                    no_tied_lm_head: bool, allow_missing: bool, allow_unexpected: bool, tp: int, pp: int, ep: int,
                    etp: int | None, spec: str | None, experts: str | None, pp_first_layers: int | None,
                    pp_last_layers: int | None, make_vocab_size_divisible_by: int, padded_vocab_size: int | None,
                    iteration: int | None, consumer: str | None, merge_lora: str | None, max_memory: str | None,
                    workers: str, overwrite: bool,
                    resume: bool, dry_run: bool,
                    as_json: bool, quiet: bool) -> None:
    """Convert checkpoint SRC (Hugging Face folder or cached model id, DCP, Megatron; detected) to
    layout --to in DST, streamed in one pass.

    \b
    Examples:
      vlconvert convert ./step_1000 mg --to megatron --tp 2 --ep 4 --assets-dir Qwen3-VL-30B-A3B-Instruct
      vlconvert convert mg hf --to hf --assets-dir Qwen3-VL-30B-A3B-Instruct
      out=$(vlconvert convert Qwen/Qwen3-VL-8B-Instruct dcp --to dcp -q)
    """
    from vlconvert.engine import Converter

    rep = Reporter(as_json, quiet)
    conv = Converter(src, dst, to=to, dtype=dtype, assets_dir=assets_dir, config=config,
                     experts_layout=experts_layout, prefix=prefix, src_prefix=src_prefix,
                     max_shard_size=max_shard_size, tied_lm_head=not no_tied_lm_head, allow_missing=allow_missing,
                     allow_unexpected=allow_unexpected, tp=tp, pp=pp, ep=ep, etp=etp, spec=spec, experts=experts,
                     pp_first_layers=pp_first_layers, pp_last_layers=pp_last_layers,
                     padded_vocab_size=padded_vocab_size, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                     iteration=iteration, consumer=consumer, merge_lora=merge_lora, overwrite=overwrite,
                     resume=resume,
                     max_memory=max_memory, workers=workers, info=rep.info)
    plan = conv.plan()
    data = plan.to_dict()
    if dry_run:
        show_dry_run(rep, conv, dst, "convert")
        return
    rep.expect(plan.files)  # the progress bar counts files and tensors
    result = conv.run(rep.bytes_progress)
    data = {**data, "output": str(result.output.absolute()), "files_written": result.files,
            "tensor_files": len(plan.files),
            "bytes_written": result.bytes_written, "assets_copied": result.assets, "notes": result.notes,
            "seconds": round(rep.elapsed, 3)}
    rows = [("output", str(result.output)), ("from", f"{plan.source_layout} ({plan.source})"), ("to", to),
            ("files", files_text(result.files, len(plan.files))),
            ("written", f"{human_bytes(result.bytes_written)} on disk"),
            ("dtype", data["dtype"]), ("time", f"{rep.elapsed:.1f} s")]
    if plan.experts_layout:
        rows.append(("experts", plan.experts_layout))
    if plan.megatron is not None:
        m = plan.megatron
        rows.append(("parallel", f"TP={m.tp} PP={m.pp} EP={m.ep} ETP={m.etp} (layers per stage {m.stage_layers})"))
        rows.append(("train with", m.training_flags()))
    if plan.consumer:
        from vlconvert.layouts.consumers import consumer as consumer_named

        rows.append(("for", plan.consumer))
        rows.append(("load with", consumer_named(plan.consumer).load.replace("DST", str(result.output))))
    for rel in result.assets:
        rep.detail(f"copied {rel}")
    rows += asset_rows(result.assets, rep.verbose)
    rows += [("note", n) for n in result.notes]
    rep.summary("convert", data, rows)
