"""``vlconvert doctor``: check the environment for known traps and say what to do."""

from __future__ import annotations

import sys
import textwrap

import click
from rich.text import Text

from vlconvert.commands.common import refuse_inapplicable
from vlconvert.console import Reporter, handle_errors, output_options, plural, stdout
from vlconvert.doctor import Finding, findings_dict, findings_ok, run_doctor
from vlconvert.planning import TARGETS

_STYLE = {"ok": "green", "info": "", "warn": "yellow", "fail": "bold red"}
_ORDER = ("ok", "info", "warn", "fail")


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
@output_options(progress=False)
@handle_errors
def doctor_command(target, config, to, tp, pp, ep, as_json, quiet) -> None:
    """Check torch (2.9.x cuDNN Conv3d regression vs Qwen3-VL's patch embedding), the installed
    transformers' MoE expert orientation, the torch build, and free disk for a planned output.
    One entry per check, then a summary line; exits 1 when a blocking trap (FAIL) is found."""
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
        reporter.summary("doctor", {**findings_dict(findings), "counts": _counts(findings),
                                    "summary": summary_line(findings)})
    elif reporter.show:
        for line in report_lines(findings, stdout.prose_width()):
            stdout.print(line)
    if not findings_ok(findings):
        sys.exit(1)


def _counts(findings: list[Finding]) -> dict[str, int]:
    counts = {status: sum(f.status == status for f in findings) for status in _ORDER}
    return {status: n for status, n in counts.items() if n}


def summary_line(findings: list[Finding]) -> str:
    """The last line: how many checks, how they came out, and whether anything blocks a conversion."""
    counts = ", ".join(f"{n} {'FAIL' if status == 'fail' else status}" for status, n in _counts(findings).items())
    verdict = ("nothing blocks a conversion" if findings_ok(findings)
               else "a FAIL blocks conversions here: see its fix above")
    return f"{plural(len(findings), 'check')}: {counts}; {verdict}"


def report_lines(findings: list[Finding], width: int) -> list[Text]:
    """One entry per check, wrapped at ``width`` (the terminal's, or 100 columns in a log): the status and the
    check's name, the finding indented under the name, then the fix; the summary line last. Long words (a URL)
    are never split."""
    name_width = max(len(f.name) for f in findings)
    indent = " " * (5 + name_width + 2)
    lines = [Text("vlconvert doctor", style="bold")]
    for f in findings:
        head = f"{'FAIL' if f.status == 'fail' else f.status:<4} {f.name:<{name_width}}  "
        body = textwrap.wrap(f.message, max(20, width - len(indent)), break_long_words=False,
                             break_on_hyphens=False) or [""]
        lines.append(Text.assemble((head[:5], _STYLE.get(f.status, "")), head[5:], body[0]))
        lines += [Text(indent + rest) for rest in body[1:]]
        if f.applies_to:
            lines += [Text(line) for line in textwrap.wrap(f"applies to: {', '.join(f.applies_to)}", width,
                                                           initial_indent=indent, subsequent_indent=indent,
                                                           break_long_words=False, break_on_hyphens=False)]
        if f.fix:
            lines += [Text(line) for line in textwrap.wrap(f"fix: {f.fix}", width, initial_indent=indent,
                                                           subsequent_indent=indent + "     ",
                                                           break_long_words=False, break_on_hyphens=False)]
    lines.append(Text(summary_line(findings), style="" if findings_ok(findings) else "bold red"))
    return lines
