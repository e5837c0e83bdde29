"""vlconvert's ``--for ms-swift`` output in ms-swift's own loader, and ms-swift's own save in vlconvert.

Runs with ms-swift 4.6.0 and mcore-bridge 1.6.5 (ms-swift's model code) installed next to megatron-core 0.19.2
(``bash tests/frameworks/run.sh``). The model is mcore-bridge's Qwen3-VL, built on the CPU with megatron-core's
local modules where mcore-bridge asks for Transformer Engine's (``swift_env.py``), so vlconvert writes it with
``--spec local``. Every check compares tensors bit for bit with mcore-bridge's own import of the same HF fixture.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fwrun import FIX, same_as_fixture, vlconvert, worker  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader

WORKER = Path(__file__).with_name("swift_worker.py")


def disk_keys(folder: Path) -> dict[str, tuple]:
    md = FileSystemReader(str(folder)).read_metadata()
    return {k: tuple(getattr(v, "size", ())) for k, v in md.state_dict_metadata.items()}


@pytest.mark.parametrize("fixture", ["tiny-moe", "tiny-dense-untied"])
def test_swift_loads_vlconvert_output_bit_exact(tmp_path: Path, fixture: str) -> None:
    """``load_mcore_checkpoint`` (``--mcore_model DST``) and ``dist_checkpointing.load`` at default strictness
    of mcore-bridge's model take vlconvert's ``--for ms-swift`` output: every parameter, vision tower included."""
    vlconvert("convert", FIX / fixture, tmp_path / "td", "--to", "torch_dist", "--for", "ms-swift", "--spec",
              "local", "-q")
    assert (tmp_path / "td/latest_checkpointed_iteration.txt").read_text().strip() == "1"
    got = worker(WORKER, "swift-load", FIX / fixture, tmp_path / "td")
    assert got["tensors"] > 40 and got["visual"] > 20, got
    assert not got["mismatched"] and not got["mismatched_plain"], got
    assert got["iteration"] == 0 and got["checkpoint_version"] == 3.0, got  # finetune: iteration reset


@pytest.mark.parametrize("fixture", ["tiny-moe", "tiny-dense-untied"])
def test_vlconvert_reads_swift_own_save(tmp_path: Path, fixture: str) -> None:
    """ms-swift's ``save_mcore_checkpoint`` of mcore-bridge's HF import back to HF with vlconvert: the fixture's
    tensors, bit for bit. vlconvert's own ``--for ms-swift`` output has every key of that save, same shapes."""
    saved = worker(WORKER, "swift-save", FIX / fixture, tmp_path / "saved")
    assert "latest_checkpointed_iteration.txt" in saved["saved"] and "iter_0000001/.metadata" in saved["saved"]
    vlconvert("convert", tmp_path / "saved", tmp_path / "hf", "--to", "hf", "--assets-dir", FIX / fixture, "-q")
    same_as_fixture(tmp_path / "hf", fixture)
    assert "identical" in vlconvert("verify", FIX / fixture, tmp_path / "hf")

    vlconvert("convert", FIX / fixture, tmp_path / "td", "--to", "torch_dist", "--for", "ms-swift", "--spec",
              "local", "-q")
    theirs, ours = disk_keys(tmp_path / "saved/iter_0000001"), disk_keys(tmp_path / "td/iter_0000001")
    assert not set(theirs) - set(ours), sorted(set(theirs) - set(ours))[:5]
    assert {k: ours[k] for k in theirs} == theirs
