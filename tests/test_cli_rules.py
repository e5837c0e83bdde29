"""Rules every command follows (issue 22, items 6-13): each test names the rule and checks it on every
command it applies to, comparing outputs, bytes and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from vlconvert.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
MOE = FIX / "tiny-moe"
DENSE = FIX / "tiny-dense-tied"
UNTIED = FIX / "tiny-dense-untied"


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def error_of(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def moe_dcp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rules") / "moe-dcp"
    assert invoke("convert", MOE, out, "--to", "dcp", "-q").exit_code == 0
    return out


# ------------------------------------------------------------------ item 6: weights vs config, model first
@pytest.mark.parametrize("args, weights, config", [
    (["DCP", "--to", "hf", "--assets-dir", DENSE], "MoE (8 experts)", "config dense"),
    (["DCP", "--to", "hf", "--assets-dir", DENSE, "--allow-missing", "--allow-unexpected"], "MoE (8 experts)",
     "config dense"),
    ([DENSE, "--to", "dcp", "--config", MOE / "config.json"], "weights dense", "config MoE (8 experts)"),
    ([UNTIED, "--to", "megatron", "--config", DENSE / "config.json"], "decoder layers 3", "decoder layers 2"),
])
def test_weights_and_config_of_different_models_are_named_first(tmp_path, moe_dcp, args, weights, config):
    args = [moe_dcp if a == "DCP" else a for a in args]
    line = error_of(invoke("convert", args[0], tmp_path / "o", *args[1:]), 1)
    assert "are different models" in line and weights in line and config in line, line
    assert "--allow-missing" not in line and "--allow-unexpected" not in line, line
    assert not (tmp_path / "o").exists()
