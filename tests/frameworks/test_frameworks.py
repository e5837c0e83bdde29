"""vlconvert's torch_dist output in the frameworks' own loaders, and theirs in vlconvert (Python 3.12 set).

Runs with Megatron-Bridge 0.6.2 and megatron-core 0.19.2 installed (``bash tests/frameworks/run.sh`` sets them
up); the main suite does not collect this folder. Every check compares tensors bit for bit with Bridge's own
import of the same HF fixture. The models are built with megatron-core's local modules where Bridge asks for
Transformer Engine's (which cannot be built here), so vlconvert writes them with ``--spec local``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from fwrun import FIX, hf_tensors, same_as_fixture, vlconvert, worker

FIXTURES = ["tiny-dense-tied", "tiny-dense-untied", "tiny-moe", "tiny-moe-tf5"]
WORKER = Path(__file__).with_name("worker.py")


@pytest.mark.parametrize("fixture", FIXTURES)
def test_bridge_loads_vlconvert_output_bit_exact(tmp_path: Path, fixture: str) -> None:
    """Row 2/3 of issue 19: AutoBridge.load_megatron_model and load_model_config take vlconvert's output."""
    vlconvert("convert", FIX / fixture, tmp_path / "td", "--to", "torch_dist", "--spec", "local")
    assert (tmp_path / "td/latest_train_state.pt").is_file()
    got = worker(WORKER, "bridge-load", FIX / fixture, tmp_path / "td")
    assert got["tensors"] > 40 and not got["mismatched"], got
    cfg = worker(WORKER, "bridge-config", FIX / fixture, tmp_path / "td/iter_0000000")
    assert cfg["fields"] > 300 and not cfg["differ"], cfg


@pytest.mark.parametrize("fixture", ["tiny-dense-tied", "tiny-moe"])
def test_bridge_export_ckpt_of_vlconvert_output(tmp_path: Path, fixture: str) -> None:
    """Bridge's own Megatron -> HF export of vlconvert's output gives the fixture's tensors back."""
    vlconvert("convert", FIX / fixture, tmp_path / "td", "--to", "torch_dist", "--spec", "local")
    worker(WORKER, "bridge-export", FIX / fixture, tmp_path / "td", tmp_path / "hf")
    same_as_fixture(tmp_path / "hf", fixture)


@pytest.mark.parametrize("fixture", ["tiny-dense-untied", "tiny-moe"])
def test_vlconvert_reads_bridge_own_save(tmp_path: Path, fixture: str) -> None:
    """Bridge's save_megatron_model (megatron-core 0.19: common state inside the DCP, run_config.yaml) back
    to HF with vlconvert: the fixture's tensors, bit for bit."""
    saved = worker(WORKER, "bridge-save", FIX / fixture, tmp_path / "saved")
    assert "iter_0000000/run_config.yaml" in saved["saved"] and "iter_0000000/common.pt" not in saved["saved"]
    vlconvert("convert", tmp_path / "saved", tmp_path / "hf", "--to", "hf", "--assets-dir", FIX / fixture)
    same_as_fixture(tmp_path / "hf", fixture)


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
def test_full_model_loads_on_two_ranks_at_default_strictness(tmp_path: Path, tp: int, ep: int) -> None:
    """Row 1: the whole Qwen3-VL model (language model and vision tower) at TP 2 / EP 2 over two gloo ranks,
    ``dist_checkpointing.load`` at megatron-core's default strictness."""
    vlconvert("convert", FIX / "tiny-moe", tmp_path / "td", "--to", "torch_dist", "--spec", "local")
    got = worker(WORKER, "mcore-parallel", FIX / "tiny-moe", tmp_path / "td/iter_0000000", tp, ep, tmp_path)
    assert all(r["tensors"] > 40 and not r["mismatched"] for r in got["ranks"]), got


@pytest.mark.parametrize("fixture", ["tiny-dense-untied", "tiny-moe"])
def test_megatron_lm_gptmodel_from_checkpoint_args(tmp_path: Path, fixture: str) -> None:
    """Row 5: ``--for megatron-lm`` (unprefixed language model, Megatron-LM ``args``) read by Bridge's
    Megatron-LM reader and loaded into megatron-core's GPTModel."""
    vlconvert("convert", FIX / fixture, tmp_path / "td", "--to", "torch_dist", "--for", "megatron-lm",
              "--spec", "local")
    got = worker(WORKER, "mlm-load", FIX / fixture, tmp_path / "td/release")
    assert got["tensors"] > 20 and not got["mismatched"], got


@pytest.mark.parametrize("mode", ["finetune", "resume"])
def test_bridge_training_loader_takes_vlconvert_output(tmp_path: Path, mode: str) -> None:
    """Row 2: Bridge's ``load_checkpoint`` as a recipe calls it: ``checkpoint.pretrained_checkpoint`` (fine-tune
    from) and ``checkpoint.load`` (resume)."""
    vlconvert("convert", FIX / "tiny-moe", tmp_path / "td", "--to", "torch_dist", "--spec", "local")
    got = worker(WORKER, "bridge-train-load", FIX / "tiny-moe", tmp_path / "td", mode)
    assert got["tensors"] > 40 and not got["mismatched"] and got["iteration"] == 0, got


MCORE016 = os.environ.get("MCORE016_PYTHON")


@pytest.mark.skipif(not MCORE016, reason="needs MCORE016_PYTHON (run.sh makes it: megatron-core 0.16.1 + Bridge 0.3.1)")
@pytest.mark.parametrize("fixture", ["tiny-dense-tied", "tiny-moe"])
def test_bridge_03_on_megatron_core_016_loads_the_full_model(tmp_path: Path, fixture: str) -> None:
    """Row 1 with megatron-core 0.16.1: Megatron-Bridge 0.3.1 (its Bridge; it keeps HF's vision tower under
    ``vision_model.``) loads ``--for megatron-bridge-0.3`` with its own ``load_megatron_model``: the language
    model equal to Bridge 0.6.2's own HF import, the vision tower equal to the HF fixture's."""
    vlconvert("convert", FIX / fixture, tmp_path / "td", "--to", "torch_dist", "--for", "megatron-bridge-0.3",
              "--spec", "local")
    got = worker(WORKER, "bridge-dump", tmp_path / "td/iter_0000000", tmp_path / "got.pt", python=MCORE016)
    worker(WORKER, "reference-dump", FIX / fixture, tmp_path / "ref.pt")
    have, ref, hf = torch.load(tmp_path / "got.pt"), torch.load(tmp_path / "ref.pt"), hf_tensors(FIX / fixture)
    want = {k: v for k, v in ref.items() if k.startswith("language_model.")}
    want |= {f"vision_model.{k[len('model.visual.'):]}": v for k, v in hf.items() if k.startswith("model.visual.")}
    assert got["tensors"] == len(have) and set(have) == set(want), sorted(set(have) ^ set(want))[:5]
    assert not [k for k in want if not torch.equal(want[k], have[k])]
