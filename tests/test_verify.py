"""``vlconvert verify``: tensor by tensor across layouts; a flipped bit, a transposed expert, a missing tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from vlconvert.cli import main
from vlconvert.comparison import compare_tensors, verify
from vlconvert.layouts.hf import read_header

GATE_UP = "model.language_model.layers.1.mlp.experts.gate_up_proj"


def _cli(*args, expect: int = 0) -> dict:
    result = CliRunner().invoke(main, ["verify", *[str(a) for a in args], "--json"], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout)


def _shard_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def rewrite_tensor(folder: Path, name: str, change) -> None:
    """Replace ``name`` in its shard by ``change(tensor)`` (None drops it) and fix the index."""
    shard = _shard_of(folder, name)
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    new = change(tensors[name])
    if new is None:
        removed = tensors.pop(name)
        index_path = folder / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        del index["weight_map"][name]
        index["metadata"]["total_size"] -= removed.nbytes
        index_path.write_text(json.dumps(index))
    else:
        tensors[name] = new
    save_file(tensors, str(shard), metadata={"format": "pt"})


def copy_without(src: Path, dst: Path, name: str) -> Path:
    """A copy of an HF folder lacking tensor ``name``."""
    shutil.copytree(src, dst)
    rewrite_tensor(dst, name, lambda t: None)
    return dst


def test_same_weights_in_both_expert_orientations_are_equal(fixtures_dir: Path) -> None:
    data = _cli(fixtures_dir / "tiny-moe", fixtures_dir / "tiny-moe-tf5")
    assert data["ok"] and data["counts"] == {"equal": 70} and data["max_abs_diff"] == 0.0
    assert data["layout_a"] == data["layout_b"] == "hf"


def test_single_flipped_bit_is_found(tmp_path: Path, fixtures_dir: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(fixtures_dir / "tiny-dense-untied", copy)
    name = "model.language_model.layers.0.self_attn.o_proj.weight"
    tensors, _ = read_header(_shard_of(copy, name))
    info = tensors[name]
    with open(info.file, "r+b") as f:  # flip the lowest mantissa bit of element 37, in place
        f.seek(info.start + 2 * 37)
        byte = f.read(1)[0]
        f.seek(info.start + 2 * 37)
        f.write(bytes([byte ^ 0x01]))
    data = _cli(fixtures_dir / "tiny-dense-untied", copy, expect=1)
    bad = [t for t in data["tensors"] if t["status"] != "equal"]
    assert [(t["name"], t["status"]) for t in bad] == [(name, "mismatch")]
    assert 0 < bad[0]["max_abs_diff"] < 1e-2
    # a tolerance above that difference accepts it, and says so
    ok = _cli(fixtures_dir / "tiny-dense-untied", copy, "--tolerance", "0.01")
    assert ok["counts"]["within_tolerance"] == 1


def test_transposed_expert_is_found(tmp_path: Path, fixtures_dir: Path) -> None:
    """The classic converter bug: experts written transposed but reshaped back to the expected shape."""
    copy = tmp_path / "copy"
    shutil.copytree(fixtures_dir / "tiny-moe", copy)
    rewrite_tensor(copy, GATE_UP, lambda t: t.transpose(1, 2).contiguous().reshape(t.shape))
    data = _cli(fixtures_dir / "tiny-moe-tf5", copy, expect=1)
    bad = {t["name"]: t for t in data["tensors"] if t["status"] != "equal"}
    assert list(bad) == [GATE_UP] and bad[GATE_UP]["status"] == "mismatch" and bad[GATE_UP]["max_abs_diff"] > 0


def test_one_transposed_expert_in_released_orientation_is_found(tmp_path: Path, fixtures_dir: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(fixtures_dir / "tiny-moe", copy)
    down = "model.language_model.layers.0.mlp.experts.down_proj"

    def swap_expert(t: torch.Tensor) -> torch.Tensor:  # expert 3 stored as expert 4's and vice versa
        t = t.clone()
        t[[3, 4]] = t[[4, 3]]
        return t
    rewrite_tensor(copy, down, swap_expert)
    data = _cli(copy, fixtures_dir / "tiny-moe", expect=1)
    assert [t["name"] for t in data["tensors"] if t["status"] == "mismatch"] == [down]


def test_missing_tensor_is_found(tmp_path: Path, fixtures_dir: Path) -> None:
    name = "model.visual.merger.linear_fc2.bias"
    copy = copy_without(fixtures_dir / "tiny-dense-tied", tmp_path / "copy", name)
    data = _cli(fixtures_dir / "tiny-dense-tied", copy, expect=1)
    bad = [(t["name"], t["status"]) for t in data["tensors"] if t["status"] != "equal"]
    assert bad == [(name, "missing_in_b")]
    data = _cli(copy, fixtures_dir / "tiny-dense-tied", expect=1)
    assert [(t["name"], t["status"]) for t in data["tensors"] if t["status"] != "equal"] == [(name, "missing_in_a")]


def test_dtype_change_needs_no_tolerance_when_exact(tmp_path: Path, fixtures_dir: Path) -> None:
    copy = tmp_path / "fp32"
    shutil.copytree(fixtures_dir / "tiny-dense-tied", copy)
    for shard in copy.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
        name = "model.language_model.norm.weight"
        if name in tensors:
            tensors[name] = tensors[name] + 1e-3  # one real change, not representable in bf16
        save_file(tensors, str(shard), metadata={"format": "pt"})
    index = copy / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["metadata"]["total_size"] *= 2
    index.write_text(json.dumps(data))
    report = verify(fixtures_dir / "tiny-dense-tied", copy)
    statuses = {t.name: t.status for t in report.tensors}
    assert statuses.pop("model.language_model.norm.weight") == "mismatch"
    assert set(statuses.values()) == {"equal"}  # bf16 -> fp32 is exact
    assert verify(fixtures_dir / "tiny-dense-tied", copy, tolerance=2e-3).ok


def test_compare_tensors_bits_and_nans() -> None:
    z = torch.zeros(4)
    assert compare_tensors("x", z, -z).status == "mismatch"  # -0.0 differs in bits
    n = torch.tensor([1.0, float("nan")])
    assert compare_tensors("x", n, n.clone()).status == "equal"
    r = compare_tensors("x", n, torch.tensor([1.0, 2.0]))
    assert r.status == "mismatch" and r.max_abs_diff == float("inf")
    assert compare_tensors("x", torch.ones(2, 3), torch.ones(3, 2)).status == "shape_mismatch"


@pytest.mark.parametrize("fixture", ["tiny-moe", "tiny-dense-tied"])
def test_hf_against_dcp_and_megatron(tmp_path: Path, fixtures_dir: Path, fixture: str) -> None:
    from vlconvert.dcp_convert import hf_to_dcp
    from vlconvert.megatron_convert import hf_to_megatron

    src = fixtures_dir / fixture
    hf_to_dcp(src, tmp_path / "dcp")
    hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2, ep=2 if "moe" in fixture else 1)
    for a, b in ((src, tmp_path / "dcp"), (src, tmp_path / "meg"), (tmp_path / "meg", tmp_path / "dcp")):
        data = _cli(a, b)
        assert data["ok"] and set(data["counts"]) == {"equal"}
    # one flipped element in the HF source shows up against both converted layouts
    copy = tmp_path / "bad"
    shutil.copytree(src, copy)
    name = "model.language_model.embed_tokens.weight"
    rewrite_tensor(copy, name, lambda t: t.index_put((torch.tensor([5]), torch.tensor([7])), -t[5, 7] - 1))
    for other in (tmp_path / "dcp", tmp_path / "meg"):
        data = _cli(copy, other, expect=1)
        assert [t["name"] for t in data["tensors"] if t["status"] != "equal"] == [name]


@pytest.mark.parametrize("to", ["dcp", "megatron"])
def test_stored_bytes_are_compared_as_bytes_and_a_changed_one_is_still_found(fixtures_dir: Path, tmp_path: Path,
                                                                           to: str) -> None:
    """Rows both sides store verbatim are compared as file bytes (no tensors, no torch); a bit flipped in one
    tensor's stored bytes then takes the tensor comparison, which names that tensor and its difference."""
    from helpers import run_cli

    from vlconvert.comparison import stored_bytes_equal
    from vlconvert.models.megatron_table import Src
    from vlconvert.sources import open_source

    tied = fixtures_dir / "tiny-dense-tied"
    out = tmp_path / to
    run_cli("convert", tied, out, "--to", to, *(["--tp", "2"] if to == "megatron" else []), "-q")
    a, b = open_source(tied), open_source(out, assets_dir=tied)
    name = "model.language_model.embed_tokens.weight"  # its rows split over TP: one span per rank file
    assert stored_bytes_equal(a, b, name, a.spec(name)[0])
    span = a.row_span(Src(name), 0, 1)  # the HF side: flip a bit of its first row in a copy of the folder
    a.close()
    b.close()
    copy = tmp_path / "hf"
    shutil.copytree(tied, copy)
    target = copy / span.path.name
    data = bytearray(target.read_bytes())
    data[span.offset + 1] ^= 0x10
    target.write_bytes(bytes(data))
    report = _cli(copy, out, "--assets-dir", tied, expect=1)
    bad = [t for t in report["tensors"] if t["status"] != "equal"]
    assert [t["name"] for t in bad] == [name] and bad[0]["status"] == "mismatch" and bad[0]["max_abs_diff"] > 0


def test_assembled_rows_and_experts_are_compared_as_bytes_without_torch(fixtures_dir: Path, tmp_path: Path) -> None:
    """Against a Megatron checkpoint at tp 2 ep 2, a row-parallel weight (its columns on two rank files) and the
    fused experts (one [out, in] matrix per expert, turned from the HF side's [in, out]) are put together as
    bytes: verify imports no torch; a bit flipped in one expert still takes the tensor comparison and is named."""
    import subprocess
    import sys

    from helpers import CLI_PROBE, run_cli

    from vlconvert.comparison import assembled_bytes_equal
    from vlconvert.sources import open_source

    moe = fixtures_dir / "tiny-moe"
    out = tmp_path / "meg"
    run_cli("convert", moe, out, "--to", "megatron", "--tp", "2", "--ep", "2", "-q")
    a, b = open_source(moe), open_source(out, assets_dir=moe)
    o_proj = "model.language_model.layers.0.self_attn.o_proj.weight"
    for name in (o_proj, GATE_UP):
        shape, dtype = a.spec(name)
        assert assembled_bytes_equal(a, b, name, tuple(shape), dtype), name
    a.close()
    b.close()
    result = subprocess.run([sys.executable, "-c", CLI_PROBE, "verify", str(moe), str(out), "--assets-dir", str(moe)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert "EXIT: 0" in result.stdout and "TORCH: False" in result.stdout, result.stdout + result.stderr
    assert "70 equal" in result.stdout
    copy = tmp_path / "hf"
    shutil.copytree(moe, copy)
    rewrite_tensor(copy, GATE_UP, lambda t: t.index_put((torch.tensor([5]), torch.tensor([1]), torch.tensor([2])),
                                                        -t[5, 1, 2] - 1))
    report = _cli(copy, out, "--assets-dir", moe, expect=1)
    bad = [t for t in report["tensors"] if t["status"] != "equal"]
    assert [t["name"] for t in bad] == [GATE_UP] and bad[0]["status"] == "mismatch" and bad[0]["max_abs_diff"] > 0
