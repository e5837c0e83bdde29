"""The command line as people and scripts meet it (issue 13).

One error form everywhere (one ``error: ...`` line on stderr; exit 2 for a usage error, 1 otherwise),
``--json`` failures as JSON on stdout, piped output that is neither wrapped nor padded, ``--version``,
``--dry-run`` on every converter (nothing written), and the messages the issue found reading wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from vlconvert.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
MOE = FIX / "tiny-moe"
DENSE = FIX / "tiny-dense-tied"
C235 = FIX / "configs" / "Qwen3-VL-235B-A22B-Instruct.json"


# ------------------------------------------------------------------------------------------ helpers
def invoke(*args: object) -> Result:
    """Run ``vlconvert`` in-process; stdout and stderr are pipes, as in a script."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(result: Result, code: int) -> str:
    """Assert the one-line error contract with exit ``code``; return the line."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "Usage:" not in result.output and "Try '" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not lines[0].startswith("error: internal error"), lines[0]
    return lines[0]


def usage_error(*args: object) -> str:
    line = one_error(invoke(*args), 2)
    assert line.endswith("--help'"), line  # names where to look
    return line


def run_piped(*args: str) -> subprocess.CompletedProcess:
    """``python -m vlconvert ...`` with stdout and stderr piped and a tiny COLUMNS, to prove nothing wraps."""
    env = {**os.environ, "COLUMNS": "40"}
    return subprocess.run([sys.executable, "-m", "vlconvert", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False, env=env)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A DCP and a Megatron checkpoint of the MoE fixture, for the commands that read them."""
    root = tmp_path_factory.mktemp("cli")
    assert invoke("hf-to-dcp", MOE, root / "dcp", "-q").exit_code == 0
    assert invoke("hf-to-megatron", MOE, root / "mg", "--tp", "2", "--ep", "2", "-q").exit_code == 0
    return {"dcp": root / "dcp", "mg": root / "mg"}


# ------------------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("command", list(COMMANDS))
def test_unknown_option_is_one_line_exit_2(command: str) -> None:
    line = usage_error(command, "--no-such-flag")
    assert line == f"error: no such option '--no-such-flag'; see 'vlconvert {command} --help'"


def test_misspelled_option_and_command_suggest_the_fix() -> None:
    assert usage_error("hf-to-megatron", "a", "b", "--tpp", "2") == \
        "error: no such option '--tpp' (did you mean --tp or --pp?); see 'vlconvert hf-to-megatron --help'"
    assert "(did you mean --overwrite?)" in usage_error("convert", "a", "b", "--to", "hf", "--ovewrite")
    assert usage_error("inspectt", "x") == \
        "error: no such command 'inspectt' (did you mean inspect?); see 'vlconvert --help'"


def test_bad_values_missing_options_and_paths_exit_2(tmp_path: Path) -> None:
    line = usage_error("convert", MOE, tmp_path / "o", "--to", "xx")  # the choices may grow (torch_dist)
    assert line.startswith("error: invalid value for '--to': 'xx' is not one of 'hf', 'dcp', 'megatron'")
    assert line.endswith("; see 'vlconvert convert --help'")
    line = usage_error("plan")
    assert line.startswith("error: missing option '--to' (one of: hf, dcp, megatron")
    assert line.endswith("); see 'vlconvert plan --help'")
    assert "missing argument 'DST'" in usage_error("convert", MOE)
    assert "'--tp': 'x' is not a valid integer" in usage_error("plan", "--to", "megatron", "--tp", "x")
    assert "no such folder" in usage_error("inspect", tmp_path / "nope")
    assert "no such folder" in usage_error("verify", tmp_path / "nope", MOE)
    assert "does not exist" in usage_error("doctor", "--config", tmp_path / "nope.json")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [
    ["convert", MOE, "{tmp}/o", "--to", "hf"], ["hf-to-dcp", MOE, "{tmp}/o"],
    ["dcp-to-hf", "{dcp}", "{tmp}/o", "--assets-dir", MOE], ["hf-to-megatron", MOE, "{tmp}/o"],
    ["megatron-to-hf", "{mg}", "{tmp}/o", "--assets-dir", MOE], ["reshard", "{mg}", "{tmp}/o"],
    ["plan", "--config", MOE, "--to", "hf"],
], ids=["convert", "hf-to-dcp", "dcp-to-hf", "hf-to-megatron", "megatron-to-hf", "reshard", "plan"])
def test_unknown_dtype_lists_every_name(args: list, tmp_path: Path, made: dict[str, Path]) -> None:
    args = [str(a).format(tmp=tmp_path, dcp=made["dcp"], mg=made["mg"]) for a in args]
    line = usage_error(*args, "--dtype", "bf32")
    assert "invalid value for '--dtype': 'bf32' is not a dtype: use " in line and "keep" in line
    assert "bf16, fp16 or fp32" in line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------- one rule: usage mistakes exit 2 (issue 22, item 3)
# every command x every mistake class that applies to it: a missing or extra argument, a bad option value, a
# missing required option, a path that does not exist. {dcp}/{mg}: made checkpoints without assets.
USAGE_MISTAKES = {
    "convert": {"missing argument": [MOE], "extra argument": [MOE, "{tmp}/o", "--to", "hf", "extra"],
                "bad value": [MOE, "{tmp}/o", "--to", "megatron", "--tp", "0"],
                "missing option": ["{dcp}", "{tmp}/o", "--to", "hf"],
                "missing path": ["{tmp}/nope", "{tmp}/o", "--to", "hf"],
                "missing assets path": ["{dcp}", "{tmp}/o", "--to", "hf", "--assets-dir", "{tmp}/nope"]},
    "hf-to-dcp": {"missing argument": [MOE], "extra argument": [MOE, "{tmp}/o", "extra"],
                  "bad value": [MOE, "{tmp}/o", "--dtype", "bf32"], "missing path": ["{tmp}/nope", "{tmp}/o"],
                  "missing adapter path": [MOE, "{tmp}/o", "--merge-lora", "{tmp}/nope"]},
    "dcp-to-hf": {"missing argument": ["{dcp}"], "extra argument": ["{dcp}", "{tmp}/o", "x", "--assets-dir", MOE],
                  "bad value": ["{dcp}", "{tmp}/o", "--assets-dir", MOE, "--dtype", "bf32"],
                  "missing option": ["{dcp}", "{tmp}/o"],
                  "missing path": ["{tmp}/nope", "{tmp}/o", "--assets-dir", MOE]},
    "hf-to-megatron": {"missing argument": [MOE], "extra argument": [MOE, "{tmp}/o", "extra"],
                       "bad value": [MOE, "{tmp}/o", "--tp", "0"], "missing path": ["{tmp}/nope", "{tmp}/o"]},
    "megatron-to-hf": {"missing argument": ["{mg}"], "extra argument": ["{mg}", "{tmp}/o", "x", "--assets-dir", MOE],
                       "missing option": ["{mg}", "{tmp}/o"],
                       "missing path": ["{tmp}/nope", "{tmp}/o", "--assets-dir", MOE],
                       "missing assets path": ["{mg}", "{tmp}/o", "--assets-dir", "{tmp}/nope"]},
    "reshard": {"missing argument": ["{mg}"], "extra argument": ["{mg}", "{tmp}/o", "extra"],
                "bad value": ["{mg}", "{tmp}/o", "--tp", "0"], "missing path": ["{tmp}/nope", "{tmp}/o"]},
    "retag-think": {"missing argument": [], "extra argument": [DENSE, "extra", "--out", "{tmp}/o"],
                    "bad value": [DENSE, "--out", "{tmp}/o", "--strategy", "xx"], "missing option": [DENSE],
                    "missing path": ["{tmp}/nope", "--out", "{tmp}/o"]},
    "plan": {"extra argument": ["extra", "--config", MOE, "--to", "hf"],
             "bad value": ["--config", MOE, "--to", "megatron", "--tp", "0"], "missing option": ["--to", "hf"],
             "missing path": ["--config", "{tmp}/nope", "--to", "hf"],
             "missing source path": ["--source", "{tmp}/nope", "--to", "hf"]},
    "inspect": {"missing argument": [], "extra argument": [MOE, "extra"], "missing path": ["{tmp}/nope"]},
    "verify": {"missing argument": [MOE], "extra argument": [MOE, MOE, "extra"],
               "bad value": [MOE, MOE, "--tolerance", "x"], "missing path": [MOE, "{tmp}/nope"]},
    "doctor": {"extra argument": ["extra"], "bad value": ["--config", MOE, "--to", "xx"],
               "missing option": ["--target", "{tmp}/o"], "missing path": ["--config", "{tmp}/nope.json"]},
}
USAGE_CASES = [(command, mistake) for command, mistakes in USAGE_MISTAKES.items() for mistake in mistakes]


def test_usage_mistakes_cover_every_command() -> None:
    assert set(USAGE_MISTAKES) == set(COMMANDS)


@pytest.mark.parametrize("command, mistake", USAGE_CASES, ids=[f"{c}-{m}" for c, m in USAGE_CASES])
def test_usage_mistakes_exit_2_with_one_line(command: str, mistake: str, tmp_path: Path,
                                             made: dict[str, Path]) -> None:
    args = [command, *(str(a).format(tmp=tmp_path, dcp=made["dcp"], mg=made["mg"])
                       for a in USAGE_MISTAKES[command][mistake])]
    line = one_error(invoke(*args), 2)
    assert line.endswith(f"; see 'vlconvert {command} --help'"), line
    result = invoke(*args, "--json")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["exit_code"] == 2 and data["error"] == line.removeprefix("error: ")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [
    ["convert", MOE, "{tmp}/taken", "--to", "hf"], ["hf-to-dcp", MOE, "{tmp}/taken"],
    ["hf-to-megatron", DENSE, "{tmp}/o", "--tp", "3"], ["retag-think", "{tmp}/taken", "--out", "{tmp}/o"],
    ["verify", "--manifest", "{tmp}/taken"], ["inspect", "{tmp}/taken"],
    ["plan", "--config", "{tmp}/taken/bad.json", "--to", "hf"],
], ids=["convert", "hf-to-dcp", "hf-to-megatron", "retag-think", "verify", "inspect", "plan"])
def test_other_errors_exit_1_and_json(args: list, tmp_path: Path) -> None:
    taken = tmp_path / "taken"  # exists, holds no checkpoint; bad.json is not JSON
    taken.mkdir()
    (taken / "bad.json").write_text("{")
    args = [str(a).format(tmp=tmp_path) for a in args]
    line = one_error(invoke(*args), 1)
    assert "--help" not in line
    result = invoke(*args, "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["exit_code"] == 1 and data["error"] == line.removeprefix("error: ")
    assert not (tmp_path / "o").exists()


def test_json_usage_error_is_json_too(tmp_path: Path) -> None:
    result = invoke("inspect", tmp_path / "nope", "--json")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["exit_code"] == 2 and "no such folder" in data["error"]


def test_messages_that_read_wrong_before(tmp_path: Path) -> None:
    line = one_error(invoke("hf-to-megatron", DENSE, tmp_path / "o", "--pp", "3"), 1)
    assert line == "error: --pp 3 is more than the 2 decoder layers: every stage needs at least one; " \
                   "use --pp among [1, 2]"
    line = one_error(invoke("hf-to-dcp", "nobody-here/no-such-model", tmp_path / "o"), 2)
    assert "hf download nobody-here/no-such-model" in line


def test_retag_messages(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert invoke("retag-think", MOE, "--out", out, "-q").exit_code == 0
    line = one_error(invoke("retag-think", MOE, "--out", out, "--open", "<reason>"), 1)
    assert "already retagged" in line and "--overwrite" in line and "start from the original" not in line
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    result = invoke("retag-think", MOE, "--out", busy)
    assert "already exists" in one_error(result, 1) and "retagging" not in result.output


# ------------------------------------------------------------------------------------- output
def test_piped_output_is_not_wrapped_or_padded() -> None:
    result = run_piped("plan", "--config", str(C235), "--to", "megatron", "--tp", "4", "--pp", "2", "--ep", "16")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line == line.rstrip() for line in lines)
    flags = "--tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 --expert-model-parallel-size 16"
    assert any(flags in line for line in lines), result.stdout
    assert max(len(line) for line in lines) > 80
    assert result.stderr == ""  # no progress bar, no blank line in a log


def test_piped_verify_keeps_whole_tensor_names() -> None:
    from vlconvert.layouts.hf import HFCheckpoint

    names = list(HFCheckpoint(MOE).tensors)
    result = run_piped("verify", str(MOE), str(MOE), "--all")
    assert result.returncode == 0, result.stderr
    assert all(line == line.rstrip() for line in result.stdout.splitlines())
    for name in names:
        assert f" {name} " in result.stdout, name


def test_inspect_plan_read_right(made: dict[str, Path]) -> None:
    for path in (DENSE, MOE, made["mg"]):
        result = invoke("inspect", path)
        assert result.exit_code == 0, result.output
        assert "None" not in result.stdout and "True" not in result.stdout
    assert "70 tensors in 4 files" in invoke("inspect", made["mg"]).stdout
    text = invoke("plan", "--config", DENSE, "--to", "hf").stdout
    assert "checks" not in text and "expert" not in text
    text = invoke("plan", "--config", MOE, "--to", "megatron").stdout
    assert "(1 folder)" in text and "(1 folders)" not in text


def test_summaries_one_unit_family_and_verbose(tmp_path: Path, made: dict[str, Path]) -> None:
    quiet = invoke("megatron-to-hf", made["mg"], tmp_path / "a", "--assets-dir", MOE)
    assert quiet.exit_code == 0, quiet.output
    loud = invoke("-v", "megatron-to-hf", made["mg"], tmp_path / "b", "--assets-dir", MOE)
    assert loud.exit_code == 0, loud.output
    assert "assets copied" in quiet.stdout and "tokenizer_config.json" not in quiet.stdout
    assert "tokenizer_config.json" in loud.stdout
    for text in (quiet.stdout, invoke("hf-to-dcp", MOE, tmp_path / "c").stdout):
        assert "on disk" in text and "MiB" in text and " MB" not in text and " GB" not in text


def test_version() -> None:
    result = run_piped("--version")
    assert result.returncode == 0, result.stderr
    from vlconvert import __version__

    assert result.stdout.startswith(f"vlconvert {__version__} (")
    assert f"torch {version('torch')}" in result.stdout
    assert f"transformers {version('transformers')}" in result.stdout


def test_help_mentions_completion_and_flags() -> None:
    assert "_VLCONVERT_COMPLETE=bash_source" in invoke("--help").stdout
    for command in ("convert", "hf-to-dcp", "dcp-to-hf", "hf-to-megatron", "megatron-to-hf", "reshard"):
        text = invoke(command, "--help").stdout
        assert "--dry-run" in text and "--quiet" in text and "--json" in text, command
        # -v is listed only where it says more (issue 22, item 10): the commands that copy assets
        assert ("--verbose" in text) == (command in ("convert", "dcp-to-hf", "megatron-to-hf")), command


# ------------------------------------------------------------------------------------- --dry-run
@pytest.mark.parametrize("args", [
    ["convert", MOE, "{tmp}/o", "--to", "megatron", "--tp", "2"], ["hf-to-dcp", MOE, "{tmp}/o"],
    ["dcp-to-hf", "{dcp}", "{tmp}/o", "--assets-dir", MOE], ["hf-to-megatron", MOE, "{tmp}/o", "--ep", "2"],
    ["megatron-to-hf", "{mg}", "{tmp}/o", "--assets-dir", MOE], ["reshard", "{mg}", "{tmp}/o", "--tp", "1"],
], ids=["convert", "hf-to-dcp", "dcp-to-hf", "hf-to-megatron", "megatron-to-hf", "reshard"])
def test_dry_run_writes_nothing(args: list, tmp_path: Path, made: dict[str, Path]) -> None:
    args = [str(a).format(tmp=tmp_path, dcp=made["dcp"], mg=made["mg"]) for a in args]
    result = invoke(*args, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "nothing written" in result.stdout
    assert all(line == line.rstrip() for line in result.stdout.splitlines())
    data = json.loads(invoke(*args, "--dry-run", "--json").stdout)
    assert data["dry_run"] is True and data["files"] == len(data["file_list"]) > 0 and data["tensor_bytes"] > 0
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder, no lock


def test_shell_completion_and_closed_pipe() -> None:
    env = {"_VLCONVERT_COMPLETE": "bash_complete", "COMP_WORDS": "vlconvert convert a b --dtype b", "COMP_CWORD": "5"}
    assert CliRunner().invoke(main, [], env=env).stdout.split() == ["plain,bf16"]
    # `vlconvert ... | head -1`: the reader goes away; no "Broken pipe" error, no traceback
    proc = subprocess.Popen([sys.executable, "-m", "vlconvert", "plan", "--config", str(C235), "--to", "megatron",
                             "--tp", "4", "--pp", "2", "--ep", "16", "--all"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command has started: its first write meets a closed pipe
    assert proc.wait(timeout=120) == 1
    assert proc.stderr.read() == b""
