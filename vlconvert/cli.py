"""The ``vlconvert`` command: a click group whose subcommands live in ``vlconvert/commands/``.

Commands are imported lazily so ``vlconvert --help`` stays fast and one area's import cost (megatron,
tokenizers) is paid only when used.
"""

from __future__ import annotations

import importlib

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
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
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
        rows = [(name, _SUMMARIES.get(name, "")) for name in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vlconvert")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool = False) -> None:
    """Convert Qwen3-VL checkpoints between Hugging Face, DCP (FSDP2) and Megatron layouts, and repair
    their tokenizers before RL. Every command streams tensor by tensor and publishes its output only
    when complete."""
    from vlconvert import console

    console.DEBUG = debug


if __name__ == "__main__":
    main()
