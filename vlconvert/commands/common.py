"""What every converter shares: options defined once (``--merge-lora``), ``--dry-run`` (the plan, nothing
written) and the summary rows."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from vlconvert.console import Reporter, disk_bytes, human_bytes, plural, stdout
from vlconvert.publish import empty_folder

# The same option, help text included, on `convert` and on every older spelling; passed as
# Converter(..., merge_lora=ADAPTER).
merge_lora_option = click.option(
    "--merge-lora", "merge_lora", default=None, metavar="ADAPTER",
    help="Merge this PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) into the weights, "
         "as PEFT's merge_and_unload does.")


def show_dry_run(rep: Reporter, conv: Any, dst: str | Path, command: str) -> None:
    """Print what ``conv`` (a :class:`vlconvert.engine.Converter`) would write to ``dst``; write nothing.

    With --json the plan is one JSON object (``dry_run: true``); for people, a table of files, the notes
    and one line of totals.
    """
    plan = conv.plan()
    data = plan.to_dict()
    data["dry_run"] = True
    data["tensor_files"] = len(plan.files)  # the same key and number as the run's summary
    data["output"] = str(Path(dst).absolute())
    notes = list(plan.notes)
    if os.path.lexists(dst) and not conv.overwrite and not conv.resume and not empty_folder(Path(dst)):
        notes.append(f"'{dst}' exists: the run would refuse it without --overwrite")
    data["notes"] = notes
    if rep.as_json:
        rep.summary(f"{command} --dry-run", data)
        return
    if not rep.show:
        return
    table = Table("file", "tensors", "size", title=f"plan: {plan.source_layout} -> {plan.target} ({dst})",
                  title_justify="left")
    for f in plan.files:
        table.add_row(f.name, str(len(f.tensors)), human_bytes(f.nbytes))
    stdout.print(table)
    for note in notes:
        stdout.print(f"note: {note}", markup=False, highlight=False)
    tensors = sum(len(f.tensors) for f in plan.files)
    stdout.print(f"{plural(len(plan.files), 'file')} of tensors (+ index or metadata, config, manifest), "
                 f"{plural(tensors, 'tensor')}, {human_bytes(plan.tensor_bytes)}; nothing written (drop --dry-run "
                 "to convert)", markup=False, highlight=False)


def asset_rows(assets: list[str], verbose: bool) -> list[tuple[str, str]]:
    """'assets copied' as a count in every summary; the list too with -v."""
    if not assets:
        return []
    rows = [("assets copied", str(len(assets)))]
    if verbose:
        rows.append(("assets", ", ".join(assets)))
    return rows


def written(folder: str | Path) -> int:
    """Bytes on disk of the output folder: what "written" means in every summary."""
    path = Path(folder)
    return disk_bytes(path) if path.is_dir() else 0


def files_text(total: int, tensor_files: int) -> str:
    """The summary's "files" row: every file on disk, and how many hold tensors (the count --dry-run and the
    progress bar give), so the numbers of one run agree: '6 (3 of tensors)'."""
    return f"{total} ({tensor_files} of tensors)"


def file_count(folder: str | Path) -> int:
    """Files on disk in the output folder (every summary's "files")."""
    path = Path(folder)
    return sum(1 for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


MEGATRON_OPTIONS = ("tp", "pp", "ep", "etp", "pp_first_layers", "pp_last_layers", "make_vocab_size_divisible_by",
                    "padded_vocab_size", "spec", "experts", "iteration")


def refuse_inapplicable(to: str, applies: dict[str, tuple[str, ...]]) -> None:
    """Refuse an option given on the command line that does nothing for ``--to TO`` (a usage error, exit 2):
    ``applies`` maps a parameter name to the targets it shapes. Options left at their default are fine."""
    from click.core import ParameterSource

    from vlconvert.errors import UsageError

    ctx = click.get_current_context()
    for param in ctx.command.params:
        targets = applies.get(param.name or "")
        if not targets or to in targets:
            continue
        if ctx.get_parameter_source(param.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            value = ctx.params.get(param.name)
            flag = max(param.opts, key=len)
            shown = flag if isinstance(value, bool) else f"{flag} {value}"
            raise UsageError(f"{shown} applies to --to {' and '.join(targets)} only, not --to {to}: drop it")


LAYOUT_NAMES = {"hf": "a Hugging Face folder", "dcp": "a DCP checkpoint", "megatron": "a Megatron checkpoint",
                "torch_dist": "a Megatron torch_dist checkpoint", "verl": "a verl FSDP checkpoint"}
SPELLINGS = {  # the older spellings: the layouts each reads, and the target it writes
    "hf-to-dcp": (("hf",), "dcp"), "dcp-to-hf": (("dcp",), "hf"), "hf-to-megatron": (("hf",), "megatron"),
    "megatron-to-hf": (("megatron", "torch_dist"), "hf"), "reshard": (("megatron", "torch_dist"), "megatron")}


def check_spelling_reads(command: str, src: str | Path, dst: str | Path,
                         assets_dir: str | Path | None = None) -> None:
    """Refuse, in one line, a source of another layout than the older spelling ``command`` reads: say what the
    folder is and the command that converts it to the same target (the older spelling for that pair, else
    ``convert --to``, which reads any layout). A folder of no known layout is left to the reader's message."""
    from vlconvert.errors import UserError
    from vlconvert.sources import detect_layout

    folder = Path(src).expanduser()
    if not folder.is_dir():
        return  # a model id in the local HF cache, or a path the reader reports
    reads, to = SPELLINGS[command]
    found = detect_layout(folder)
    if found in reads or found not in LAYOUT_NAMES:
        return
    other = next((name for name, (r, t) in SPELLINGS.items() if found in r and t == to), None)
    words = ["vlconvert", other, str(src), str(dst)] if other else \
        ["vlconvert", "convert", str(src), str(dst), "--to", to]
    if to == "hf" and assets_dir is not None:
        words += ["--assets-dir", str(assets_dir)]
    raise UserError(f"'{src}' is {LAYOUT_NAMES[found]}, not {LAYOUT_NAMES[reads[0]]} (what {command} reads): "
                    f"use '{shlex.join(words)}'")
