"""``vlconvert doctor``: every verdict from given facts, the Conv3d == Linear proof, free disk."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vlconvert import doctor
from vlconvert.cli import main
from vlconvert.doctor import EnvFacts, check_conv3d, check_disk, check_square_experts, check_transformers

ROOT = Path(__file__).resolve().parents[1]
CPU = EnvFacts("2.13.0+cpu", None, False, None, "5.23.0", "transformers5", True)


@pytest.mark.parametrize(("torch_v", "cuda", "cudnn", "status"), [
    ("2.9.0+cu128", "12.8", 91002, "fail"),
    ("2.9.1+cu128", "12.8", 91002, "fail"),
    ("2.9.1+cu128", "12.8", 91500, "ok"),
    ("2.9.0+cu126", "12.6", 90701, "ok"),
    ("2.9.0+cu128", "12.8", None, "warn"),
    ("2.9.0+cpu", None, None, "warn"),
    ("2.10.0+cu128", "12.8", 91002, "ok"),
])
def test_conv3d_trap(torch_v: str, cuda: str | None, cudnn: int | None, status: str) -> None:
    finding = check_conv3d(replace(CPU, torch_version=torch_v, torch_cuda=cuda, cudnn_version=cudnn,
                                   cuda_available=cuda is not None))
    assert finding.status == status, finding
    if status != "ok":
        assert "reshape(hidden, 1536)" in finding.fix


def test_conv3d_equals_linear_and_a_wrong_flatten_does_not() -> None:
    assert doctor.conv3d_linear_max_diff() < 1e-9
    conv = torch.nn.Conv3d(3, 4, kernel_size=(2, 16, 16), stride=(2, 16, 16)).double()
    x = torch.randn(3, 1536, dtype=torch.float64)
    y = conv(x.view(-1, 3, 2, 16, 16)).view(-1, 4)
    wrong = torch.nn.functional.linear(x, conv.weight.permute(0, 2, 1, 3, 4).reshape(4, -1), conv.bias)
    assert (y - wrong).abs().max() > 1e-3


def test_transformers_checks_and_the_installed_one() -> None:
    assert check_transformers(replace(CPU, moe_conversion_mapping=False)).status == "fail"
    assert check_transformers(replace(CPU, transformers_version="4.56.2")).status == "fail"
    assert check_transformers(replace(CPU, transformers_version="4.57.1", runtime_experts="released",
                                      moe_conversion_mapping=None)).status == "ok"
    facts = doctor.collect_facts()
    from vlconvert.models.qwen3vl import build_skeleton

    sk = build_skeleton(ROOT / "fixtures" / "tiny-moe" / "config.json")
    assert facts.runtime_experts == sk.runtime_experts
    # tiny-moe: E 8, H 64, I 48 -> released [8, 64, 96], transformers 5 run time [8, 96, 64]
    expected = (8, 96, 64) if facts.runtime_experts == "transformers5" else (8, 64, 96)
    assert sk.tensors["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == expected
    assert check_transformers(facts).status == "ok"


def test_square_expert_dims_warn(tmp_path: Path) -> None:
    cfg = json.loads((ROOT / "fixtures" / "tiny-moe" / "config.json").read_text())
    assert check_square_experts(cfg).status == "ok"
    cfg["text_config"]["moe_intermediate_size"] = cfg["text_config"]["hidden_size"] // 2
    finding = check_square_experts(cfg)
    assert finding.status == "warn" and "2I == H" in finding.message


def test_free_disk(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    assert check_disk(tmp_path / "new" / "out", free * 2).status == "fail"
    assert check_disk(tmp_path, 1).status == "ok"


def test_doctor_cli_exits_nonzero_on_a_blocking_trap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = replace(CPU, torch_version="2.9.0+cu128", torch_cuda="12.8", cuda_available=True, cudnn_version=91002)
    monkeypatch.setattr(doctor, "collect_facts", lambda: bad)
    result = CliRunner().invoke(main, ["doctor", "--json"], catch_exceptions=False)
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert not data["ok"] and data["findings"][0]["status"] == "fail"
    monkeypatch.setattr(doctor, "collect_facts", lambda: CPU)
    cfg = ROOT / "fixtures" / "configs" / "Qwen3-VL-2B-Instruct.json"
    result = CliRunner().invoke(main, ["doctor", "--json", "--target", str(tmp_path / "o"), "--config", str(cfg)],
                                catch_exceptions=False)
    data = json.loads(result.stdout)
    disk = next(f for f in data["findings"] if f["name"] == "free disk")
    assert (disk["status"] == "fail") == (shutil.disk_usage(tmp_path).free < 2 * 2_127_532_032)
    assert result.exit_code == (1 if disk["status"] == "fail" else 0)


def test_doctor_and_retag_say_which_families_they_apply_to() -> None:
    """Issue 23: each model-specific doctor check names the model types it concerns (text and JSON), derived from
    the registry (Conv3d: the families with a vision tower; expert orientation: the one whose fused experts
    transpose); retag-think's help lists every registered family, the same list retag.applies_to() gives."""
    import json as _json

    from click.testing import CliRunner

    from vlconvert.cli import main
    from vlconvert.models.registry import FAMILIES
    from vlconvert.retag import applies_to as retag_applies_to

    config = str(ROOT / "fixtures" / "tiny-moe" / "config.json")
    result = CliRunner().invoke(main, ["doctor", "--json", "--config", config])
    findings = {f["name"]: f["applies_to"] for f in _json.loads(result.stdout)["findings"]}
    with_vision = [t for f in FAMILIES if f.hf_vision_prefix is not None for t in f.model_types]
    assert findings["torch Conv3d"] == findings["Conv3d == Linear"] == with_vision
    assert "qwen3" not in with_vision and "qwen2_5_vl" in with_vision and "qwen3_5_moe" in with_vision
    assert findings["transformers experts"] == findings["square experts"] == ["qwen3_vl_moe"]
    assert findings["torch build"] == []  # concerns every family
    text = CliRunner().invoke(main, ["doctor", "--config", config]).output
    assert f"applies to: {', '.join(with_vision)}" in text and "applies to: qwen3_vl_moe" in text

    help_text = " ".join(CliRunner().invoke(main, ["retag-think", "--help"]).output.split())
    assert f"({', '.join(retag_applies_to())})" in help_text
    assert set(retag_applies_to()) == {t for f in FAMILIES for t in f.model_types}
