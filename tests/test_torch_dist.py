"""Megatron-Core ``torch_dist`` checkpoints: read what megatron-core saves, write what it loads.

The megatron-core part needs ``megatron-core==0.16.1`` (skipped without it) and runs in one spawned
gloo process (world size 1): it fills a GPTModel from vlconvert's legacy rank file, saves it with
``dist_checkpointing.save`` and loads vlconvert's torch_dist output into a fresh model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from helpers import cpu_save_patches, folder_digest, load_hf_tensors, run_cli, tensor_bytes

from vlconvert.sources import detect_layout, open_source

FIX = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = ["tiny-dense-tied", "tiny-dense-untied", "tiny-moe", "tiny-moe-tf5"]
CORE_FIXTURES = ["tiny-dense-untied", "tiny-moe"]
LM = "language_model."


def _released(fixture: str) -> dict[str, torch.Tensor]:
    want = load_hf_tensors(FIX / fixture)
    if "tf5" in fixture:
        want = {k: (v.transpose(1, 2) if k.endswith(("gate_up_proj", "down_proj")) else v) for k, v in want.items()}
    return want


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and tensor_bytes(got[k]) == tensor_bytes(want[k]), k


@pytest.mark.parametrize("fixture", FIXTURES)
def test_hf_to_torch_dist_to_hf_is_bit_exact(tmp_path: Path, fixture: str) -> None:
    run_cli("convert", FIX / fixture, tmp_path / "td", "--to", "torch_dist", "-q")
    assert detect_layout(tmp_path / "td") == "torch_dist"
    assert (tmp_path / "td/iter_0000000/metadata.json").is_file() and (tmp_path / "td/iter_0000000/common.pt").is_file()
    run_cli("convert", tmp_path / "td", tmp_path / "hf", "--to", "hf", "--assets-dir", FIX / fixture, "-q")
    _assert_same(load_hf_tensors(tmp_path / "hf"), _released(fixture))
    run_cli("verify", FIX / fixture, tmp_path / "td", "-q")  # config from common.pt's vlconvert facts


def test_dcp_to_torch_dist_equals_route_through_hf(tmp_path: Path) -> None:
    fixture = "tiny-moe"
    assets = ["--assets-dir", str(FIX / fixture)]
    run_cli("convert", FIX / fixture, tmp_path / "dcp", "--to", "dcp", "-q")
    run_cli("convert", tmp_path / "dcp", tmp_path / "direct", "--to", "torch_dist", *assets, "-q")
    run_cli("convert", tmp_path / "dcp", tmp_path / "hf", "--to", "hf", *assets, "-q")
    # the same HF model named (run_config.yaml's hf_model_id) by both routes
    run_cli("convert", tmp_path / "hf", tmp_path / "via-hf", "--to", "torch_dist", *assets, "-q")
    assert folder_digest(tmp_path / "direct") == folder_digest(tmp_path / "via-hf")
    # and back: torch_dist -> dcp equals hf -> dcp
    run_cli("convert", tmp_path / "direct", tmp_path / "dcp2", "--to", "dcp", *assets, "-q")
    run_cli("convert", tmp_path / "hf", tmp_path / "dcp3", "--to", "dcp", "-q")
    assert folder_digest(tmp_path / "dcp2") == folder_digest(tmp_path / "dcp3")


def test_torch_dist_source_to_megatron_and_inspect(tmp_path: Path) -> None:
    fixture = "tiny-moe"
    run_cli("convert", FIX / fixture, tmp_path / "td", "--to", "torch_dist", "--tp", "2", "-q")
    run_cli("convert", tmp_path / "td", tmp_path / "mg", "--to", "megatron", "--tp", "2", "--ep", "2",
            "--assets-dir", FIX / fixture, "-q")
    run_cli("verify", FIX / fixture, tmp_path / "mg", "--assets-dir", FIX / fixture, "-q")
    run_cli("reshard", tmp_path / "td", tmp_path / "rs", "--tp", "1", "--ep", "2", "-q")
    run_cli("verify", FIX / fixture, tmp_path / "rs", "-q")
    run_cli("megatron-to-hf", tmp_path / "td", tmp_path / "hf", "--assets-dir", FIX / fixture, "-q")
    _assert_same(load_hf_tensors(tmp_path / "hf"), _released(fixture))
    src = open_source(tmp_path / "td")
    assert src.layout == "torch_dist" and src.saved_from == {"tp": 2, "pp": 1, "ep": 1, "etp": 2}
    src.close()
    run_cli("inspect", tmp_path / "td")


# ------------------------------------------------------------------------------- megatron-core itself
def _core_worker(jobs: list[tuple[str, str, str, str]], port: int) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from test_megatron_core import _init, _lm_part, build_gpt

    _init(0, 1, port, 1)
    cpu_save_patches()
    for fixture, legacy, saved, written in jobs:
        model = build_gpt(fixture)
        sd = _lm_part(Path(legacy) / "release/mp_rank_00/model_optim_rng.pt")
        model.load_state_dict(sd, strict=False)
        Path(saved).mkdir(parents=True)
        sharded = model.sharded_state_dict(prefix=LM)
        # what a training run adds: optimizer state (sharded), args and iteration (common.pt)
        sharded["optimizer"] = {"exp_avg": ShardedTensor.from_rank_offsets("optimizer.state.exp_avg.embedding",
                                                                           torch.ones(8, 4))}
        sharded["args"] = argparse.Namespace(tensor_model_parallel_size=1, iteration=7)
        sharded["iteration"] = 7
        dist_checkpointing.save(sharded, saved)
        fresh = build_gpt(fixture)
        for p in fresh.parameters():
            p.data.zero_()
        dist_checkpointing.load(fresh.sharded_state_dict(prefix=LM), written)
        want = model.state_dict()
        for name, tensor in fresh.state_dict().items():
            if not name.endswith("_extra_state"):
                assert torch.equal(tensor, want[name]), f"{fixture}: {name}"
    torch.distributed.destroy_process_group()


def test_megatron_core_saves_and_loads(tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    from test_megatron_core import _free_port

    from vlconvert.megatron_convert import hf_to_megatron

    jobs = []
    for fixture in CORE_FIXTURES:
        root = tmp_path / fixture
        hf_to_megatron(FIX / fixture, root / "legacy", spec="local", experts="sequential")
        run_cli("convert", FIX / fixture, root / "written", "--to", "torch_dist", "--spec", "local", "-q")
        jobs.append((fixture, str(root / "legacy"), str(root / "saved"), str(root / "written/iter_0000000")))
    ctx = torch.multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_core_worker, args=(jobs, _free_port()))
    proc.start()
    proc.join(240)
    assert proc.exitcode == 0, "megatron-core save/load failed (see captured stderr)"
    for fixture, _legacy, saved, _written in jobs:
        out = Path(saved).parent / "hf"
        assert detect_layout(saved) == "torch_dist"
        summary = json.loads(run_cli("convert", saved, out, "--to", "hf", "--assets-dir", FIX / fixture, "--dtype",
                                     "bf16", "--allow-missing", "--json").stdout)
        assert any("dropped 1 non-model tensor" in n for n in summary["notes"]), summary["notes"]
        want = {k: v for k, v in _released(fixture).items() if not k.startswith("model.visual.")}
        _assert_same(load_hf_tensors(out), want)


def _parallel_worker(rank: int, world: int, port: int, jobs: list[tuple[str, str, str, int, int]]) -> None:
    import test_megatron_core as tmc
    from megatron.core import dist_checkpointing, parallel_state

    from vlconvert.layouts import megatron as mlay

    for fixture, legacy, written, tp, ep in jobs:
        tmc._init(rank, world, port, tp, ep)
        tmc._TP_FROM_WORLD = tp > 1
        t = parallel_state.get_tensor_model_parallel_rank()
        e = parallel_state.get_expert_model_parallel_rank()
        model = tmc.build_gpt(fixture)
        folder = mlay.rank_folder(t, 0, e, 1, ep)
        model.load_state_dict(tmc._lm_part(Path(legacy) / "release" / folder / mlay.RANK_FILE), strict=False)
        fresh = tmc.build_gpt(fixture)
        for p in fresh.parameters():
            p.data.zero_()
        dist_checkpointing.load(fresh.sharded_state_dict(prefix=LM), written)
        want = model.state_dict()
        for name, tensor in fresh.state_dict().items():
            if not name.endswith("_extra_state"):
                assert torch.equal(tensor, want[name]), f"{fixture} tp{tp} ep{ep} rank {rank}: {name}"
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_written_torch_dist_loads_at_tp2_and_ep2(tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    from test_megatron_core import _free_port

    from vlconvert.megatron_convert import hf_to_megatron

    jobs = []
    for fixture, tp, ep in [("tiny-dense-untied", 2, 1), ("tiny-moe", 2, 1), ("tiny-moe", 1, 2)]:
        root = tmp_path / f"{fixture}-{tp}-{ep}"
        hf_to_megatron(FIX / fixture, root / "legacy", tp=tp, ep=ep, spec="local", experts="sequential")
        run_cli("convert", FIX / fixture, root / "td", "--to", "torch_dist", "--spec", "local", "--tp", str(tp), "-q")
        jobs.append((fixture, str(root / "legacy"), str(root / "td/iter_0000000"), tp, ep))
    torch.multiprocessing.spawn(_parallel_worker, args=(2, _free_port(), jobs), nprocs=2, join=True)


@pytest.mark.parametrize("fraction", [0.5, 0.99])
def test_resume_after_sigkill_gives_the_same_bytes(tmp_path: Path, fraction: float) -> None:
    import signal

    from test_reliability import _killed_run

    from vlconvert import publish

    argv = ["convert", str(FIX / "tiny-moe"), str(tmp_path / "out"), "--to", "torch_dist", "-q"]
    run_cli(*argv[:2], tmp_path / "clean", *argv[3:])
    total = sum(e["size"] for e in publish.read_manifest(tmp_path / "clean").values())
    assert _killed_run(argv, int(total * fraction)) == -signal.SIGKILL
    assert publish.staging_path(tmp_path / "out").is_dir()
    assert "resuming" in run_cli(*argv[:-1], "--resume").output
    assert folder_digest(tmp_path / "out") == folder_digest(tmp_path / "clean")


def test_hostile_common_pt_is_never_run(tmp_path: Path) -> None:
    import io
    import pickle
    import zipfile

    run_cli("convert", FIX / "tiny-moe", tmp_path / "td", "--to", "torch_dist", "-q")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("common/data.pkl", pickle.dumps({"iteration": Evil()}))
    (tmp_path / "td/iter_0000000/common.pt").write_bytes(buf.getvalue())
    run_cli("convert", tmp_path / "td", tmp_path / "hf", "--to", "hf", "--assets-dir", FIX / "tiny-moe", "-q")
    assert not marker.exists()
    _assert_same(load_hf_tensors(tmp_path / "hf"), _released("tiny-moe"))
