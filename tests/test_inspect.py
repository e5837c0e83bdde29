"""``vlconvert inspect``: layout, model, parallel sizes, counts, orientation and inconsistencies, per layout."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from vlconvert.cli import main
from vlconvert.inspection import KNOWN_MODELS, identify_model, skeleton_parameter_counts
from vlconvert.models.qwen3vl import build_skeleton, load_config
from vlconvert.sources import detect_layout

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "fixtures" / "configs"


def _cli(path: Path, *extra: str, expect: int = 0) -> dict:
    result = CliRunner().invoke(main, ["inspect", str(path), *extra, "--json"], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout)


def _header_counts(folder: Path) -> tuple[int, int, bool]:
    """(parameters, bytes, has lm_head) straight from the safetensors headers."""
    params = nbytes = 0
    names = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                n = math.prod(f.get_slice(k).get_shape())
                params += n
                nbytes += 2 * n
                names.add(k)
    return params, nbytes, "lm_head.weight" in names


@pytest.mark.parametrize(("fixture", "tied", "orientation"), [
    ("tiny-dense-tied", True, None), ("tiny-dense-untied", False, None),
    ("tiny-moe", False, "released"), ("tiny-moe-tf5", False, "transformers5"),
])
def test_inspect_hf_fixtures(fixtures_dir: Path, fixture: str, tied: bool, orientation: str | None) -> None:
    folder = fixtures_dir / fixture
    data = _cli(folder)
    params, nbytes, has_head = _header_counts(folder)
    assert data["layout"] == "hf" and data["files"] == 3
    assert data["parameters"]["total"] == params and data["tensor_bytes"] == nbytes
    assert data["dtypes"] == {"bfloat16": nbytes}
    assert data["tied_embeddings"] == {"config": tied, "lm_head_stored": has_head} and has_head is not tied
    assert data.get("experts_orientation") == orientation
    assert data["inconsistencies"] == []
    info = load_config(folder / "config.json")
    assert data["family"] == info.family
    if info.is_moe:  # active = all but the unused (E - k)/E of the expert weights
        expert = info.layers * info.experts * 3 * info.hidden * info.moe_intermediate
        active = params - expert + expert * info.experts_per_token // info.experts
        assert data["parameters"]["active_per_token"] == active
    tags = json.dumps(data["think_tags"])
    assert "<think>" in tags and "2024" in tags


def test_known_model_table_matches_fixture_configs() -> None:
    names = {p.name: identify_model(load_config(p)) for p in CONFIGS.glob("*.json")}
    assert names == {f"{n}-Instruct.json": n for n in KNOWN_MODELS}


def test_235b_counts() -> None:
    counts = skeleton_parameter_counts(build_skeleton(CONFIGS / "Qwen3-VL-235B-A22B-Instruct.json"))
    assert counts["total"] == 235_670_022_896  # reference sheet §1.4
    expert = 94 * 128 * 3 * 4096 * 1536
    assert counts["experts"] == expert
    assert counts["active_per_token"] == 235_670_022_896 - expert * 120 // 128  # ~22.8B: "A22B"


def test_inspect_dcp_and_megatron(tmp_path: Path, fixtures_dir: Path) -> None:
    from vlconvert.dcp_convert import hf_to_dcp
    from vlconvert.megatron_convert import hf_to_megatron

    src = fixtures_dir / "tiny-moe"
    hf_to_dcp(src, tmp_path / "dcp")
    hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2, ep=4)
    params, nbytes, _ = _header_counts(src)
    assert detect_layout(tmp_path / "dcp") == "dcp" and detect_layout(tmp_path / "meg") == "megatron"
    dcp = _cli(tmp_path / "dcp")
    assert dcp["layout"] == "dcp" and dcp["parameters"]["total"] == params and dcp["tensor_bytes"] == nbytes
    assert dcp["dcp_writer_ranks"] == 1 and dcp["experts_orientation_stored"] == "transformers5"
    meg = _cli(tmp_path / "meg", "--assets-dir", str(src))
    assert meg["layout"] == "megatron" and meg["parameters"]["total"] == params
    assert {k: meg["parallel"][k] for k in ("tp", "pp", "ep", "etp")} == {"tp": 2, "pp": 2, "ep": 4, "etp": 2}
    assert meg["files"] == 16 and meg["inconsistencies"] == []


@pytest.mark.parametrize("experts", ["sequential", "grouped"])
def test_inspect_torch_dist_counts_files_and_says_how_experts_are_stored(tmp_path: Path, fixtures_dir: Path,
                                                                         experts: str) -> None:
    """A torch_dist checkpoint: its data files counted (was '? files'), the experts row filled (was missing)."""
    src = fixtures_dir / "tiny-moe"
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "td"), "--to", "torch_dist",
                                       "--experts", experts, "-q"])
    assert result.exit_code == 0, result.output
    params, nbytes, _ = _header_counts(src)
    report = _cli(tmp_path / "td")
    data_files = list((tmp_path / "td").rglob("*.distcp"))
    assert report["layout"] == "torch_dist" and report["parameters"]["total"] == params
    assert report["files"] == len(data_files) >= 1 and report["iteration"] == "0"  # iter_0000000
    assert report["experts_orientation"] == "megatron per-expert [out, in] (global, sequential or grouped modules)"
    table = CliRunner().invoke(main, ["inspect", str(tmp_path / "td")]).output
    assert "? files" not in table and f"in {len(data_files)} file" in table and "experts" in table


def test_inspect_reports_config_inconsistencies(tmp_path: Path, fixtures_dir: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(fixtures_dir / "tiny-dense-untied", copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    cfg["text_config"]["tie_word_embeddings"] = True
    cfg["text_config"]["num_hidden_layers"] += 1
    (copy / "config.json").write_text(json.dumps(cfg))
    data = _cli(copy, expect=1)
    text = " | ".join(data["inconsistencies"])
    assert "tied embeddings but lm_head.weight is stored" in text
    assert "tensors of the config are missing" in text


def test_inspect_unknown_folder_is_one_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "holds no safetensors" in result.output


def test_inspect_rows_reads_think_tag_norms_only_when_asked():
    from helpers import load_hf_tensors

    from vlconvert.inspection import inspect_checkpoint

    folder = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moe"
    plain = inspect_checkpoint(folder)
    assert all("embedding_norm" not in row for tag in plain["think_tags"]["tags"] for row in tag["rows"])
    report = inspect_checkpoint(folder, rows=True)
    think = next(t for t in report["think_tags"]["tags"] if t["text"] == "<think>")
    assert think["atomic"] and think["ids"] == [2024]
    embed = load_hf_tensors(folder)["model.language_model.embed_tokens.weight"].float()
    expected = float(embed[2024].norm())
    assert abs(think["rows"][0]["embedding_norm"] - expected) < 1e-4 * expected
    median = float(embed[:2000].norm(dim=1).median())
    assert abs(think["rows"][0]["embedding_ratio"] - expected / median) < 1e-4
