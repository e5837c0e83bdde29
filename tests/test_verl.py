"""verl FSDP checkpoints: rank files of DTensors reassembled bit-exactly, never executing pickled code.

The checkpoints are written by FSDP2 on CPU under torchrun (gloo) the way verl's FSDP checkpoint manager
writes them (``tests/dist/verl_worker.py``): the MoE fixture on 2 ranks, the tied dense fixture on 3 ranks
(64 rows split 22/22/20: uneven shards), with optimizer and extra-state files beside the model files and
a ``huggingface/`` folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_byte_path_writes_the_torch_paths_files, load_hf_tensors, run_cli, tensor_bytes

from vlconvert.sources import detect_layout
from vlconvert.sources.verl import VerlRankFile

FIX = Path(__file__).resolve().parents[1] / "fixtures"
WORKER = Path(__file__).resolve().parent / "dist" / "verl_worker.py"
RANKS = {"tiny-moe": 2, "tiny-dense-tied": 3}


def torchrun(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("rendezvous", "Address already in use", "Connection")):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def verl(tmp_path_factory) -> dict[str, Path]:
    """Each fixture saved as a verl FSDP checkpoint (``global_step_1/actor``)."""
    base = tmp_path_factory.mktemp("verl")
    out = {}
    for name, ranks in RANKS.items():
        actor = base / name / "global_step_1" / "actor"
        torchrun(ranks, "save", str(FIX / name), str(actor))
        out[name] = actor
    return out


class Evil:
    """Pickles as a call to ``os.system`` (what a hostile checkpoint carries)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", list(RANKS))
def test_verl_to_hf_is_bit_exact_with_assets_from_huggingface(verl, tmp_path, name):
    actor = verl[name]
    assert detect_layout(actor) == "verl" and detect_layout(actor.parent) == "verl"
    src = actor.parent if name == "tiny-moe" else actor  # the global_step folder or its actor folder
    result = run_cli("convert", src, tmp_path / "out", "--to", "hf", "--json")
    assert "optimizer/extra-state files not read" in result.output
    want, got = load_hf_tensors(FIX / name), load_hf_tensors(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and tensor_bytes(got[k]) == tensor_bytes(want[k]), k
    for asset in ("tokenizer.json", "config.json", "chat_template.json"):
        assert (tmp_path / "out" / asset).read_bytes() == (FIX / name / asset).read_bytes()
    if name == "tiny-dense-tied":  # uneven dim-0 shards: 64 rows as 22/22/20
        shards = [VerlRankFile(actor / f"model_world_size_3_rank_{r}.pt").tensors[
            "model.language_model.layers.0.input_layernorm.weight"].shape[0] for r in range(3)]
        assert shards == [22, 22, 20]


def test_verl_to_megatron_and_dcp_equal_the_route_through_hf(verl, tmp_path):
    actor = verl["tiny-moe"]
    run_cli("convert", actor, tmp_path / "mg", "--to", "megatron", "--tp", "2", "--ep", "2", "-q")
    run_cli("convert", actor, tmp_path / "dcp", "--to", "dcp", "--dtype", "bf16", "-q")
    want = load_hf_tensors(FIX / "tiny-moe")
    for src in ("mg", "dcp"):
        run_cli("convert", tmp_path / src, tmp_path / f"{src}-hf", "--to", "hf", "--assets-dir", FIX / "tiny-moe", "-q")
        got = load_hf_tensors(tmp_path / f"{src}-hf")
        assert all(tensor_bytes(got[k]) == tensor_bytes(want[k]) for k in want), src


VERL_ROUTES = {  # {actor}: a fixture's verl actor folder; run with the byte path on and off
    "dense-to-hf": ("tiny-dense-tied", ["convert", "{actor}", "{out}", "--to", "hf"]),
    "dense-to-megatron-tp2-fp16": ("tiny-dense-tied", ["convert", "{actor}", "{out}", "--to", "megatron", "--tp", "2",
                                                       "--dtype", "fp16"]),
    "moe-to-megatron-tp2-ep2": ("tiny-moe", ["convert", "{actor}", "{out}", "--to", "megatron", "--tp", "2", "--ep",
                                             "2"]),
    "moe-to-dcp-tf5-keep": ("tiny-moe", ["convert", "{actor}", "{out}", "--to", "dcp", "--dtype", "keep",
                                         "--experts-layout", "transformers5"]),
}


@pytest.mark.parametrize("route", list(VERL_ROUTES))
def test_verl_routes_read_shards_as_bytes_without_torch(verl, tmp_path, route):
    """verl's DTensor shards (3 uneven shards of the dense fixture, the MoE's fused experts) are read as byte spans,
    cast and turned without torch: every file equals the one the torch path writes."""
    name, args = VERL_ROUTES[route]
    assert_byte_path_writes_the_torch_paths_files(lambda out: [a.format(actor=verl[name], out=out) for a in args],
                                                  tmp_path)


def test_a_rank_file_that_would_run_code_is_refused_and_nothing_runs(verl, tmp_path):
    actor = tmp_path / "actor"
    shutil.copytree(verl["tiny-moe"], actor)
    marker = tmp_path / "pwned"
    # the optimizer and extra-state files are never opened: a hostile one there changes nothing
    torch.save({"state": Evil(marker)}, actor / "optim_world_size_2_rank_0.pt")
    run_cli("convert", actor, tmp_path / "ok", "--to", "hf", "-q")
    assert not marker.exists()
    torch.save({"model.language_model.norm.weight": Evil(marker)}, actor / "model_world_size_2_rank_1.pt")
    result = run_cli("convert", actor, tmp_path / "out", "--to", "hf", expect=1)
    assert "is refused: it references posix.system" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.save(Evil(marker), actor / "model_world_size_2_rank_1.pt")  # the whole payload a call
    result = run_cli("convert", actor, tmp_path / "out", "--to", "hf", expect=1)
    assert "is refused" in result.output and not marker.exists()


def test_missing_rank_and_foreign_objects_give_one_line(verl, tmp_path):
    actor = tmp_path / "actor"
    shutil.copytree(verl["tiny-moe"], actor)
    (actor / "model_world_size_2_rank_1.pt").unlink()
    result = run_cli("convert", actor, tmp_path / "out", "--to", "hf", expect=1)
    assert "lacks model_world_size_2_rank_1.pt (1 of 2 rank files)" in result.output
    torch.save({"model.language_model.norm.weight": [1, 2]}, actor / "model_world_size_2_rank_1.pt")
    result = run_cli("convert", actor, tmp_path / "out", "--to", "hf", expect=1)
    assert "is not a tensor or DTensor" in result.output and len(result.output.strip().splitlines()) == 1
