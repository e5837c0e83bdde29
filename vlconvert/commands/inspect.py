"""``vlconvert inspect PATH``: describe a checkpoint folder from its metadata alone."""

from __future__ import annotations

import click
from rich.table import Table

from vlconvert.console import Reporter, handle_errors, human_bytes, output_options, stdout
from vlconvert.inspection import inspect_checkpoint


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="config.json for folders without one (DCP, Megatron).")
@click.option("--assets-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Original HF folder: its config.json and tokenizer are used when PATH has none.")
@click.option("--rows", is_flag=True,
              help="Also read the embedding matrices: think-tag rows' norm against the median trained row.")
@output_options
@handle_errors
def inspect_command(path, config, assets_dir, rows, as_json, quiet) -> None:
    """Describe PATH (HF, DCP or Megatron): model family and size, parallel sizes, dtypes, parameter
    counts (total; active per token for MoE), tied embeddings, expert orientation, think tags, and
    anything inconsistent with the config. Reads metadata only (unless --rows); exits 1 on an
    inconsistency."""
    reporter = Reporter(as_json, quiet)
    report = inspect_checkpoint(path, config=config, assets_dir=assets_dir, rows=rows)
    if as_json:
        reporter.summary("inspect", report)
    elif reporter.show:
        render_report(report)
    if report["inconsistencies"]:
        raise SystemExit(1)


def render_report(report: dict) -> None:
    """Print an inspect report for people."""
    table = Table(title=f"{report['path']}", show_header=False, title_justify="left")
    params = report["parameters"]
    table.add_row("layout", report["layout"])
    table.add_row("model", f"{report['model'] or 'unreleased size'} ({report['family']})")
    table.add_row("config", str(report["config"]))
    if report.get("parallel"):
        table.add_row("parallel", ", ".join(f"{k} {v}" for k, v in report["parallel"].items()))
    table.add_row("tensors", f"{report['tensors']} in {report.get('files', '?')} files, "
                  f"{report['bytes']:,} bytes ({human_bytes(report['bytes'])})")
    table.add_row("dtypes", ", ".join(f"{k} {human_bytes(v)}" for k, v in report["dtypes"].items()))
    text = f"{params['total']:,} total ({params['text']:,} text, {params['vision']:,} vision)"
    if "active_per_token" in params:
        text += f"; {params['active_per_token']:,} active per token"
    table.add_row("parameters", text)
    tied = report["tied_embeddings"]
    table.add_row("embeddings", f"config tied: {tied['config']}, lm_head stored: {tied['lm_head_stored']}")
    if report.get("experts_orientation") or report.get("experts_orientation_stored"):
        table.add_row("experts", str(report.get("experts_orientation") or report.get("experts_orientation_stored")))
    tags = report["think_tags"]
    if "verdict" in tags:
        table.add_row("think tags", str(tags["verdict"]))
    else:
        table.add_row("think tags", ", ".join(f"{k}: {v}" for k, v in tags.items()))
    for issue in report["inconsistencies"] or ["none"]:
        table.add_row("inconsistency", f"[red]{issue}[/]" if issue != "none" else "none")
    stdout.print(table)
