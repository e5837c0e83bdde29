"""``vlconvert plan``: show what a conversion would write, and check it, before touching a byte."""

from __future__ import annotations

import sys

import click
from rich.table import Table
from rich.text import Text

from vlconvert.commands.common import MEGATRON_OPTIONS, refuse_inapplicable
from vlconvert.console import DtypeParam, Reporter, handle_errors, human_bytes, output_options, plural, stdout
from vlconvert.layouts.consumers import CONSUMERS, DEFAULT_CONSUMER
from vlconvert.planning import DEFAULT_VOCAB_DIVISOR, TARGETS, Plan, RankPlan, plan_conversion

_MAX_ROWS = 40


@click.command("plan")
@click.option("--config", "config", type=click.Path(dir_okay=True), default=None,
              help="config.json of the model (default: the one in --source).")
@click.option("--to", "to", type=click.Choice(TARGETS), required=True, help="Target layout.")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor parallel size (megatron).")
@click.option("--pp", type=int, default=1, show_default=True, help="Pipeline parallel size (megatron).")
@click.option("--ep", type=int, default=1, show_default=True, help="Expert parallel size (megatron, MoE).")
@click.option("--etp", type=int, default=None, help="Expert tensor parallel size (default: --tp, as Megatron-LM).")
@click.option("--pp-first-layers", type=int, default=None, help="Decoder layers on the first pipeline stage.")
@click.option("--pp-last-layers", type=int, default=None, help="Decoder layers on the last pipeline stage.")
@click.option("--make-vocab-size-divisible-by", type=int, default=DEFAULT_VOCAB_DIVISOR, show_default=True,
              help="Megatron vocab padding: rows become a multiple of this times TP.")
@click.option("--padded-vocab-size", type=int, default=None, help="Explicit padded vocab rows (megatron).")
@click.option("--dtype", type=DtypeParam("config", "keep"), default=None,
              help="Output dtype: config (default: config.json's), keep (= config), bf16, fp16, fp32.")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="HF shard size: 5GB is 5*10^9 bytes (as transformers), 5GiB 5*2^30.")
@click.option("--experts-layout", type=click.Choice(["released", "transformers5"]), default=None,
              help="DCP expert orientation (default: the installed transformers' run-time one).")
@click.option("--source", type=click.Path(), default=None,
              help="Check this source checkpoint's keys and shapes against the config (metadata only).")
@click.option("--target", type=click.Path(), default=None,
              help="Output folder: check its free space and measure its write speed (64 MiB probe).")
@click.option("--disk-speed", type=float, default=None, help="Write speed in MiB/s instead of measuring one.")
@click.option("--for", "consumer", type=click.Choice(list(CONSUMERS)), default=None,
              help=f"--to torch_dist: the framework that will load it (default: {DEFAULT_CONSUMER}).")
@click.option("--all", "show_all", is_flag=True, help="List every file / rank, not a summary.")
@output_options(verbose="List every file and rank (as --all).", progress=False)
@handle_errors
def plan_command(config, to, tp, pp, ep, etp, pp_first_layers, pp_last_layers, make_vocab_size_divisible_by,
                 padded_vocab_size, dtype, max_shard_size, experts_layout, source, target, disk_speed, consumer,
                 show_all, as_json, quiet) -> None:
    """Show what a conversion to TO would write (files or ranks, bytes, experts per EP rank, vocab
    padding, time at the target's disk speed) and run every check, from the config alone.

    Exits 1 when a check fails (e.g. experts not divisible by EP, KV groups vs TP, an uneven pipeline
    split without --pp-first-layers/--pp-last-layers: the proposed counts are printed)."""
    megatron = ("megatron", "torch_dist")
    refuse_inapplicable(to, {**{k: megatron for k in MEGATRON_OPTIONS}, "max_shard_size": ("hf",),
                             "experts_layout": ("hf", "dcp"), "consumer": ("torch_dist",)})
    reporter = Reporter(as_json, quiet)
    plan = plan_conversion(config, to, tp=tp, pp=pp, ep=ep, etp=etp, pp_first_layers=pp_first_layers,
                           pp_last_layers=pp_last_layers, source=source, target=target, disk_speed=disk_speed,
                           dtype=dtype, max_shard_size=max_shard_size, experts_layout=experts_layout,
                           make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                           padded_vocab_size=padded_vocab_size, consumer=consumer)
    if as_json:
        reporter.summary("plan", plan.to_dict())
    elif reporter.show:
        render_plan(plan, show_all or reporter.verbose)
    if not plan.ok:
        sys.exit(1)


def render_plan(plan: Plan, show_all: bool = False) -> None:
    """Print a plan for people: summary, files or ranks, checks."""
    head = Table(title=f"plan: {plan.model or plan.family} -> {plan.to}", show_header=False, title_justify="left")
    head.add_row("model", f"{plan.model or 'unreleased size'} ({plan.family}), {plan.tensor_count} tensors, "
                 f"{plan.dtype}")
    head.add_row("config bytes", f"{plan.config_bytes:,} ({human_bytes(plan.config_bytes)})")
    head.add_row("bytes written", f"{plan.total_bytes:,} ({human_bytes(plan.total_bytes)})")
    if plan.parallel:
        p = plan.parallel
        head.add_row("parallel", f"tp {p['tp']} pp {p['pp']} ep {p['ep']} etp {p['etp']}: "
                     f"{p['rank_folders']} rank folders, at least {p['min_gpus']} GPUs")
        if p.get("training_flags"):
            head.add_row("train with", p["training_flags"])
    if plan.experts.get("experts"):
        e = plan.experts
        head.add_row("experts", f"{e['experts']} per layer, {e['per_ep_rank']} per EP rank")
    if plan.vocab:
        v = plan.vocab
        head.add_row("vocab", f"{v['rows']} rows -> {v['padded_rows']} padded (+{v['pad_rows']} rows, "
                     f"{human_bytes(v['pad_bytes'])})")
    if plan.pipeline:
        pl = plan.pipeline
        head.add_row("pipeline", f"layers per stage {pl['stage_layers']} ({pl['source']}); stage bytes "
                     + ", ".join(human_bytes(b) for b in pl["stage_bytes"]))
        if "proposal" in pl and pl["proposal"]["stage_layers"] != pl["stage_layers"]:
            pr = pl["proposal"]
            head.add_row("balanced", f"--pp-first-layers {pr['pp_first_layers']} --pp-last-layers "
                         f"{pr['pp_last_layers']}: {pr['stage_layers']}, largest stage "
                         f"{human_bytes(max(pr['stage_bytes']))}")
    if plan.source:
        s = plan.source
        if "path" in s:
            head.add_row("source", f"{s['path']} ({s['layout']}): {s['tensors']} tensors, {human_bytes(s['bytes'])}")
    if plan.disk:
        d = plan.disk
        if "free_bytes" in d:
            head.add_row("target", f"{d['target']}: {human_bytes(d['free_bytes'])} free")
        if "speed_mib_s" in d:
            head.add_row("time", f"~{_duration(d['estimated_seconds'])}: start-up {d['startup_seconds']:.1f} s, then "
                         f"the disk at {d['speed_mib_s']:.0f} MiB/s ({d['speed_source']}) or the sha256 at "
                         f"{d['checksum_mib_s']:.0f} MiB/s, whichever is slower")
    else:
        head.add_row("time", "give --target DIR (measured) or --disk-speed MiB/s for an estimate")
    for note in plan.notes:
        head.add_row("note", Text(note))
    stdout.print(head)

    if plan.files:
        table = Table("file", "bytes", "tensors", title="files", title_justify="left")
        rows = plan.files if show_all or len(plan.files) <= _MAX_ROWS else plan.files[:20] + plan.files[-5:]
        for i, f in enumerate(rows):
            if not show_all and len(plan.files) > _MAX_ROWS and i == 20:
                table.add_row(f"... {len(plan.files) - 25} more (--all)", "", "")
            table.add_row(f.name, f"{f.bytes:,}", str(f.tensors))
        stdout.print(table)
    if plan.ranks:
        stdout.print(_ranks_table(plan.ranks, show_all))
    if plan.checks:  # --to hf|dcp from a config alone has none: no empty table
        checks = Table("check", "", "detail", title="checks", title_justify="left")
        for c in plan.checks:
            mark = "[green]ok[/]" if c.ok else ("[red]FAIL[/]" if c.blocking else "[yellow]warn[/]")
            checks.add_row(Text(c.name), mark, Text(c.message))
        stdout.print(checks)
    if not plan.ok:
        stdout.print(f"[bold red]{plural(len(plan.failed), 'check')} failed[/]: the conversion would refuse this plan")


def _ranks_table(ranks: list[RankPlan], show_all: bool) -> Table:
    table = Table("rank folder(s)", "bytes each", "tensors", "layers", "experts", title="ranks", title_justify="left")
    if show_all:
        for r in ranks:
            table.add_row(r.folder, f"{r.bytes:,}", str(r.tensors), _span(r.layers), _span(r.experts))
        return table
    groups: dict[tuple, list[RankPlan]] = {}
    for r in ranks:
        groups.setdefault((r.pp, r.bytes, r.tensors, tuple(r.layers)), []).append(r)
    for (pp, nbytes, tensors, layers), members in groups.items():
        tps = sorted({r.tp for r in members})
        eps = sorted({r.ep for r in members})
        experts = f"{len(members[0].experts) and members[0].experts[1] - members[0].experts[0] + 1} per folder" \
            if members[0].experts else "-"
        table.add_row(f"pp {pp}, tp {_span([tps[0], tps[-1]])}, ep {_span([eps[0], eps[-1]])} "
                      f"({plural(len(members), 'folder')})", f"{nbytes:,} ({human_bytes(nbytes)})", str(tensors),
                      _span(list(layers)), experts)
    return table


def _span(values: list[int]) -> str:
    if not values:
        return "-"
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
