"""A model id from the local Hugging Face cache works in every command that takes a checkpoint, and a
mistyped local path is answered as a path first (issue 22, item 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlconvert.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
MODEL = "Qwen/Tiny-VL-MoE"


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake HF cache holding tiny-moe as ``Qwen/Tiny-VL-MoE``; return its snapshot folder."""
    hub = tmp_path / "hub"
    repo = hub / "models--Qwen--Tiny-VL-MoE"
    snap = repo / "snapshots" / "0123abcd"
    shutil.copytree(FIX / "tiny-moe", snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    return snap


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("args", [
    ["inspect", MODEL],
    ["verify", MODEL, FIX / "tiny-moe"],
    ["verify", FIX / "tiny-moe", MODEL],
    ["verify", MODEL, MODEL],
    ["plan", "--source", MODEL, "--to", "megatron", "--tp", "2", "--ep", "2"],
    ["convert", MODEL, "{tmp}/out", "--to", "dcp"],
    ["hf-to-dcp", MODEL, "{tmp}/out"],
    ["hf-to-megatron", MODEL, "{tmp}/out", "--tp", "2", "--ep", "2"],
    ["retag-think", MODEL, "--out", "{tmp}/out"],
], ids=["inspect", "verify-A", "verify-B", "verify-both", "plan-source", "convert", "hf-to-dcp", "hf-to-megatron",
        "retag-think"])
def test_model_id_from_the_cache_works_in_every_command(args: list, cache: Path, tmp_path: Path) -> None:
    result = invoke(*[str(a).format(tmp=tmp_path) for a in args], "--json")
    assert result.exit_code == 0, (result.exit_code, result.output)
    json.loads(result.stdout)


def test_convert_then_verify_a_model_id(cache: Path, tmp_path: Path) -> None:
    """The issue's sequence: hf download X; convert X out; verify X out."""
    assert invoke("convert", MODEL, tmp_path / "out", "--to", "dcp", "-q").exit_code == 0
    result = invoke("verify", MODEL, tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", [
    ["inspect", "{p}"], ["verify", FIX / "tiny-moe", "{p}"], ["verify", "{p}", "{p}"],
    ["plan", "--source", "{p}", "--to", "hf"], ["convert", "{p}", "{tmp}/o", "--to", "hf"],
    ["hf-to-dcp", "{p}", "{tmp}/o"], ["retag-think", "{p}", "--out", "{tmp}/o"]],
                         ids=["inspect", "verify-B", "verify-A", "plan", "convert", "hf-to-dcp", "retag-think"])
def test_a_mistyped_path_is_no_such_folder_with_the_near_name(command: list, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    args = [str(a).format(p="fixtures/tiny-mo", tmp=tmp_path) for a in command]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: no such folder 'fixtures/tiny-mo' (did you mean 'fixtures/tiny-moe'?)"), line
    assert "hf download" not in line


def test_only_a_model_id_gets_the_download_hint(cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = invoke("inspect", "Qwen/Not-There").stderr.strip()
    assert "'Qwen/Not-There' is neither a folder nor a model in the local Hugging Face cache" in line
    assert "hf download Qwen/Not-There" in line
    assert invoke("inspect", "nope").stderr.strip() == "error: no such folder 'nope'; see 'vlconvert inspect --help'"
    (tmp_path / "runs").mkdir()
    line = invoke("inspect", "runs/step_1").stderr.strip()
    assert line.startswith("error: no such folder 'runs/step_1'") and "hf download" not in line
