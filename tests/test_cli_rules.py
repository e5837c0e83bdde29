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

    with pytest.raises(UsageError) as caught:  # in the API's words (issue 22, item 13)
        Converter(MOE, tmp_path / "o", to="dcp", tp=2)
    assert str(caught.value) == "tp=2 applies only where to is 'megatron' or 'torch_dist', not to='dcp': drop it"


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


# ---------------------------------------------------------- item 9: one run, one set of numbers
@pytest.mark.parametrize("args", [
    ["convert", MOE, "OUT", "--to", "dcp"], ["convert", MOE, "OUT", "--to", "hf", "--max-shard-size", "300KB"],
    ["hf-to-megatron", MOE, "OUT", "--tp", "2"], ["convert", MOE, "OUT", "--to", "torch_dist"],
])
def test_dry_run_and_summary_count_the_same_files(tmp_path, args):
    args = [tmp_path / "o" if a == "OUT" else a for a in args]
    dry = json.loads(invoke(*args, "--dry-run", "--json").stdout)
    text = invoke(*args, "--dry-run").stdout
    assert text.splitlines()[-1].startswith(f"{dry['tensor_files']} file"), text
    done = json.loads(invoke(*args, "--json").stdout)
    on_disk = sum(1 for p in (tmp_path / "o").rglob("*") if p.is_file())
    assert done["tensor_files"] == dry["tensor_files"] and done["files"] == on_disk
    import shutil

    shutil.rmtree(tmp_path / "o")
    table = invoke(*args).stdout
    assert f"{on_disk} ({dry['tensor_files']} of tensors)" in table, table


def test_plan_counts_the_tensors_of_the_split_it_shows():
    """The ranks of a proposed pipeline split count the tensors the converter writes for that split."""
    proposed = json.loads(invoke("plan", "--config", UNTIED, "--to", "megatron", "--pp", "2", "--json").stdout)
    first, last = (proposed["pipeline"]["proposal"][k] for k in ("pp_first_layers", "pp_last_layers"))
    given = json.loads(invoke("plan", "--config", UNTIED, "--to", "megatron", "--pp", "2", "--pp-first-layers",
                              first, "--pp-last-layers", last, "--json").stdout)
    assert proposed["pipeline"]["stage_layers"] == given["pipeline"]["stage_layers"]
    assert [r["tensors"] for r in proposed["ranks"]] == [r["tensors"] for r in given["ranks"]]


def test_time_estimate_counts_start_up_and_checksums(tmp_path):
    data = json.loads(invoke("plan", "--config", MOE, "--to", "dcp", "--disk-speed", "1000000", "--json").stdout)
    disk = data["disk"]
    assert disk["estimated_seconds"] >= disk["startup_seconds"] > 0  # not "~0s" for a run that takes seconds
    rate = min(disk["speed_mib_s"], disk["checksum_mib_s"]) * 2**20
    assert disk["estimated_seconds"] == pytest.approx(disk["startup_seconds"] + data["total_bytes"] / rate, abs=0.11)


# ------------------------------------------------------------- item 12: binary units everywhere
def test_sizes_and_speeds_are_binary_everywhere(tmp_path):
    import re

    outputs = [invoke("plan", "--config", MOE, "--to", "dcp", "--target", tmp_path / "t").stdout,
               invoke("doctor", "--target", tmp_path / "t", "--config", MOE).stdout,
               invoke("convert", MOE, tmp_path / "o", "--to", "megatron", "--tp", "2").stdout]
    for text in outputs:
        assert re.search(r"\d (KiB|MiB|GiB)", text), text
        assert not re.search(r"\d ?(KB|MB|GB|TB)\b", text), text
        assert "MB/s" not in text


@pytest.mark.parametrize("spelling, limit", [("300KB", 300_000), ("300KiB", 300 * 1024), ("1MB", 10**6)])
def test_max_shard_size_takes_both_spellings_at_their_meaning(tmp_path, spelling, limit):
    data = json.loads(invoke("convert", MOE, tmp_path / "o", "--to", "hf", "--max-shard-size", spelling,
                             "--dry-run", "--json").stdout)
    sizes = [f["bytes"] for f in data["file_list"]]
    assert max(sizes) <= limit and len(sizes) > 1 or limit >= sum(sizes)
