"""``vlconvert doctor``: check the environment for known traps and say what to do."""

from __future__ import annotations

import sys

import click
from rich.table import Table

from vlconvert.commands.common import refuse_inapplicable
from vlconvert.console import Reporter, handle_errors, output_options, stdout
from vlconvert.doctor import findings_dict, findings_ok, run_doctor
from vlconvert.planning import TARGETS

_STYLE = {"ok": "[green]ok[/]", "info": "info", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}


@click.command("doctor")
@click.option("--target", type=click.Path(), default=None,
              help="Planned output folder: check its free space (needs --config).")
@click.option("--config", type=click.Path(exists=True, dir_okay=True), default=None,
              help="config.json of the model to convert (free space, expert dims).")
@click.option("--to", "to", type=click.Choice(TARGETS), default="hf", show_default=True,
              help="Target layout for the free-space check.")
@click.option("--tp", type=int, default=1, show_default=True)
@click.option("--pp", type=int, default=1, show_default=True)
@click.option("--ep", type=int, default=1, show_default=True)
@output_options
@handle_errors
def doctor_command(target, config, to, tp, pp, ep, as_json, quiet) -> None:
    """Check torch (2.9.x cuDNN Conv3d regression vs Qwen3-VL's patch embedding), the installed
    transformers' MoE expert orientation, the torch build, and free disk for a planned output.
    Exits 1 when a blocking trap is found."""
    ctx = click.get_current_context()
    if target is None:
        from click.core import ParameterSource

        from vlconvert.errors import UsageError

        given = [f"--{n}" for n in ("to", "tp", "pp", "ep")
                 if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
        if given:
            verb = "shapes" if len(given) == 1 else "shape"
            raise UsageError(f"{' and '.join(given)} {verb} the free-space check of --target: give --target OUT "
                             "and --config CONFIG.json too, or drop them")
    refuse_inapplicable(to, {"tp": ("megatron", "torch_dist"), "pp": ("megatron", "torch_dist"),
                             "ep": ("megatron", "torch_dist")})
    reporter = Reporter(as_json, quiet)
    options = {"tp": tp, "pp": pp, "ep": ep} if to in ("megatron", "torch_dist") else {}
    findings = run_doctor(target=target, config=config, to=to, **options)
    if as_json:
        reporter.summary("doctor", findings_dict(findings))
    elif reporter.show:
        table = Table("check", "", "finding", "what to do", title="vlconvert doctor", title_justify="left")
        for f in findings:
            table.add_row(f.name, _STYLE.get(f.status, f.status), f.message, f.fix)
        stdout.print(table)
    if not findings_ok(findings):
        sys.exit(1)
