"""One schema for every command's ``--json`` output, success and failure (issue 22, item 5; README, "JSON
output"): always ``ok`` (bool) and ``command`` (the command's name); on failure ``error`` (one line) and
``exit_code``; ``ok`` is false exactly when the command exits non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlconvert.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
MOE = ROOT / "fixtures" / "tiny-moe"
DENSE = ROOT / "fixtures" / "tiny-dense-tied"

SUCCESS = {
    "convert": ["convert", MOE, "{tmp}/o", "--to", "dcp"],
    "convert --dry-run": ["convert", MOE, "{tmp}/o", "--to", "megatron", "--tp", "2", "--dry-run"],
    "hf-to-dcp": ["hf-to-dcp", MOE, "{tmp}/o"],
    "dcp-to-hf": ["dcp-to-hf", "{dcp}", "{tmp}/o", "--assets-dir", MOE],
    "hf-to-megatron": ["hf-to-megatron", MOE, "{tmp}/o", "--tp", "2", "--ep", "2"],
    "megatron-to-hf": ["megatron-to-hf", "{mg}", "{tmp}/o", "--assets-dir", MOE],
    "reshard": ["reshard", "{mg}", "{tmp}/o", "--tp", "1", "--ep", "2"],
    "retag-think": ["retag-think", DENSE, "--out", "{tmp}/o"],
    "retag-think --check": ["retag-think", DENSE, "--check"],
    "plan": ["plan", "--config", MOE, "--to", "hf"],
    "inspect": ["inspect", MOE],
    "verify": ["verify", MOE, "{dcp}"],
    "verify --manifest": ["verify", "--manifest", "{dcp}"],
    "doctor": ["doctor"],
}
FAILURE = {  # (args, exit code): usage mistakes, a data error, and commands that exit 1 after their report
    "convert": (["convert", "{tmp}/nope", "{tmp}/o", "--to", "hf"], 2),
    "hf-to-dcp": (["hf-to-dcp", MOE, "{tmp}/o", "--no-such-flag"], 2),
    "dcp-to-hf": (["dcp-to-hf", "{dcp}", "{tmp}/o"], 2),
    "hf-to-megatron": (["hf-to-megatron", DENSE, "{tmp}/o", "--tp", "3"], 1),
    "megatron-to-hf": (["megatron-to-hf", MOE, "{tmp}/o", "--assets-dir", MOE], 1),
    "reshard": (["reshard", "{mg}", "{tmp}/o", "--tp", "0"], 2),
    "retag-think": (["retag-think", DENSE], 2),
    "plan": (["plan", "--config", "fixtures/configs/Qwen3-VL-235B-A22B-Instruct.json", "--to", "megatron",
              "--ep", "7"], 1),
    "inspect": (["inspect", "{tmp}/nope"], 2),
    "verify": (["verify", MOE, DENSE], 1),
    "doctor": (["doctor", "--target", "{tmp}/o"], 2),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("schema")
    runner = CliRunner()
    assert runner.invoke(main, ["hf-to-dcp", str(MOE), str(root / "dcp"), "-q"]).exit_code == 0
    assert runner.invoke(main, ["hf-to-megatron", str(MOE), str(root / "mg"), "--tp", "2", "--ep", "2",
                                "-q"]).exit_code == 0
    return {"dcp": root / "dcp", "mg": root / "mg"}


def _run(args: list, tmp_path: Path, made: dict[str, Path]):
    argv = [str(a).format(tmp=tmp_path, dcp=made["dcp"], mg=made["mg"]) for a in args] + ["--json"]
    result = CliRunner().invoke(main, argv)
    return result, json.loads(result.stdout)


def test_every_command_is_covered() -> None:
    assert {k.split()[0] for k in SUCCESS} == set(COMMANDS) == set(FAILURE)


@pytest.mark.parametrize("name", list(SUCCESS))
def test_success_json_schema(name: str, tmp_path: Path, made: dict[str, Path], monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    result, data = _run(SUCCESS[name], tmp_path, made)
    assert result.exit_code == 0, result.output
    assert list(data)[:2] == ["ok", "command"] and data["ok"] is True and data["command"] == name.split()[0]
    assert "error" not in data and "exit_code" not in data
    for key in ("files", "bytes_written", "tensor_bytes"):  # a count wherever they appear
        assert key not in data or isinstance(data[key], int), (key, data[key])
    assert "bytes" not in data and "bytes_read" not in data  # tensor_bytes / bytes_written
    assert "assets" not in data and isinstance(data.get("assets_copied", []), list)
    assert isinstance(data.get("file_list", []), list)


@pytest.mark.parametrize("name", list(FAILURE))
def test_failure_json_schema(name: str, tmp_path: Path, made: dict[str, Path], monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    args, code = FAILURE[name]
    result, data = _run(args, tmp_path, made)
    assert result.exit_code == code, result.output
    assert list(data)[:2] == ["ok", "command"] and data["ok"] is False and data["command"] == name
    if "error" in data:  # a one-line error; commands that exit 1 after a report give the report instead
        assert data["exit_code"] == code and isinstance(data["error"], str) and "\n" not in data["error"]
        assert result.stderr.strip() == "error: " + data["error"]
