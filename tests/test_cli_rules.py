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


# ------------------------------------------------------- item 7: an option that does nothing is refused
@pytest.mark.parametrize("args, flag", [
    (["convert", MOE, "OUT", "--to", "dcp", "--tp", "2"], "--tp 2"),
    (["convert", MOE, "OUT", "--to", "hf", "--ep", "2"], "--ep 2"),
    (["convert", MOE, "OUT", "--to", "hf", "--iteration", "5"], "--iteration 5"),
    (["convert", MOE, "OUT", "--to", "megatron", "--prefix", "model."], "--prefix model."),
    (["convert", MOE, "OUT", "--to", "dcp", "--max-shard-size", "1GB"], "--max-shard-size 1GB"),
    (["convert", MOE, "OUT", "--to", "hf", "--no-tied-lm-head"], "--no-tied-lm-head"),
    (["convert", MOE, "OUT", "--to", "megatron", "--allow-missing"], "--allow-missing"),
    (["convert", MOE, "OUT", "--to", "torch_dist", "--experts-layout", "released"], "--experts-layout released"),
    (["plan", "--config", MOE, "--to", "dcp", "--tp", "2"], "--tp 2"),
    (["plan", "--config", MOE, "--to", "megatron", "--max-shard-size", "1GB"], "--max-shard-size 1GB"),
    (["plan", "--config", MOE, "--to", "hf", "--for", "mbridge"], "--for mbridge"),
    (["doctor", "--target", "OUT", "--config", MOE, "--ep", "2"], "--ep 2"),
    (["doctor", "--tp", "2"], "--tp"),
    (["verify", "--manifest", MOE, "--tolerance", "0.1"], "--tolerance"),
    (["dcp-to-hf", "DCP", "OUT", "--assets-dir", MOE, "--prefix", "model."], "--src-prefix model."),
])
def test_an_option_that_does_not_apply_is_a_usage_error(tmp_path, moe_dcp, args, flag):
    args = [tmp_path / "o" if a == "OUT" else moe_dcp if a == "DCP" else a for a in args]
    line = error_of(invoke(*args), 2)
    assert flag in line and line.endswith("--help'"), line
    assert not (tmp_path / "o").exists()


def test_an_option_at_its_default_or_for_its_target_is_accepted(tmp_path):
    assert invoke("convert", MOE, tmp_path / "o", "--to", "dcp", "--tp", "1", "--dry-run", "-q").exit_code == 0
    assert invoke("convert", MOE, tmp_path / "o", "--to", "torch_dist", "--tp", "2", "--dry-run", "-q").exit_code == 0
    assert invoke("plan", "--config", MOE, "--to", "megatron", "--tp", "2", "--ep", "2", "-q").exit_code == 0


def test_api_refuses_an_option_that_does_not_apply(tmp_path):
    from vlconvert import Converter
    from vlconvert.errors import UsageError

    with pytest.raises(UsageError, match="applies to --to megatron and torch_dist only"):
        Converter(MOE, tmp_path / "o", to="dcp", tp=2)


def test_prefix_has_one_meaning(tmp_path):
    """--prefix is the key prefix a DCP output gets; the prefix stripped from a DCP source is --src-prefix,
    in convert and dcp-to-hf alike: the same bytes either way."""
    dcp = tmp_path / "dcp"
    assert invoke("hf-to-dcp", DENSE, dcp, "--prefix", "model.", "-q").exit_code == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke("dcp-to-hf", dcp, a, "--assets-dir", DENSE, "--src-prefix", "model.", "-q").exit_code == 0
    assert invoke("convert", dcp, b, "--to", "hf", "--assets-dir", DENSE, "--src-prefix", "model.",
                  "-q").exit_code == 0
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.glob("*.safetensors"):
        assert p.read_bytes() == (b / p.name).read_bytes()


# ------------------------------------------- item 8: no output path is printed that was not written
def test_retag_of_a_retagged_source_names_no_output_it_did_not_write(tmp_path):
    rt1, rt2 = tmp_path / "rt1", tmp_path / "rt2"
    assert invoke("retag-think", MOE, "--out", rt1, "-q").exit_code == 0
    result = invoke("retag-think", rt1, "--out", rt2)
    assert result.exit_code == 0, result.output
    assert not rt2.exists() and str(rt2) not in result.stdout
    assert f"none written (use {rt1} as it is)" in result.stdout
    record = json.loads(invoke("retag-think", rt1, "--out", rt2, "--json").stdout)
    assert record["output"] is None and record["retagged"] == str(rt1) and record["changed"] is False
    # the output itself already retagged from this source: that output is named, and it exists
    record = json.loads(invoke("retag-think", MOE, "--out", rt1, "--json").stdout)
    assert record["output"] == str(rt1) and record["changed"] is False
