"""``vlconvert verify A B``: compare two checkpoints tensor by tensor, in any two layouts."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click
from rich.table import Table
from rich.text import Text

from vlconvert.console import Reporter, handle_errors, output_options, stdout
from vlconvert.errors import UsageError

if TYPE_CHECKING:
    from vlconvert.comparison import TensorResult, VerifyReport


@click.command("verify")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path(), required=False)
@click.option("--manifest", "manifest", is_flag=True,
              help="Check folder A against its vlconvert-manifest.json (every file's size and sha256) instead.")
@click.option("--tolerance", type=float, default=0.0, show_default=True,
              help="Max abs difference accepted (for dtype-changing conversions); 0 = bit-exact.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="config.json for sides without one (default: the other side's).")
@click.option("--assets-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Original HF folder whose config.json is used for sides without one.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor, not only the differing ones.")
@output_options(verbose="List every tensor, not only the differing ones (as --all).")
@handle_errors
def verify_command(a, b, manifest, tolerance, config, assets_dir, show_all, as_json, quiet) -> None:
    """Compare checkpoints A and B (HF, DCP, Megatron at any TP/PP/EP) tensor by tensor in canonical HF
    naming, one tensor pair in memory at a time. Exits 1 on any mismatch, missing or extra tensor.

    With --manifest, check the single folder A against the manifest vlconvert wrote into it.
    """
    reporter = Reporter(as_json, quiet)
    if manifest:
        if b is not None:
            raise UsageError("--manifest checks one folder: give only A")
        from click.core import ParameterSource

        ctx = click.get_current_context()
        given = [max(p.opts, key=len) for p in ctx.command.params
                 if p.name in ("tolerance", "config", "assets_dir", "show_all")
                 and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
        if given:
            raise UsageError(f"{' and '.join(given)} apply to comparing two checkpoints, not to --manifest: drop "
                             f"{'it' if len(given) == 1 else 'them'}")
        check_folder_manifest(a, reporter)
        return
    if b is None:
        raise UsageError("give two checkpoints A B to compare, or one folder with --manifest")
    from vlconvert.comparison import VerifyReport, open_pair, source_bytes, verify_sources  # imports torch

    src_a, src_b = open_pair(a, b, config, assets_dir)
    report = VerifyReport(str(a), str(b), src_a.layout, src_b.layout, tolerance)
    reporter.info(f"comparing {a} ({src_a.layout}) with {b} ({src_b.layout})")
    with reporter.bytes_progress("verify", source_bytes(src_a)) as advance:
        report.tensors = verify_sources(src_a, src_b, tolerance, lambda r, n: advance(n))
    for src in (src_a, src_b):
        close = getattr(src, "close", None)
        if close:
            close()
    if as_json:
        reporter.summary("verify", report.to_dict())
    elif reporter.show:
        render_report(report, show_all or reporter.verbose)
    if not report.ok:
        sys.exit(1)


def check_folder_manifest(folder: str, reporter: Reporter) -> None:
    """``verify --manifest``: sizes and sha256 of every file against the manifest; exit 1 on any problem."""
    from vlconvert.locate import resolve_source
    from vlconvert.publish import check_manifest, read_manifest

    files = read_manifest(resolve_source(folder))  # a missing folder: no such folder (did you mean...)
    with reporter.bytes_progress("verify --manifest", sum(e["size"] for e in files.values())) as advance:
        problems = check_manifest(folder, advance)
    data = {"folder": str(folder), "files": len(files), "ok": not problems,
            "problems": [{"file": f, "problem": p} for f, p in problems]}
    if reporter.as_json:
        reporter.summary("verify --manifest", data)
    elif reporter.show:
        for rel, problem in problems:
            stdout.print(f"{rel}: {problem}", markup=False, highlight=False, soft_wrap=True)
        verdict = "matches its manifest" if not problems else f"DIFFERS from its manifest ({len(problems)} files)"
        stdout.print(f"{folder}: {verdict} — {len(files)} files checked", markup=False, highlight=False,
                     soft_wrap=True)
    if problems:
        sys.exit(1)


STATUS_TEXT = {"equal": "equal", "within_tolerance": "within tolerance", "mismatch": "mismatch",
               "shape_mismatch": "shape mismatch", "missing_in_a": "missing in A", "missing_in_b": "missing in B"}


def status_text(status: str) -> str:
    """A tensor's status for people ('missing in B'); ``--json`` keeps the keys (``missing_in_b``)."""
    return STATUS_TEXT.get(status, status.replace("_", " "))


def _shape(shape: list[int] | None) -> str:
    return "-" if shape is None else str(shape)


def _row(t: TensorResult) -> tuple[str, Text, str, str]:
    diff = "-" if t.max_abs_diff is None else f"{t.max_abs_diff:.3g}"
    if t.shape_a is None or t.shape_b is None:  # missing on one side: the shape of the other
        shapes = _shape(t.shape_a or t.shape_b)
    else:
        shapes = _shape(t.shape_a) if t.shape_a == t.shape_b else f"{_shape(t.shape_a)} vs {_shape(t.shape_b)}"
    status = Text(status_text(t.status), style="" if t.ok else "red")
    return t.name, status, diff, shapes


def render_report(report: VerifyReport, show_all: bool = False) -> None:
    """Print a verify report: differing tensors (or all), then the totals."""
    rows = report.tensors if show_all else [t for t in report.tensors if t.status != "equal"]
    if rows:
        table = Table("tensor", "status", "max abs diff", "shape", title="tensors", title_justify="left")
        for t in rows:
            table.add_row(*_row(t))
        stdout.print(table)
    counts = report.counts()
    summary = ", ".join(f"{v} {status_text(k)}" for k, v in sorted(counts.items()))
    verdict = "[green]identical[/]" if report.ok and set(counts) <= {"equal"} else \
        ("[green]within tolerance[/]" if report.ok else "[bold red]DIFFERENT[/]")
    stdout.print(f"{report.a} ({report.layout_a}) vs {report.b} ({report.layout_b}): {verdict} — "
                 f"{len(report.tensors)} tensors: {summary}")
