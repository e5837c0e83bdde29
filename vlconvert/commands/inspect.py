"""``vlconvert inspect PATH``: describe a checkpoint folder from its metadata alone."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from vlconvert.console import Reporter, handle_errors, human_bytes, output_options, plural, stdout
from vlconvert.inspection import inspect_checkpoint


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="config.json for folders without one (DCP, Megatron).")
@click.option("--assets-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Original HF folder: its config.json and tokenizer are used when PATH has none.")
@click.option("--rows", is_flag=True,
              help="Also read the embedding matrices: think-tag rows' norm against the median trained row.")
@output_options(progress=False)
@handle_errors
def inspect_command(path, config, assets_dir, rows, as_json, quiet) -> None:
    """Describe PATH (HF, DCP or Megatron): model family and size, parallel sizes, dtypes, parameter
    counts (total; active per token for MoE), tied embeddings, expert orientation, think tags, and
    anything inconsistent with the config. Reads metadata only (unless --rows); exits 1 on an
    inconsistency."""
    reporter = Reporter(as_json, quiet)
    report = inspect_checkpoint(path, config=config, assets_dir=assets_dir, rows=rows)
    if as_json:
        reporter.summary("inspect", report, ok=not report["inconsistencies"])
    elif reporter.show:
        render_report(report)
    if report["inconsistencies"]:
        raise SystemExit(1)


def _text(value: object, missing: str = "unknown") -> str:
    """A report value for people: never a raw ``None``."""
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render_report(report: dict) -> None:
    """Print an inspect report for people."""
    table = Table(title=f"{report['path']}", show_header=False, title_justify="left")
    params = report["parameters"]

    def add_row(key: str, value: str | Text) -> None:
        table.add_row(key, value if isinstance(value, Text) else Text(value))  # paths and '[out, in]' are not markup

    add_row("layout", _text(report["layout"]) + (f" (as {report['saved_by']} saves it)" if report.get("saved_by")
                                                 else ""))
    add_row("model", f"{report['model'] or 'unreleased size'} ({_text(report['family'])})")
    add_row("config", _text(report["config"], "none found (give --config or --assets-dir)"))
    if report.get("parallel"):
        add_row("parallel", ", ".join(f"{k} {_text(v)}" for k, v in report["parallel"].items()))
    files = report.get("files")
    where = plural(files, "file") if isinstance(files, int) else "? files"
    add_row("tensors", f"{plural(report['tensors'], 'tensor')} in {where}, "
                  f"{report['bytes']:,} bytes ({human_bytes(report['bytes'])})")
    add_row("dtypes", ", ".join(f"{k} {human_bytes(v)}" for k, v in report["dtypes"].items()) or "none")
    if isinstance(params.get("total"), int):
        text = f"{params['total']:,} total ({params.get('text') or 0:,} text, {params.get('vision') or 0:,} vision)"
        if params.get("active_per_token") is not None:
            text += f"; {params['active_per_token']:,} active per token"
        add_row("parameters", text)
    tied = report["tied_embeddings"]
    add_row("embeddings", f"config tied: {_text(tied.get('config'), 'unknown (no config)')}, "
                                f"lm_head stored: {_text(tied.get('lm_head_stored'))}")
    if report.get("experts_orientation") or report.get("experts_orientation_stored"):
        add_row("experts", str(report.get("experts_orientation") or report.get("experts_orientation_stored")))
    tags = report["think_tags"]
    if "verdict" in tags:
        add_row("think tags", _text(tags["verdict"]))
    elif tags.get("tokenizer") is None:
        add_row("think tags", "no tokenizer.json (give --assets-dir to check the tags)")
    else:
        add_row("think tags", ", ".join(f"{k}: {_text(v, 'none')}" for k, v in tags.items()))
    for issue in report["inconsistencies"] or ["none"]:
        add_row("inconsistency", Text(issue, style="red") if issue != "none" else "none")
    stdout.print(table)
