"""``vlconvert plan``: byte totals from the config alone, Megatron checks and ranks, no weight memory."""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from vlconvert.cli import main
from vlconvert.models.qwen3vl import build_skeleton, is_expert
from vlconvert.planning import plan_conversion, propose_pp_split, stage_layer_counts

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "fixtures" / "configs"
C235 = CONFIGS / "Qwen3-VL-235B-A22B-Instruct.json"
# reference/qwen3vl-hf.md §1.4: total parameters per released size
REFERENCE_PARAMS = {
    "Qwen3-VL-2B-Instruct.json": 2_127_532_032, "Qwen3-VL-4B-Instruct.json": 4_437_815_808,
    "Qwen3-VL-8B-Instruct.json": 8_767_123_696, "Qwen3-VL-32B-Instruct.json": 33_357_390_064,
    "Qwen3-VL-30B-A3B-Instruct.json": 31_070_754_032, "Qwen3-VL-235B-A22B-Instruct.json": 235_670_022_896,
}


def _cli(*args: str, expect: int = 0) -> dict:
    result = CliRunner().invoke(main, [str(a) for a in args] + ["--json"], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_plan_hf_and_dcp_totals_equal_config_shapes_and_reference(name: str) -> None:
    skeleton = build_skeleton(CONFIGS / name)
    shape_sum = sum(math.prod(skeleton.tensors[k].shape) for k in skeleton.hf_keys())
    assert shape_sum == REFERENCE_PARAMS[name]
    plan = plan_conversion(CONFIGS / name, "hf")
    assert plan.ok and plan.dtype == "bfloat16"
    assert plan.config_bytes == plan.total_bytes == sum(f.bytes for f in plan.files) == 2 * REFERENCE_PARAMS[name]
    assert all(f.bytes <= 5 * 10**9 or f.tensors == 1 for f in plan.files)
    assert sum(f.tensors for f in plan.files) == len(skeleton.hf_keys())
    dcp = plan_conversion(CONFIGS / name, "dcp")
    tied_copy = 2 * math.prod(skeleton.tensors["lm_head.weight"].shape) if skeleton.info.tied else 0
    assert dcp.total_bytes == 2 * REFERENCE_PARAMS[name] + tied_copy


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_plan_megatron_every_config(name: str) -> None:
    plan = plan_conversion(CONFIGS / name, "megatron", tp=2, pp=2, ep=2 if "A" in name.split("-")[3] else 1)
    skeleton = build_skeleton(CONFIGS / name)
    info = skeleton.info
    assert plan.vocab["padded_rows"] == 152064  # reference §4: TP2 -> 152064
    pad = (152064 - 151936) * info.hidden * 2 * (1 if info.tied else 2)
    tied_copy = 152064 * info.hidden * 2 if info.tied else 0  # the last stage's own (padded) output_layer
    assert plan.vocab["pad_bytes"] == pad
    assert plan.source["unique_bytes"] == plan.config_bytes + pad + tied_copy
    assert sum(plan.pipeline["stage_layers"]) == info.layers
    assert len(plan.ranks) == 2 * 2 * (2 if info.is_moe else 1)


def test_235b_tp4_pp2_ep16_ranks_bytes_and_experts() -> None:
    data = _cli("plan", "--config", C235, "--to", "megatron", "--tp", 4, "--pp", 2, "--ep", 16, "--disk-speed", 1000)
    assert data["ok"] and data["model"] == "Qwen3-VL-235B-A22B"
    assert data["config_bytes"] == 2 * REFERENCE_PARAMS["Qwen3-VL-235B-A22B-Instruct.json"]
    assert data["parallel"]["rank_folders"] == 4 * 2 * 16 == len(data["ranks"])
    assert data["experts"]["per_ep_rank"] == 8
    assert data["vocab"] == {"rows": 151936, "padded_rows": 152064, "pad_rows": 128, "divisible_by": 512,
                             "pad_bytes": 128 * 4096 * 2 * 2}
    assert data["pipeline"]["stage_layers"] == [47, 47]
    # independent total (reference §4): every EP folder repeats the non-expert tensors; TP splits them except
    # the replicated ones (norms, row biases, router, patch/pos embed), which every TP folder holds whole;
    # experts are split across EP and ETP (= TP), so held once
    skeleton = build_skeleton(C235)
    size = {n: 2 * math.prod(s.shape) for n, s in skeleton.tensors.items()}
    expert = sum(b for n, b in size.items() if is_expert(n))
    whole = ("mlp.gate.weight", "patch_embed.proj.weight", "pos_embed.weight")
    replicated = sum(b for n, b in size.items() if n.endswith(whole) or (
        len(skeleton.tensors[n].shape) == 1 and not n.endswith(("qkv.bias", "linear_fc1.bias"))))
    split = sum(size.values()) - expert - replicated
    assert data["total_bytes"] == 16 * (split + data["vocab"]["pad_bytes"] + 4 * replicated) + expert
    assert data["source"]["unique_bytes"] == data["config_bytes"] + data["vocab"]["pad_bytes"]
    ranks = {(r["tp"], r["pp"], r["ep"]): r for r in data["ranks"]}
    assert ranks[(0, 0, 0)]["folder"] == "release/mp_rank_00_000_000/model_optim_rng.pt"
    assert ranks[(3, 1, 15)]["experts"] == [120, 127] and ranks[(3, 1, 15)]["layers"] == [47, 93]
    assert ranks[(0, 0, 0)]["bytes"] > ranks[(0, 1, 0)]["bytes"]  # vision tower and embedding on stage 0
    disk = data["disk"]  # issue 22 items 9 and 12: MiB/s, and start-up plus the slower of disk and sha256
    rate = min(1000, disk["checksum_mib_s"]) * 2**20
    assert disk["speed_mib_s"] == 1000
    assert disk["estimated_seconds"] == pytest.approx(disk["startup_seconds"] + data["total_bytes"] / rate, abs=0.11)


def test_235b_pp8_proposes_first_last_and_plans_with_them() -> None:
    data = _cli("plan", "--config", C235, "--to", "megatron", "--tp", 4, "--pp", 8, "--ep", 16, expect=1)
    failed = [c for c in data["checks"] if not c["ok"] and c["blocking"]]
    assert [c["name"] for c in failed] == ["pp layers"]
    assert "do not divide by pp 8" in failed[0]["message"]
    assert "--pp-first-layers 11 --pp-last-layers 11" in failed[0]["message"]
    # 94 = 11 + 6*12 + 11: stage 0 adds vision + embedding (~0.5 layer), the last stage the head (~0.25 layer)
    assert data["pipeline"]["proposal"]["stage_layers"] == [11, 12, 12, 12, 12, 12, 12, 11]
    good = _cli("plan", "--config", C235, "--to", "megatron", "--tp", 4, "--pp", 8, "--ep", 16,
                "--pp-first-layers", 11, "--pp-last-layers", 11)
    assert good["ok"] and good["pipeline"]["stage_layers"] == [11, 12, 12, 12, 12, 12, 12, 11]
    layers = {r["pp"]: r["layers"] for r in good["ranks"]}
    assert layers[0] == [0, 10] and layers[1] == [11, 22] and layers[7] == [83, 93]


def test_stage_split_rules() -> None:
    assert stage_layer_counts(94, 2) == [47, 47]
    assert stage_layer_counts(94, 4, 22, 24) == [22, 24, 24, 24]
    assert stage_layer_counts(94, 8, first=10) == [10, 12, 12, 12, 12, 12, 12, 12]
    with pytest.raises(ValueError, match="do not divide"):
        stage_layer_counts(94, 4)
    with pytest.raises(ValueError):
        stage_layer_counts(94, 8, 11, 12)  # 71 left for 6 stages
    # uniform layers, no extras: the proposal is the most even split
    assert propose_pp_split([1] * 12, 4, 0, 0)[2] == [3, 3, 3, 3]
    # a heavy first stage gets fewer layers
    assert propose_pp_split([10] * 10, 2, 40, 0)[:2] == (3, 7)


@pytest.mark.parametrize(("config", "opts", "failing"), [
    ("Qwen3-VL-235B-A22B-Instruct.json", {"ep": 3}, "experts % ep"),
    ("Qwen3-VL-30B-A3B-Instruct.json", {"tp": 6}, "kv groups vs tp"),
    ("Qwen3-VL-8B-Instruct.json", {"tp": 3}, "heads % tp"),
    ("Qwen3-VL-235B-A22B-Instruct.json", {"tp": 4, "etp": 3}, "tp % etp"),
])
def test_megatron_checks_fail(config: str, opts: dict, failing: str) -> None:
    plan = plan_conversion(CONFIGS / config, "megatron", **opts)
    assert not plan.ok
    assert failing in [c.name for c in plan.failed]


@pytest.mark.parametrize(("name", "opts"), [
    ("Qwen3-VL-235B-A22B-Instruct.json", {"tp": 4, "pp": 2, "ep": 16}),
    ("Qwen3-VL-2B-Instruct.json", {"tp": 2, "pp": 2}),  # tied: the last stage has its own output_layer
    ("Qwen3-VL-30B-A3B-Instruct.json", {"tp": 8, "pp": 4, "ep": 8, "etp": 1}),
    ("Qwen3-VL-8B-Instruct.json", {"tp": 4, "pp": 3, "pp_first_layers": 11, "pp_last_layers": 13}),
])
def test_rank_bytes_equal_the_megatron_converters_rank_plan(name: str, opts: dict) -> None:
    from vlconvert.megatron_convert import plan_megatron_ranks

    plan = plan_conversion(CONFIGS / name, "megatron", **opts)
    assert plan.ok, [c.message for c in plan.failed]
    theirs = {(r.tp, r.pp, r.ep): (r.nbytes, len(r.tensors)) for r in plan_megatron_ranks(CONFIGS / name, **opts).ranks}
    assert {(r.tp, r.pp, r.ep): (r.bytes, r.tensors) for r in plan.ranks} == theirs


def test_tp8_on_four_kv_groups_is_allowed_with_a_warning() -> None:
    plan = plan_conversion(C235, "megatron", tp=8, ep=8)
    assert plan.ok
    assert plan.vocab["padded_rows"] == 152576
    warn = [c for c in plan.checks if c.name == "tp > kv groups"]
    assert warn and not warn[0].blocking


def test_plan_hf_matches_what_dcp_to_hf_writes(tmp_path: Path, fixtures_dir: Path) -> None:
    from vlconvert.dcp_convert import dcp_to_hf, hf_to_dcp

    src = fixtures_dir / "tiny-moe-tf5"
    dcp = tmp_path / "dcp"
    hf_to_dcp(src, dcp)
    plan_dcp = _cli("plan", "--config", src / "config.json", "--to", "dcp", "--source", src)
    from vlconvert.layouts.dcp import DCPReader

    reader = DCPReader(dcp)
    per_file: dict[str, int] = {}
    for entry in reader.tensors.values():
        for chunk in entry.chunks:
            per_file[chunk.file.name] = per_file.get(chunk.file.name, 0) + entry.nbytes
    assert {f["name"]: f["bytes"] for f in plan_dcp["file_list"] if f["name"].endswith(".distcp")} == per_file
    out = tmp_path / "hf"
    dcp_to_hf(dcp, out, assets_dir=src, max_shard_size="400KB")
    plan = _cli("plan", "--config", src / "config.json", "--to", "hf", "--max-shard-size", "400KB", "--source", dcp)
    written = {}
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            written[path.name] = sum(math.prod(f.get_slice(k).get_shape()) * 2 for k in f.keys())
    assert {f["name"]: f["bytes"] for f in plan["file_list"]} == written
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == plan["total_bytes"]
    assert [c["name"] for c in plan["checks"] if c["ok"]] == ["source keys", "source shapes"]


def test_plan_source_with_missing_tensor_fails(tmp_path: Path, fixtures_dir: Path) -> None:
    from test_verify import copy_without

    broken = copy_without(fixtures_dir / "tiny-dense-untied", tmp_path / "b", "lm_head.weight")
    data = _cli("plan", "--source", broken, "--to", "hf", expect=1)
    keys = next(c for c in data["checks"] if c["name"] == "source keys")
    assert not keys["ok"] and "1 missing" in keys["message"]


def test_plan_measures_disk_and_checks_free_space(tmp_path: Path) -> None:
    data = _cli("plan", "--config", CONFIGS / "Qwen3-VL-2B-Instruct.json", "--to", "hf", "--target", tmp_path / "out")
    disk = data["disk"]  # issue 22 items 9 and 12: MiB/s; start-up plus the slower of disk and sha256
    assert disk["speed_mib_s"] > 0 and "measured" in disk["speed_source"]
    rate = min(disk["speed_mib_s"], disk["checksum_mib_s"]) * 2**20
    assert disk["estimated_seconds"] == pytest.approx(disk["startup_seconds"] + data["total_bytes"] / rate,
                                                      rel=0.01, abs=0.11)
    assert not list(tmp_path.iterdir())  # the probe cleaned up and created nothing
    free = next(c for c in data["checks"] if c["name"] == "free disk")
    assert free["ok"] == (data["disk"]["free_bytes"] >= data["total_bytes"])


def test_plan_235b_allocates_no_weight_memory() -> None:
    code = ("import json, resource, sys; from click.testing import CliRunner; from vlconvert.cli import main; "
            f"r = CliRunner().invoke(main, ['plan', '--config', r'{C235}', '--to', 'megatron', '--tp', '4', "
            "'--pp', '2', '--ep', '16', '--json']); d = json.loads(r.stdout); "
            "print(json.dumps({'rss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "'total': d['total_bytes'], 'config': d['config_bytes'], 'code': r.exit_code}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["code"] == 0
    assert data["config"] == 2 * REFERENCE_PARAMS["Qwen3-VL-235B-A22B-Instruct.json"]
    assert data["rss_kb"] < 1.5 * 2**20, f"peak RSS {data['rss_kb'] / 2**20:.2f} GiB"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_an_empty_target_folder_is_planned_as_free_and_a_full_one_is_not(tmp_path: Path) -> None:
    """convert fills an empty output folder made beforehand (issue 22): plan says the same, and flags a folder
    that holds something."""
    config = CONFIGS / "Qwen3-VL-2B-Instruct.json"
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    for name, flagged in (("empty", False), ("full", True)):
        data = _cli("plan", "--config", config, "--to", "dcp", "--target", tmp_path / name, "--disk-speed", "1000")
        assert any(c["name"] == "target free" for c in data["checks"]) is flagged, data["checks"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"] and not any((tmp_path / "empty").iterdir())

