"""Megatron layouts: round trips, reshard, detection, refusals, file format, and TP semantics."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vlconvert import ops
from vlconvert.cli import main
from vlconvert.errors import UserError
from vlconvert.layouts import megatron as mlay
from vlconvert.layouts.hf import HFCheckpoint, asset_files
from vlconvert.megatron_convert import (
    MegatronCheckpoint,
    hf_to_megatron,
    megatron_to_hf,
    open_megatron,
    plan_megatron_ranks,
    reshard,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures"

ROUND_TRIPS = [
    ("tiny-dense-tied", dict(tp=1, pp=1)),
    ("tiny-dense-tied", dict(tp=2, pp=2, spec="local")),
    ("tiny-dense-tied", dict(tp=4, padded_vocab_size=2304)),
    ("tiny-dense-untied", dict(tp=2, pp=3)),
    ("tiny-dense-untied", dict(tp=1, pp=2, pp_first_layers=1)),
    ("tiny-moe", dict(tp=1, pp=1, ep=1)),
    ("tiny-moe", dict(tp=2, pp=2, ep=2)),
    ("tiny-moe", dict(tp=8)),
    ("tiny-moe", dict(ep=8, experts="sequential", spec="local")),
    ("tiny-moe", dict(tp=2, ep=4, etp=1, make_vocab_size_divisible_by=3000)),
    ("tiny-moe-tf5", dict(tp=2, pp=2, ep=2)),
]


def _hf_equal(a_dir: Path, b_dir: Path, reference: Path | None = None) -> None:
    a, b = HFCheckpoint(reference or a_dir), HFCheckpoint(b_dir)
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.view(torch.uint8) if x.dtype == torch.bfloat16 else x,
                           y.view(torch.uint8) if y.dtype == torch.bfloat16 else y), name


@pytest.mark.parametrize("fixture,kw", ROUND_TRIPS, ids=[f"{f}-{'-'.join(f'{k}{v}' for k, v in kw.items())}"
                                                         for f, kw in ROUND_TRIPS])
def test_round_trip_bit_exact(tmp_path: Path, fixture: str, kw: dict) -> None:
    src = FIX / fixture
    mg, hf = tmp_path / "mg", tmp_path / "hf"
    result = hf_to_megatron(src, mg, **kw)
    plan = result.plan
    assert (mg / mlay.TRACKER).read_text() == "release"
    assert len(list((mg / "release").iterdir())) == plan.tp * plan.pp * plan.ep == result.files
    back = megatron_to_hf(mg, hf, assets_dir=src)
    assert back.plan.tp == plan.tp and back.plan.pp == plan.pp and back.plan.ep == plan.ep
    assert back.plan.etp == plan.etp and back.plan.stage_layers == plan.stage_layers
    # tf5 input: the output is in the released orientation, equal to the released fixture
    _hf_equal(src, hf, reference=FIX / "tiny-moe" if fixture == "tiny-moe-tf5" else None)
    for asset in asset_files(src):
        assert filecmp.cmp(asset, hf / asset.relative_to(src), shallow=False)
    index = json.loads((hf / "model.safetensors.index.json").read_text()) if (
        hf / "model.safetensors.index.json").exists() else None
    if index:
        for name, fname in index["weight_map"].items():
            assert name in HFCheckpoint(hf).tensors and (hf / fname).is_file()


def test_rank_files_load_with_torch_weights_only(tmp_path: Path) -> None:
    hf_to_megatron(FIX / "tiny-moe", tmp_path / "mg", tp=2, ep=2)
    path = tmp_path / "mg/release/mp_rank_01_001/model_optim_rng.pt"
    loaded = torch.load(path, weights_only=True, mmap=True)
    assert loaded["checkpoint_version"] == 3.0 and loaded["iteration"] == 0
    rf = mlay.RankFile(path)
    assert list(loaded["model"]) == list(rf.tensors)
    for name, t in loaded["model"].items():
        assert torch.equal(t, rf.read(name))
        assert torch.equal(t[1:3], rf.read_rows(name, 1, 3))
    # EP rank 1 holds global experts 4..7 as local 0..3, TP rank 1 the second halves of gate and up
    gate_up = HFCheckpoint(FIX / "tiny-moe").read("model.language_model.layers.0.mlp.experts.gate_up_proj")
    fc1 = loaded["model"]["language_model.decoder.layers.0.mlp.experts.linear_fc1.weight0"]
    expert4 = gate_up[4].t()  # [2I, H]
    assert torch.equal(fc1, torch.cat([expert4[24:48], expert4[72:96]]))


def test_reshard_equals_direct(tmp_path: Path) -> None:
    for fixture, a, b in [("tiny-moe", dict(tp=2, pp=2, ep=2), dict(tp=8, ep=1)),
                          ("tiny-moe", dict(tp=8), dict(tp=1, pp=2, ep=8, etp=1)),
                          ("tiny-dense-untied", dict(tp=2, pp=3, spec="local"), dict(tp=4, pp=1, spec="te"))]:
        base = tmp_path / f"{fixture}-{len(list(tmp_path.iterdir()))}"
        base.mkdir()
        hf_to_megatron(FIX / fixture, base / "a", **a)
        reshard(base / "a", base / "resharded", **b)
        hf_to_megatron(FIX / fixture, base / "direct", **b)
        got = sorted(p.relative_to(base / "resharded") for p in (base / "resharded").rglob("*") if p.is_file())
        want = sorted(p.relative_to(base / "direct") for p in (base / "direct").rglob("*") if p.is_file())
        assert got == want
        for rel in got:
            assert filecmp.cmp(base / "resharded" / rel, base / "direct" / rel, shallow=False), rel


def test_two_part_folder_names_detected_from_tensors(tmp_path: Path) -> None:
    """mp_rank_00_001: EP rank (no PP) vs PP rank (no EP), told apart without vlconvert metadata."""
    for kw, want in ((dict(ep=2), "ep"), (dict(pp=2), "pp")):
        dst = tmp_path / want
        hf_to_megatron(FIX / "tiny-moe", dst, metadata=False, **kw)
        assert (dst / "release/mp_rank_00_001").is_dir()
        assert mlay.RankFile(dst / "release/mp_rank_00_001/model_optim_rng.pt").meta is None
        with pytest.raises(UserError, match="no model config"):
            open_megatron(dst)
        opened = open_megatron(dst, FIX / "tiny-moe/config.json")
        assert (opened.plan.pp, opened.plan.ep) == ((1, 2) if want == "ep" else (2, 1))
        assert any(f"tp + {want} rank" in n for n in opened.notes)
        megatron_to_hf(dst, tmp_path / f"{want}-hf", assets_dir=FIX / "tiny-moe")
        _hf_equal(FIX / "tiny-moe", tmp_path / f"{want}-hf")


def test_megatron_checkpoint_canonical_source(tmp_path: Path) -> None:
    hf_to_megatron(FIX / "tiny-moe-tf5", tmp_path / "mg", tp=2, ep=2, padded_vocab_size=2560)
    mc = MegatronCheckpoint(tmp_path / "mg")
    ref = HFCheckpoint(FIX / "tiny-moe")
    assert mc.layout == "megatron" and sorted(mc.names()) == sorted(ref.tensors)
    for name in mc.names():
        shape, dtype = mc.spec(name)
        t = mc.read(name)
        assert tuple(t.shape) == shape == ref.tensors[name].shape and dtype == t.dtype
        assert torch.equal(t, ref.read(name)), name


def test_plan_listing_shapes() -> None:
    plan = plan_megatron_ranks(FIX / "configs/Qwen3-VL-235B-A22B-Instruct.json", tp=8, pp=4, ep=8,
                               pp_first_layers=22, pp_last_layers=24)
    assert plan.stage_layers == [22, 24, 24, 24] and plan.padded_vocab == 152576
    listing = dict(plan.listing())
    assert len(listing) == 8 * 4 * 8
    first = dict((n, s) for n, s, _ in listing["mp_rank_03_000_005"])
    assert first["language_model.embedding.word_embeddings.weight"] == (152576 // 8, 4096)
    assert first["language_model.decoder.layers.0.self_attention.linear_qkv.weight"] == ((64 + 8) * 128 // 8, 4096)
    assert first["language_model.decoder.layers.21.mlp.experts.linear_fc1.weight15"] == (2 * 1536 // 8, 4096)
    assert "language_model.decoder.layers.22.mlp.router.weight" not in first
    last = dict((n, s) for n, s, _ in listing["mp_rank_00_003_000"])
    assert last["language_model.output_layer.weight"] == (152576 // 8, 4096)
    assert last["language_model.decoder.layers.23.mlp.experts.linear_fc2.weight0"] == (4096, 1536 // 8)
    assert not any(n.startswith("vision_model.") for n in last)


def test_ops_rules() -> None:
    assert [ops.padded_vocab_size(151936, tp) for tp in (1, 2, 4, 8, 16)] == [151936, 152064, 152064, 152576, 153600]
    assert ops.padded_vocab_size(151936, 8, padded=151936) == 151936
    assert ops.pipeline_layers(94, 4, 22, 24) == [22, 24, 24, 24]
    assert ops.pipeline_layers(48, 4) == [12] * 4
    with pytest.raises(UserError, match="--pp-first-layers"):
        ops.pipeline_layers(94, 4)
    with pytest.raises(UserError, match="--pp-first-layers"):
        ops.pipeline_layers(94, 8)
    assert ops.local_experts(128, 8, 3) == list(range(48, 64))
    gen = torch.Generator().manual_seed(0)
    heads, groups, hd, hidden = 8, 4, 16, 64
    q, k, v = (torch.randn(n * hd, hidden, generator=gen) for n in (heads, groups, groups))
    qkv = ops.interleave_qkv(q, k, v, groups)
    assert all(torch.equal(x, y) for x, y in zip(ops.split_qkv(qkv, heads, groups, hd), (q, k, v), strict=True))
    tags = {"q": q, "k": k, "v": v}
    from_map = torch.cat([tags[t][a:b] for t, a, b in ops.qkv_row_map(heads, groups, hd)])
    assert torch.equal(from_map, qkv)
    vqkv = torch.randn(3 * heads * hd, hidden, generator=gen)
    inter = ops.interleave_vision_qkv(vqkv, heads)
    assert torch.equal(ops.split_vision_qkv(inter, heads), vqkv)
    assert torch.equal(torch.cat([vqkv[a:b] for _, a, b in ops.vision_qkv_row_map(heads, hd)]), inter)
    gate, up = torch.randn(48, 8, generator=gen), torch.randn(48, 8, generator=gen)
    parts = ops.tp_split_gate_up(gate, up, 4)
    assert all(torch.equal(x, y) for x, y in zip(ops.tp_merge_gate_up(parts), (gate, up), strict=True))
    # TP 8 > 4 groups: raw row chunks inside groups
    chunks = ops.column_split(qkv, 8)
    assert torch.equal(chunks[1], qkv[(heads // groups + 2) * hd // 2:(heads // groups + 2) * hd])


@pytest.mark.parametrize("kw,match", [
    (dict(tp=3), "--tp 3 must divide"),
    (dict(ep=2), "dense model"),
    (dict(pp=2), "do not split evenly"),
    (dict(tp=2, padded_vocab_size=2049), "not divisible by --tp"),
])
def test_plan_refusals(kw: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        plan_megatron_ranks(FIX / "tiny-dense-untied/config.json", **({"tp": 1} | kw))


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "mg"
    res = runner.invoke(main, ["hf-to-megatron", str(FIX / "tiny-moe"), str(out), "--tp", "2", "--ep", "2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["tp"] == 2 and data["ep"] == 2 and "--padded-vocab-size 2048" in data["megatron_flags"]
    res = runner.invoke(main, ["hf-to-megatron", str(FIX / "tiny-moe"), str(out), "--tp", "2"])
    assert res.exit_code == 1 and "already exists" in res.output and "--overwrite" in res.output
    res = runner.invoke(main, ["hf-to-megatron", str(FIX / "tiny-moe"), str(tmp_path / "x"), "--ep", "3"])
    assert res.exit_code == 1 and "--ep 3" in res.output and not (tmp_path / "x").exists()
    res = runner.invoke(main, ["reshard", str(out), str(tmp_path / "r"), "--tp", "1", "--ep", "8", "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["megatron-to-hf", str(tmp_path / "r"), str(tmp_path / "hf"), "--assets-dir",
                               str(FIX / "tiny-moe"), "--json"])
    assert res.exit_code == 0, res.output
    assert any("read as TP=1 PP=1 EP=8" in n for n in json.loads(res.stdout)["notes"])
    _hf_equal(FIX / "tiny-moe", tmp_path / "hf")
    res = runner.invoke(main, ["megatron-to-hf", str(tmp_path / "r"), str(tmp_path / "hf2"), "--assets-dir",
                               str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "--assets-dir" in res.output and not (tmp_path / "hf2").exists()
    # a truncated rank file: one clear line, nothing published
    victim = tmp_path / "r/release/mp_rank_00_003/model_optim_rng.pt"
    victim.write_bytes(victim.read_bytes()[:-5000])
    res = runner.invoke(main, ["megatron-to-hf", str(tmp_path / "r"), str(tmp_path / "hf3"), "--assets-dir",
                               str(FIX / "tiny-moe")])
    assert res.exit_code == 1 and "model_optim_rng.pt" in res.output and not (tmp_path / "hf3").exists()


def test_restricted_unpickler_never_calls_unknown_globals(tmp_path: Path) -> None:
    import argparse
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2, 2)}, "args": argparse.Namespace(tp=2), "x": Boom()}, path)
    rf = mlay.RankFile(path)  # exec is never called: it becomes an inert placeholder
    assert torch.equal(rf.read("w"), torch.ones(2, 2)) and rf.args == {"tp": 2}
    torch.save({"model": {"w": Boom()}}, tmp_path / "evil2.pt")
    with pytest.raises(UserError, match="not a tensor"):
        mlay.RankFile(tmp_path / "evil2.pt")
    assert pickle  # noqa: B018


def test_uneven_pipeline_refusal_names_the_balanced_counts_plan_proposes(tmp_path):
    from vlconvert.megatron_convert import plan_megatron_ranks
    from vlconvert.planning import plan_conversion

    config = Path(__file__).resolve().parents[1] / "fixtures" / "configs" / "Qwen3-VL-235B-A22B-Instruct.json"
    with pytest.raises(UserError, match="--pp-first-layers 11 --pp-last-layers 11"):
        plan_megatron_ranks(config, 4, 8, 16)
    proposal = plan_conversion(config, "megatron", tp=4, pp=8, ep=16).pipeline["proposal"]
    assert (proposal["pp_first_layers"], proposal["pp_last_layers"]) == (11, 11)
    accepted = plan_megatron_ranks(config, 4, 8, 16, pp_first_layers=11, pp_last_layers=11)
    assert accepted.stage_layers == [11, 12, 12, 12, 12, 12, 12, 11]
