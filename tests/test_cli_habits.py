"""Output that fits, habits from git and hf, and the smaller rules (issue 22, items 10, 11 and 13): each test
names the rule and checks it on every command it applies to, through the command line as people and
scripts run it."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

import vlconvert
from vlconvert.cli import COMMANDS, main, versions
from vlconvert.progress import human_bytes

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
MOE = FIX / "tiny-moe"
DENSE = FIX / "tiny-dense-tied"
CONVERTERS = ("convert", "hf-to-dcp", "dcp-to-hf", "hf-to-megatron", "megatron-to-hf", "reshard")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def error_of(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(("error: ", "interrupted: ")), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A DCP, a Megatron and a torch_dist checkpoint of the MoE fixture."""
    root = tmp_path_factory.mktemp("habits")
    for name, to in (("dcp", "dcp"), ("mg", "megatron"), ("td", "torch_dist")):
        assert invoke("convert", MOE, root / name, "--to", to, "-q").exit_code == 0
    return {"hf": MOE, "dcp": root / "dcp", "mg": root / "mg", "td": root / "td"}


# ============================================================ item 10: output that fits
def _bar_line(width: int) -> str:
    """The progress bar of a 3.22 GiB conversion a third done (16 files, 750 tensors), at ``width`` columns."""
    from vlconvert.console import FittingProgress

    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    progress = FittingProgress("hf -> megatron", console)
    step = 4_609_052
    task = progress.add_task("hf -> megatron", total=750 * step, tensor_ends=[i * step for i in range(1, 751)],
                             file_ends=[i * step for i in range(50, 751, 50)])
    progress.update(task, completed=1_234_567_890)
    console.print(progress.make_tasks_table(progress.tasks))
    return console.file.getvalue()


@pytest.mark.parametrize("width", [40, 60, 80, 100, 120, 200])
def test_the_progress_bar_stays_on_one_line(width):
    text = _bar_line(width)
    lines = text.splitlines()
    assert len(lines) == 1 and len(lines[0]) < width, (width, text)
    assert "1.15 GiB / 3.22 GiB" in lines[0]  # bytes done of the total: the last field to go


def test_the_progress_bar_drops_fields_as_the_terminal_narrows():
    wide, normal, narrow = _bar_line(120), _bar_line(80), _bar_line(40)
    assert "hf -> megatron" in wide and "files 5/15, tensors 267/750" in wide and "eta" in wide
    assert "hf -> megatron" in normal and "eta" in normal and "tensors" not in normal
    assert "━" in narrow and "eta" not in narrow and "hf -> megatron" not in narrow


def test_a_real_run_draws_one_line_frames(tmp_path, monkeypatch):
    """A conversion on an 80-column terminal: every frame of the bar is one line (a frame of two or more lines
    moves the cursor up to redraw it; the bar is transient, so one line up erases the last frame)."""
    from vlconvert import console

    terminal = Console(file=io.StringIO(), width=80, force_terminal=True, color_system="standard")
    monkeypatch.setattr(console.stderr, "_tty", terminal)
    monkeypatch.setattr(console.Out, "is_terminal", lambda self: self.stderr)
    result = invoke("convert", MOE, tmp_path / "o", "--to", "megatron", "--tp", "2")
    assert result.exit_code == 0, result.output
    frames = terminal.file.getvalue()
    assert "GiB" in frames or "MiB" in frames, frames  # the bar was drawn
    assert frames.count("\x1b[1A") == 1, frames  # only the erasing of the last frame, one line up
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frames).rstrip("\r\n")
    assert all("\n" not in frame and len(frame) < 80 for frame in plain.split("\r")), plain


def test_doctor_in_a_log_has_no_long_lines_and_ends_with_a_summary(monkeypatch, tmp_path):
    from dataclasses import replace

    from vlconvert import doctor

    result = invoke("doctor")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, result.stdout
    assert re.fullmatch(r"\d+ checks: \d+ ok(, \d+ \w+)*; nothing blocks a conversion", lines[-1]), lines[-1]
    facts = doctor.collect_facts()
    monkeypatch.setattr(doctor, "collect_facts", lambda: replace(facts, torch_version="2.9.0+cu128",
                                                                torch_cuda="12.8", cuda_available=True,
                                                                cudnn_version=91002))
    result = invoke("doctor")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    url = doctor.CONV3D_ISSUE
    assert all(len(line) <= 100 or url in line for line in lines), result.stdout  # a URL is never split
    assert any(line.strip().endswith(url) for line in lines) and any("fix: upgrade torch" in line for line in lines)
    assert lines[-1].endswith("1 FAIL; a FAIL blocks conversions here: see its fix above"), lines[-1]
    data = json.loads(invoke("doctor", "--json").stdout)
    assert data["ok"] is False and data["counts"]["fail"] == 1 and data["summary"] == lines[-1]


def test_bare_vlconvert_prints_a_short_usage():
    result = invoke()
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "usage: vlconvert [-v] [-q] [--json] [--debug] COMMAND [ARGS]..."
    assert len(lines) <= 5 and all(len(line) <= 100 for line in lines), result.stderr
    assert "Options:" not in result.stderr and "error:" not in result.stderr
    assert all(name in result.stderr for name in [*COMMANDS, "help", "version"])
    result = invoke("--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"ok": False, "command": None, "exit_code": 2,
                                         "error": "no command given; see 'vlconvert --help'"}


def _examples(command) -> list[str]:
    """The example command lines of a command's docstring."""
    return [line.strip() for line in (command.help or "").splitlines()
            if line.strip().startswith(("vlconvert ", "eval ", "out=$("))]


@pytest.mark.parametrize("name", ["", *COMMANDS])
@pytest.mark.parametrize("columns", ["60", "80", "120"])
def test_help_examples_are_never_rewrapped(name, columns):
    """Every example of a --help is printed whole on its own line, so it pastes as a command."""
    command = main if not name else main.get_command(None, name)
    args = [name, "--help"] if name else ["--help"]
    text = invoke(*args, env={"COLUMNS": columns}).stdout
    lines = [line.strip() for line in text.splitlines()]
    for example in _examples(command):
        assert example in lines, (name, columns, example, text)


def test_the_commands_with_examples_have_them():
    assert len(_examples(main.get_command(None, "convert"))) == 3
    assert _examples(main.get_command(None, "hf-to-megatron"))
    assert _examples(main)


def _help_of(option: str, text: str) -> str:
    """The help text of ``option`` in a --help page, joined over its lines."""
    match = re.search(rf"^  (?:-\w, )?{re.escape(option)}\b(.*?)(?=^  -|\Z)", text, flags=re.S | re.M)
    return " ".join(match.group(1).split()) if match else ""


@pytest.mark.parametrize("name", list(COMMANDS))
def test_output_options_promise_only_what_the_command_does(name):
    text = invoke(name, "--help", env={"COLUMNS": "200"}).stdout
    verbose, quiet, as_json = (_help_of(o, text) for o in ("--verbose", "--quiet", "--json"))
    says_more = {"convert": "asset", "dcp-to-hf": "asset", "megatron-to-hf": "asset", "plan": "every file and rank",
                 "verify": "every tensor"}
    assert (verbose != "") == (name in says_more), (name, verbose)
    if name in says_more:
        assert says_more[name] in verbose
    draws_a_bar = name not in ("plan", "inspect", "doctor")
    assert ("no progress bar" in as_json) == draws_a_bar, (name, as_json)
    writes = name in CONVERTERS or name == "retag-think"
    assert ("path" in quiet) == writes and ("nothing but errors" in quiet) == (not writes), (name, quiet)
    assert "before the command" in quiet and "before the command" in as_json


def test_verbose_lists_what_it_promises(tmp_path, made):
    same = [str(made["hf"]), str(made["dcp"])]
    assert "model.language_model.embed_tokens.weight" in invoke("verify", *same, "-v").stdout
    assert "model.language_model.embed_tokens.weight" not in invoke("verify", *same).stdout
    many = ["plan", "--config", FIX / "configs" / "Qwen3-VL-235B-A22B-Instruct.json", "--to", "hf",
            "--max-shard-size", "1GB"]  # hundreds of files: a summary unless every one is asked for
    assert "more (--all)" not in invoke(*many, "-v").stdout and "more (--all)" in invoke(*many).stdout
    loud = invoke("convert", made["dcp"], tmp_path / "hf", "--to", "hf", "--assets-dir", MOE, "-v")
    assert "copied tokenizer.json" in loud.stderr and "tokenizer.json" in loud.stdout


# ============================================================ item 11: habits from git and hf
@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_command_is_dash_dash_help(name):
    assert invoke("help", name).stdout == invoke(name, "--help").stdout != ""


def test_help_alone_and_a_wrong_name():
    assert invoke("help").stdout == invoke("--help").stdout
    assert "help" in invoke("--help").stdout and "version" in invoke("--help").stdout
    line = error_of(invoke("help", "inspct"), 2)
    assert line == "error: no such command 'inspct' (did you mean inspect?); see 'vlconvert --help'"


def test_version_command_is_dash_dash_version():
    assert invoke("version").stdout == invoke("--version").stdout == versions() + "\n"
    for args in (["version", "--json"], ["--json", "version"]):
        data = json.loads(invoke(*args).stdout)
        assert data["ok"] is True and data["command"] == "version"
        assert data["versions"]["vlconvert"] == vlconvert.__version__ and "torch" in data["versions"]


@pytest.mark.parametrize("args", [
    ["inspect", MOE], ["plan", "--config", MOE, "--to", "megatron", "--tp", "2"], ["verify", MOE, "{dcp}"],
    ["verify", "--manifest", "{dcp}"], ["retag-think", DENSE, "--check"],
])
def test_json_and_quiet_before_the_command_count_as_after_it(args, made):
    args = [str(a).format(dcp=made["dcp"]) for a in args]
    before, after = invoke("--json", *args), invoke(*args, "--json")
    assert before.exit_code == after.exit_code == 0, before.output
    strip = re.compile(r'"seconds": [\d.]+')
    assert strip.sub("", before.stdout) == strip.sub("", after.stdout) and json.loads(before.stdout)["ok"]
    quiet = invoke("-q", *args)
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_global_json_failure_is_json(tmp_path):
    result = invoke("--json", "inspect", tmp_path / "nope")
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["command"] == "inspect" and "no such folder" in data["error"]


QUIET_RUNS = {
    "convert": ["convert", "{hf}", "{out}", "--to", "megatron", "--tp", "2"],
    "hf-to-dcp": ["hf-to-dcp", "{hf}", "{out}"],
    "dcp-to-hf": ["dcp-to-hf", "{dcp}", "{out}", "--assets-dir", "{hf}"],
    "hf-to-megatron": ["hf-to-megatron", "{hf}", "{out}", "--ep", "2"],
    "megatron-to-hf": ["megatron-to-hf", "{mg}", "{out}", "--assets-dir", "{hf}"],
    "reshard": ["reshard", "{mg}", "{out}", "--tp", "2"],
    "retag-think": ["retag-think", "{hf}", "--out", "{out}"],
}


@pytest.mark.parametrize("name", list(QUIET_RUNS))
@pytest.mark.parametrize("where", ["after", "before"])
def test_quiet_prints_the_result_path_and_nothing_else(name, where, tmp_path, made, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a.format(out="out", **{k: str(v) for k, v in made.items()}) for a in QUIET_RUNS[name]]
    result = invoke(*(["-q", *args] if where == "before" else [*args, "-q"]))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tmp_path / 'out'}\n" and result.stderr == ""
    assert (tmp_path / "out").is_dir()
    dry = invoke(*args, "--dry-run", "-q") if name != "retag-think" else None
    assert dry is None or dry.stdout == ""  # nothing written, no path


def test_quiet_retag_of_a_retagged_source_prints_the_folder_to_use(tmp_path):
    first = invoke("retag-think", MOE, "--out", tmp_path / "rt1", "-q")
    assert first.stdout == f"{tmp_path / 'rt1'}\n"
    again = invoke("retag-think", tmp_path / "rt1", "--out", tmp_path / "rt2", "-q")
    assert again.exit_code == 0 and again.stdout == f"{tmp_path / 'rt1'}\n" and not (tmp_path / "rt2").exists()


def test_out_equals_vlconvert_convert_quiet_in_a_shell(tmp_path):
    script = (f'out=$({shlex.quote(sys.executable)} -m vlconvert convert {shlex.quote(str(MOE))} '
              f'{shlex.quote(str(tmp_path / "dcp"))} --to dcp -q) && {shlex.quote(sys.executable)} -m vlconvert '
              'verify --manifest "$out" -q && printf "%s" "$out"')
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == str(tmp_path / "dcp") and proc.stderr == ""


# ============================================================ item 13: the smaller rules
def test_under_torchrun_only_rank_0_prints(tmp_path):
    """Two ranks, one summary: one JSON object on stdout, one path with -q."""
    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "vlconvert",
               "convert", str(MOE), str(tmp_path / extra[0]), "--to", "dcp", *extra[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
        if proc.returncode != 0 and any(s in proc.stderr for s in ("rendezvous", "Address already in use")):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    data = json.loads(torchrun("a", "--json").stdout)  # one object: a second would not parse
    assert data["ok"] is True and data["output"] == str(tmp_path / "a")
    assert torchrun("b", "-q").stdout == f"{tmp_path / 'b'}\n"
    table = torchrun("c").stdout
    assert table.count(str(tmp_path / "c")) == 1, table


def test_a_rank_other_than_0_prints_no_report(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for args in (["plan", "--config", MOE, "--to", "hf"], ["plan", "--config", MOE, "--to", "hf", "--json"],
                 ["inspect", MOE]):
        result = invoke(*args)
        assert result.exit_code == 0 and result.stdout == "", (args, result.stdout)
    monkeypatch.setenv("RANK", "0")
    assert "plan:" in invoke("plan", "--config", MOE, "--to", "hf").stdout


@pytest.mark.parametrize("command", ["verify", "convert --dry-run", "retag-think --check"])
def test_an_interrupted_read_only_command_says_it_writes_nothing(command, monkeypatch, made, tmp_path):
    import vlconvert.commands.convert as convert_command
    import vlconvert.comparison as comparison  # verify imports it when it compares two checkpoints
    import vlconvert.retag as retag

    def interrupt(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(comparison, "verify_sources", interrupt)
    monkeypatch.setattr(convert_command, "show_dry_run", interrupt)
    monkeypatch.setattr(retag, "think_tag_report", interrupt)
    args = {"verify": ["verify", MOE, made["dcp"]], "convert --dry-run": ["convert", MOE, tmp_path / "o", "--to", "dcp",
                                                                         "--dry-run"],
            "retag-think --check": ["retag-think", MOE, "--check"]}[command]
    result = invoke(*args)
    assert result.exit_code == 130, result.output
    line = result.stderr.splitlines()[-1]  # after verify's "comparing A with B"
    assert line == f"interrupted: {command} writes no output, so there is nothing to clean up or resume"
    assert "published" not in line and not (tmp_path / "o").exists()


def _copy_changing(folder: Path, out: Path, drop: str, reshape: str) -> None:
    """``folder`` copied to ``out`` without tensor ``drop`` and with ``reshape`` cut to half its rows."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(out / shard))
        if drop in tensors:
            del tensors[drop]
            del index["weight_map"][drop]
        if reshape in tensors:
            tensors[reshape] = tensors[reshape][: tensors[reshape].shape[0] // 2].clone()
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


def test_verify_table_reads_as_words(tmp_path):
    drop = "model.language_model.layers.0.self_attn.q_norm.weight"
    reshape = "model.language_model.layers.1.self_attn.o_proj.weight"
    _copy_changing(DENSE, tmp_path / "b", drop, reshape)
    result = invoke("verify", DENSE, tmp_path / "b")
    assert result.exit_code == 1
    text = result.stdout
    assert "None" not in text and not re.search(r"\b[a-z]+_(in|mismatch|tolerance)\w*", text), text
    assert re.search(rf"{re.escape(drop)} +│ missing in B +│ - +│ \[16\] +│$", text, re.M), text
    assert re.search(rf"{re.escape(reshape)} +│ shape mismatch +│ - +│ \[64, 64\] vs \[32, 64\]", text), text
    assert "1 missing in B" in text and "1 shape mismatch" in text
    data = json.loads(invoke("verify", DENSE, tmp_path / "b", "--json").stdout)
    assert data["counts"] == {"equal": len(data["tensors"]) - 2, "missing_in_b": 1, "shape_mismatch": 1}


def test_verify_of_two_different_models_says_so_before_any_row():
    result = invoke("verify", MOE, DENSE)
    line = error_of(result, 1)
    assert result.stdout == "" and "tensors" not in result.stderr
    assert line == (f"error: '{MOE}' and '{DENSE}' are different models (model type qwen3_vl_moe vs qwen3_vl; "
                    "model MoE (8 experts) vs dense; attention heads 8 vs 4; vision width 64 vs 32; vision depth 2 "
                    "vs 3): nothing to compare tensor by tensor")
    line = error_of(invoke("verify", FIX / "tiny-dense-untied", DENSE), 1)
    assert "are different models (decoder layers 3 vs 2)" in line
    import vlconvert.commands.verify  # noqa: F401 - what the command line imports: vlconvert.verify stays the function

    assert callable(vlconvert.verify) and not isinstance(vlconvert.verify, type(vlconvert))
    with pytest.raises(vlconvert.UserError, match="are different models"):
        vlconvert.verify(MOE, DENSE)


def test_printing_a_plan_or_result_is_one_short_line(tmp_path):
    conv = vlconvert.Converter(MOE, tmp_path / "o", to="megatron", tp=2)
    plan = conv.plan()
    assert repr(plan) == (f"ConversionPlan(hf -> megatron, source='{MOE}', 2 files of tensors, "
                          f"{sum(len(f.tensors) for f in plan.files)} tensors, 1.85 MiB)")
    result = conv.run()
    text = str(result)
    assert "\n" not in text and len(text) < 400 and "self_attn" not in text and "dtype" not in text, text
    assert text.startswith(f"Result(output='{tmp_path / 'o'}', files={result.files}, written=")
    assert repr(plan.files[0]) == f"PlannedFile('{plan.files[0].name}', {len(plan.files[0].tensors)} tensors, " \
                                  f"{human_bytes(plan.files[0].nbytes)})"


def test_dir_lists_the_public_names():
    names = dir(vlconvert)
    assert "Converter" in names and "convert" in names and "verify" in names and "__version__" in names
    assert "Any" not in names and "annotations" not in names and "_LAZY" not in names
    assert vlconvert.Converter is vlconvert.Converter
    from vlconvert.engine import Converter

    assert issubclass(vlconvert.Converter, Converter) and vlconvert.Converter.__module__ == "vlconvert"


@pytest.mark.parametrize("kwargs, api, cli, code", [
    ({"to": "megatron", "tp": 3}, "tp=3 must divide the 4 attention heads",
     ["--to", "megatron", "--tp", "3"], 1),
    ({"to": "megatron", "max_memory": "1x"}, "max_memory='1x' is not a size: write e.g. 1GiB or 800MB",
     ["--to", "megatron", "--max-memory", "1x"], 2),
    ({"to": "hf", "ep": 2}, "ep=2 applies only where to is 'megatron' or 'torch_dist', not to='hf': drop it",
     ["--to", "hf", "--ep", "2"], 2),
])
def test_api_errors_name_keyword_arguments_and_the_cli_names_options(tmp_path, kwargs, api, cli, code):
    with pytest.raises(vlconvert.UserError) as caught:
        vlconvert.Converter(DENSE, tmp_path / "o", **kwargs).plan()
    assert str(caught.value) == api
    line = error_of(invoke("convert", DENSE, tmp_path / "o", *cli), code)
    assert line.startswith(f"error: {cli[2]} "), line  # the command line names its option
    assert not (tmp_path / "o").exists()


def test_api_error_for_an_existing_output(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    with pytest.raises(vlconvert.UserError, match=r"pass overwrite=True$"):
        vlconvert.convert(DENSE, tmp_path / "o", to="dcp")
    assert "pass --overwrite" in error_of(invoke("convert", DENSE, tmp_path / "o", "--to", "dcp"), 1)


WRONG_LAYOUT = [  # (older spelling, source, what it is, the command the message names)
    ("hf-to-dcp", "dcp", "a DCP checkpoint", "vlconvert convert {dcp} {out} --to dcp"),
    ("hf-to-dcp", "mg", "a Megatron checkpoint", "vlconvert convert {mg} {out} --to dcp"),
    ("hf-to-megatron", "mg", "a Megatron checkpoint", "vlconvert reshard {mg} {out}"),
    ("hf-to-megatron", "td", "a Megatron torch_dist checkpoint", "vlconvert reshard {td} {out}"),
    ("dcp-to-hf", "hf", "a Hugging Face folder", "vlconvert convert {hf} {out} --to hf --assets-dir {hf}"),
    ("dcp-to-hf", "mg", "a Megatron checkpoint", "vlconvert megatron-to-hf {mg} {out} --assets-dir {hf}"),
    ("megatron-to-hf", "dcp", "a DCP checkpoint", "vlconvert dcp-to-hf {dcp} {out} --assets-dir {hf}"),
    ("megatron-to-hf", "hf", "a Hugging Face folder", "vlconvert convert {hf} {out} --to hf --assets-dir {hf}"),
    ("reshard", "hf", "a Hugging Face folder", "vlconvert hf-to-megatron {hf} {out}"),
    ("reshard", "dcp", "a DCP checkpoint", "vlconvert convert {dcp} {out} --to megatron"),
]


@pytest.mark.parametrize("command, source, what, use", WRONG_LAYOUT, ids=[f"{c}-{s}" for c, s, _, _ in WRONG_LAYOUT])
def test_older_spellings_say_what_the_folder_is_and_what_to_use(command, source, what, use, tmp_path, made):
    paths = {k: str(v) for k, v in made.items()}
    args = [command, paths[source], str(tmp_path / "o")]
    if command in ("dcp-to-hf", "megatron-to-hf"):
        args += ["--assets-dir", paths["hf"]]
    line = error_of(invoke(*args), 1)
    reads = {"hf-to-dcp": "a Hugging Face folder", "hf-to-megatron": "a Hugging Face folder",
             "dcp-to-hf": "a DCP checkpoint", "megatron-to-hf": "a Megatron checkpoint",
             "reshard": "a Megatron checkpoint"}[command]
    suggested = use.format(out=tmp_path / "o", **paths)
    assert line == f"error: '{paths[source]}' is {what}, not {reads} (what {command} reads): use '{suggested}'"
    assert not (tmp_path / "o").exists()
    done = invoke(*shlex.split(suggested)[1:], "-q")  # the command it names does the job
    assert done.exit_code == 0 and done.stdout == f"{tmp_path / 'o'}\n", done.output


@pytest.mark.skipif(__import__("vlconvert.doctor", fromlist=["x"]).supported_transformers() is None,
                    reason="the installed transformers is outside 5.4-6: doctor measures it")
def test_doctor_does_not_import_transformers_when_its_version_says_enough():
    code = ("import sys\nfrom vlconvert.cli import main\ntry:\n    main(['doctor', '-q'])\nexcept SystemExit as e:\n"
            "    code = e.code\nprint(code, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.stdout.split() == ["0", "False"], proc.stderr


def test_readme_says_how_long_the_tests_take():
    text = (ROOT / "README.md").read_text()
    assert re.search(r"take about \d+-\d+ minutes on 2 cores", text), "README: how long the tests take"
