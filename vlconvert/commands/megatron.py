"""``hf-to-megatron``, ``megatron-to-hf`` and ``reshard``: Megatron-Core legacy (torch) checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    pass

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
from vlconvert.dtypes import DType

DTYPE = DtypeParam("keep", "config")


def _dtype(name: str | None) -> DType | str | None:
    """A checked --dtype value -> what the converters take: None (keep), 'config', or a torch dtype."""
    from vlconvert.dtypes import parse_dtype

    if name in (None, "keep"):
        return None
    return name if name == "config" else parse_dtype(name)


def _parallel_options(func):
    opts = [
        click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel size."),
        click.option("--pp", type=int, default=1, show_default=True, help="Pipeline-parallel size."),
        click.option("--ep", type=int, default=1, show_default=True, help="Expert-parallel size (MoE only)."),
        click.option("--etp", type=int, default=None, help="Expert tensor-parallel size (default: --tp)."),
        click.option("--pp-first-layers", type=int, default=None,
                     help="Decoder layers on the first stage (Megatron-LM --decoder-first-pipeline-num-layers)."),
        click.option("--pp-last-layers", type=int, default=None,
                     help="Decoder layers on the last stage (Megatron-LM --decoder-last-pipeline-num-layers)."),
        click.option("--make-vocab-size-divisible-by", type=int, default=128, show_default=True,
                     help="Pad the vocabulary to a multiple of this times --tp, as Megatron-LM does."),
        click.option("--padded-vocab-size", type=int, default=None,
                     help="Exact padded vocabulary rows (overrides --make-vocab-size-divisible-by)."),
        click.option("--iteration", type=int, default=None,
                     help="Write iter_NNNNNNN/ with this number instead of release/."),
        click.option("--dtype", type=DTYPE, default=None,
                     help="Cast weights: keep (default), config (config.json's), bf16, fp16, fp32."),
        merge_lora_option,
        click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new one is complete)."),
        click.option("--resume", is_flag=True, help="Finish the staged output of an interrupted run of the same "
                                                    "command, keeping its verified files."),
        click.option("--dry-run", is_flag=True, help="Print the plan (rank files, bytes, notes) and write nothing."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _report(rep: Reporter, title: str, result, extra_rows: list[tuple[str, str]] | None = None) -> None:
    plan = result.plan
    on_disk = written(result.output)
    files = file_count(result.output)
    data = {"output": str(result.output), "files": result.files, "files_written": files,
            "tensor_files": result.files, "bytes": result.bytes,
            "bytes_written": on_disk, "seconds": round(rep.elapsed, 3), "notes": result.notes}
    rows = [("output", str(result.output)), ("files", files_text(files, result.files)),
            ("written", f"{human_bytes(on_disk)} on disk"), ("weights", human_bytes(result.bytes)),
            ("time", f"{rep.elapsed:.1f} s")]
    if plan is not None:
        data.update({"tp": plan.tp, "pp": plan.pp, "ep": plan.ep, "etp": plan.etp, "spec": plan.spec,
                     "experts": plan.experts, "stage_layers": plan.stage_layers, "vocab": plan.vocab,
                     "padded_vocab": plan.padded_vocab, "megatron_flags": plan.training_flags()})
        rows.append(("parallel", f"TP={plan.tp} PP={plan.pp} EP={plan.ep} ETP={plan.etp} "
                                 f"(layers per stage {plan.stage_layers})"))
        rows.append(("layout", f"spec {plan.spec}, experts {plan.experts}, vocab {plan.vocab} -> {plan.padded_vocab}"))
    rows += extra_rows or []
    rows += asset_rows(result.extra.get("assets") or [], rep.verbose)
    rows += [("note", n) for n in result.notes]
    data.update(result.extra)
    rep.summary(title, data, rows)


def _factory(rep: Reporter):
    """The progress factory the conversion functions take; ``expect`` lets the bar count files and tensors."""

    def factory(description: str, total: int):
        return rep.bytes_progress(description, total)

    factory.expect = rep.expect  # type: ignore[attr-defined]
    return factory


@click.command("hf-to-megatron")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@_parallel_options
@click.option("--spec", type=click.Choice(["te", "local"]), default="te", show_default=True,
              help="te: input norms fused into linear_qkv/linear_fc1 (Transformer Engine); local: separate norms.")
@click.option("--experts", "experts", type=click.Choice(["grouped", "sequential"]), default="grouped",
              show_default=True, help="grouped: experts.linear_fc1.weight{i} (TEGroupedMLP); "
                                      "sequential: experts.local_experts.{i}.* (SequentialMLP).")
@output_options(quiet="the output folder's path")
@handle_errors
def hf_to_megatron_command(src: Path, dst: Path, tp: int, pp: int, ep: int, etp: int | None,
                           pp_first_layers: int | None, pp_last_layers: int | None,
                           make_vocab_size_divisible_by: int, padded_vocab_size: int | None, iteration: int | None,
                           dtype: str | None, merge_lora: str | None, overwrite: bool, resume: bool, dry_run: bool,
                           spec: str, experts: str, as_json: bool, quiet: bool) -> None:
    """Convert a Hugging Face Qwen3-VL(-MoE) folder SRC to Megatron-Core legacy rank files in DST.

    Writes DST/latest_checkpointed_iteration.txt and DST/release/mp_rank_*/model_optim_rng.pt with
    Megatron-Bridge names (language_model.*, vision_model.*).

    \b
    Example:
      vlconvert hf-to-megatron Qwen3-VL-30B-A3B-Instruct out --tp 2 --pp 2 --ep 8
    """
    from vlconvert.engine import Converter
    from vlconvert.megatron_convert import _run

    check_spelling_reads("hf-to-megatron", src, dst)
    rep = Reporter(as_json, quiet)
    # the Converter vlconvert.megatron_convert.hf_to_megatron builds, plus --merge-lora
    conv = Converter(src, dst, to="megatron", tp=tp, pp=pp, ep=ep, etp=etp, spec=spec, experts=experts,
                     dtype=_dtype(dtype) or "keep", padded_vocab_size=padded_vocab_size,
                     make_vocab_size_divisible_by=make_vocab_size_divisible_by, pp_first_layers=pp_first_layers,
                     pp_last_layers=pp_last_layers, merge_lora=merge_lora, overwrite=overwrite, iteration=iteration,
                     resume=resume, info=rep.info, source_layout="hf")
    if dry_run:
        show_dry_run(rep, conv, dst, "hf-to-megatron")
        return
    result = _run(conv, _factory(rep))[0]
    _report(rep, "hf-to-megatron", result, [("train with", result.plan.training_flags())])


@click.command("megatron-to-hf")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--assets-dir", required=True, type=click.Path(path_type=Path),
              help="The original Hugging Face folder: config, tokenizer and processor files are copied byte for "
                   "byte from it (config.json rewritten only where it must describe the weights written: no "
                   "quantization_config, their dtype).")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest safetensors file: 5GB is 5*10^9 bytes (as transformers), 5GiB 5*2^30.")
@click.option("--dtype", type=DTYPE, default=None,
              help="Cast weights: keep (default: the stored dtype), config (config.json's), bf16, fp16, fp32.")
@merge_lora_option
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (only once the new one is complete).")
@click.option("--resume", is_flag=True,
              help="Finish the staged output of an interrupted run of the same command, keeping its verified files.")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, bytes, notes) and write nothing.")
@output_options(verbose=VERBOSE_ASSETS, quiet="the output folder's path")
@handle_errors
def megatron_to_hf_command(src: Path, dst: Path, assets_dir: Path, max_shard_size: str, dtype: str | None,
                           merge_lora: str | None, overwrite: bool, resume: bool, dry_run: bool, as_json: bool,
                           quiet: bool) -> None:
    """Convert Megatron-Core legacy rank files SRC back to a Hugging Face folder DST.

    TP/PP/EP/ETP, spec, expert style and vocabulary padding are detected from the folders and tensors
    (mp_rank_XX_YYY is read as EP when that folder holds the word embeddings, else as PP). Experts are
    written in the released orientation ([E, H, 2I] / [E, I, H]).
    """
    from vlconvert.engine import Converter
    from vlconvert.megatron_convert import _run

    check_spelling_reads("megatron-to-hf", src, dst, assets_dir)
    rep = Reporter(as_json, quiet)
    # the Converter vlconvert.megatron_convert.megatron_to_hf builds, plus --merge-lora
    conv = Converter(src, dst, to="hf", assets_dir=assets_dir, max_shard_size=max_shard_size,
                     dtype=_dtype(dtype) or "keep", experts_layout="released", merge_lora=merge_lora,
                     overwrite=overwrite, resume=resume, info=rep.info, source_layout="megatron")
    if dry_run:
        show_dry_run(rep, conv, dst, "megatron-to-hf")
        return
    result = _run(conv, _factory(rep))[0]
    if dtype and dtype != "keep":
        result.notes.append(f"cast to {dtype}")
    for rel in result.extra.get("assets") or []:
        rep.detail(f"copied {rel}")
    _report(rep, "megatron-to-hf", result)


@click.command("reshard")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@_parallel_options
@click.option("--spec", type=click.Choice(["te", "local"]), default=None, help="Output spec (default: the source's).")
@click.option("--experts", "experts", type=click.Choice(["grouped", "sequential"]), default=None,
              help="Output expert style (default: the source's).")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help="HF config.json or folder, for checkpoints vlconvert did not write.")
@output_options(quiet="the output folder's path")
@handle_errors
def reshard_command(src: Path, dst: Path, tp: int, pp: int, ep: int, etp: int | None, pp_first_layers: int | None,
                    pp_last_layers: int | None, make_vocab_size_divisible_by: int, padded_vocab_size: int | None,
                    iteration: int | None, dtype: str | None, merge_lora: str | None, overwrite: bool, resume: bool,
                    dry_run: bool, spec: str | None, experts: str | None, config: Path | None, as_json: bool,
                    quiet: bool) -> None:
    """Change the TP/PP/EP sizes of Megatron checkpoint SRC into DST, without a detour through HF.

    The result is byte-identical to converting the original HF folder to the new sizes directly.
    """
    from vlconvert.engine import Converter
    from vlconvert.megatron_convert import _run

    check_spelling_reads("reshard", src, dst)
    rep = Reporter(as_json, quiet)
    # the Converter vlconvert.megatron_convert.reshard builds, plus --merge-lora
    conv = Converter(src, dst, to="megatron", tp=tp, pp=pp, ep=ep, etp=etp, spec=spec, experts=experts,
                     dtype=_dtype(dtype) or "keep", padded_vocab_size=padded_vocab_size,
                     make_vocab_size_divisible_by=make_vocab_size_divisible_by, pp_first_layers=pp_first_layers,
                     pp_last_layers=pp_last_layers, config=config, merge_lora=merge_lora, overwrite=overwrite,
                     iteration=iteration, resume=resume, info=rep.info, source_layout="megatron")
    if dry_run:
        show_dry_run(rep, conv, dst, "reshard")
        return
    result = _run(conv, _factory(rep))[0]
    _report(rep, "reshard", result, [("train with", result.plan.training_flags())])
