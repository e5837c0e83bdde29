"""The ``vlconvert`` command: a click group whose subcommands live in ``vlconvert/commands/``.

Commands are imported lazily so ``vlconvert --help`` stays fast and one area's import cost (megatron,
tokenizers) is paid only when used.
"""

from __future__ import annotations

import difflib
import errno
import importlib
import os
import re
import sys
from typing import Any

import click

from vlconvert import __version__

# command name -> "module:function" under vlconvert.commands
COMMANDS: dict[str, str] = {
    "convert": "convert:convert_command",
    "hf-to-dcp": "dcp:hf_to_dcp_command",
    "dcp-to-hf": "dcp:dcp_to_hf_command",
    "hf-to-megatron": "megatron:hf_to_megatron_command",
    "megatron-to-hf": "megatron:megatron_to_hf_command",
    "reshard": "megatron:reshard_command",
    "retag-think": "retag:retag_think_command",
    "plan": "plan:plan_command",
    "inspect": "inspect:inspect_command",
    "verify": "verify:verify_command",
    "doctor": "doctor:doctor_command",
}

_SUMMARIES = {
    "convert": "Any layout to any layout (HF, DCP, Megatron) in one pass.",
    "hf-to-dcp": "= convert --to dcp from a Hugging Face checkpoint.",
    "dcp-to-hf": "= convert --to hf from a DCP (vlconvert or FSDP2 training); --dtype config.",
    "hf-to-megatron": "= convert --to megatron from a Hugging Face checkpoint.",
    "megatron-to-hf": "= convert --to hf from Megatron-Core legacy rank files.",
    "reshard": "= convert --to megatron from a Megatron checkpoint (new TP/PP/EP sizes).",
    "retag-think": "Rename untrained <think> specials to plain-word tags, consistently.",
    "plan": "Show what a conversion would write, and check it, before touching a byte.",
    "inspect": "Describe a checkpoint folder (layout, model, parallel sizes, dtypes, tokenizer).",
    "verify": "Compare two checkpoints tensor by tensor, in any two layouts.",
    "doctor": "Check the environment for known traps.",
    "help": "Show a command's help: vlconvert help CMD = vlconvert CMD --help.",
    "version": "Show the versions of vlconvert, python, torch, transformers... (= --version).",
}
HABITS = ("help", "version")  # git's and hf's spellings, beside the real commands


def version_dict() -> dict[str, str | None]:
    """The versions a bug report needs, read from package metadata only (importing transformers' model code
    takes seconds); None for a package that is not installed."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"vlconvert": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "safetensors", "huggingface_hub"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def versions() -> str:
    """'vlconvert 0.2.0 (python 3.11.9, torch 2.8.0, transformers 4.57.1, ...)'."""
    found = version_dict()
    parts = [f"{name} {v if v is not None else 'not installed'}" for name, v in found.items() if name != "vlconvert"]
    return f"vlconvert {found['vlconvert']} ({', '.join(parts)})"


def short_usage() -> str:
    """What bare ``vlconvert`` prints: the usage, the command names, and where to read more."""
    import textwrap

    names = textwrap.fill(", ".join([*COMMANDS, *HABITS]), width=96, initial_indent="commands: ",
                          subsequent_indent=" " * 10, break_on_hyphens=False)
    return ("usage: vlconvert [-v] [-q] [--json] [--debug] COMMAND [ARGS]...\n"
            f"{names}\n"
            "see 'vlconvert --help' for what each command does, 'vlconvert help COMMAND' for its options")


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(versions())
        ctx.exit(0)


def usage_line(exc: click.UsageError, names: list[str] | None = None) -> str:
    """A click usage error as one line with the fix in it, e.g. ``error: no such option '--tpp' (did you
    mean --tp?); see 'vlconvert hf-to-megatron --help'``."""
    ctx = exc.ctx
    if isinstance(exc, click.NoSuchOption):
        message = f"no such option '{exc.option_name}'"
        scores = {o: difflib.SequenceMatcher(None, exc.option_name, o).ratio() for o in exc.possibilities or []}
        best = max(scores.values(), default=0.0)
        close = sorted((o for o, score in scores.items() if score == best),
                       key=lambda o: (-len(os.path.commonprefix([o, exc.option_name])), o))[:3]
        if close:
            message += f" (did you mean {' or '.join(close)}?)"
    else:
        message = " ".join(exc.format_message().split()).rstrip(".")
        message = message[:1].lower() + message[1:]
        message = re.sub(r"\. Choose from: (.*)$", r" (one of: \1)", message)
        match = re.fullmatch(r"no such command '(.*)'", message)
        if match and names:
            close = difflib.get_close_matches(match.group(1), names, n=2)
            if close:
                message += f" (did you mean {' or '.join(close)}?)"
    where = ctx.command_path if ctx is not None else "vlconvert"
    return f"error: {message}; see '{where} --help'"


def _leave_rank(code: Any) -> None:
    """End a ``torchrun`` rank without interpreter finalization. A gloo worker thread may still be releasing
    the tensors of the last collective, which takes the GIL; during finalization that thread is cancelled
    inside C++ and the rank aborts (SIGABRT, seen about once in 15 runs). Every output file is closed
    and fsynced and the process group destroyed by the time a command returns, so nothing is lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand runs, and reports every
    failure the same way: one line ``error: ...`` on stderr, exit 2 for a usage error (a missing or
    misspelled option, a bad choice, a path that does not exist), 1 for any other error, 130 for Ctrl-C;
    with ``--json``, also ``{"ok": false, "error": ...}`` on stdout."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            self._main(args, prog_name, complete_var, **extra)
        except SystemExit as exc:
            engine = sys.modules.get("vlconvert.engine")
            if engine is not None and engine.ranks_ran:
                _leave_rank(exc.code)
            raise

    def _main(self, args: Any, prog_name: str | None, complete_var: str | None, **extra: Any) -> None:
        from vlconvert.console import fail

        argv = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
        try:
            rv = super().main(argv, prog_name or "vlconvert", complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            command = next((a for a in argv if a in COMMANDS), None)
            fail(usage_line(exc, [*COMMANDS, *HABITS]), exc.exit_code, as_json=as_json, command=command)
        except click.Abort as exc:
            from vlconvert.errors import interrupt_line

            cause = exc.__context__ if isinstance(exc.__context__, KeyboardInterrupt) else KeyboardInterrupt()
            fail(*interrupt_line(cause), as_json=as_json)
        except click.ClickException as exc:
            fail(f"error: {exc.format_message()}", exc.exit_code, as_json=as_json)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            from vlconvert.console import quiet_broken_pipe

            quiet_broken_pipe()
        sys.exit(rv if isinstance(rv, int) else 0)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*COMMANDS, *HABITS]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "help":
            return help_command
        if name == "version":
            return version_command
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(f"vlconvert.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vlconvert.commands.{module_name}":
                raise
            return None
        return getattr(module, attr, None)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _SUMMARIES.get(name, "")) for name in [*COMMANDS, *HABITS]]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group("vlconvert", cls=LazyGroup, invoke_without_command=True, no_args_is_help=False,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
              help="Show the version of vlconvert, python, torch and transformers, and exit.")
@click.option("--verbose", "-v", is_flag=True, help="Say more, where the command has more to say (see its --help).")
@click.option("--quiet", "-q", is_flag=True, help="As the command's -q: only the result's path, or nothing.")
@click.option("--json", "as_json", is_flag=True, help="As the command's --json: one JSON object on stdout.")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, verbose: bool = False, quiet: bool = False, as_json: bool = False,
         debug: bool = False) -> None:
    """Convert Qwen3-VL checkpoints between Hugging Face, DCP (FSDP2) and Megatron layouts, and repair
    their tokenizers before RL. Every command streams tensor by tensor and publishes its output only
    when complete. Options before the command apply to it (vlconvert --json inspect X).

    \b
    Shell completion (bash; zsh and fish: see README):
      eval "$(_VLCONVERT_COMPLETE=bash_source vlconvert)"
    """
    from vlconvert import console

    console.DEBUG = debug
    console.VERBOSE = verbose
    console.QUIET = quiet
    console.JSON = as_json
    if ctx.invoked_subcommand is None:  # bare `vlconvert`: a short usage, not the whole help
        if as_json:
            console.fail("error: no command given; see 'vlconvert --help'", 2, as_json=True)
        click.echo(short_usage(), err=True)
        ctx.exit(2)


@click.command("help")
@click.argument("command", required=False)
@click.pass_context
def help_command(ctx: click.Context, command: str | None) -> None:
    """Show the help of COMMAND, as vlconvert COMMAND --help does (of vlconvert without one)."""
    group_ctx = ctx.parent
    assert group_ctx is not None and isinstance(group_ctx.command, click.Group)
    if command is None:
        click.echo(group_ctx.get_help())
        return
    sub = group_ctx.command.get_command(group_ctx, command)
    if sub is None:
        raise click.UsageError(f"no such command '{command}'", group_ctx)
    with sub.make_context(command, [], parent=group_ctx, resilient_parsing=True) as sub_ctx:
        click.echo(sub_ctx.get_help())


@click.command("version")
@click.option("--json", "as_json", is_flag=True, help="Print them as one JSON object.")
def version_command(as_json: bool) -> None:
    """Show the versions of vlconvert, python, torch, transformers, safetensors and huggingface_hub
    (= vlconvert --version)."""
    from vlconvert import console

    if as_json or console.JSON:
        import json

        click.echo(json.dumps(console.json_record("version", {"versions": version_dict()})))
        return
    click.echo(versions())


if __name__ == "__main__":
    main()
