"""The pool of large blocks (``vlconvert.buffers``): a block is handed out again only when nothing refers to
it, and conversions give the same bytes whether every block is pooled or none is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import folder_digest, run_cli

from vlconvert import buffers

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def test_a_block_is_reused_only_when_nothing_refers_to_it():
    pool = buffers.BufferPool()
    n = buffers.POOL_MIN
    first = pool.empty((n,), torch.uint8)
    address = first.data_ptr()
    view = first[10:20]
    array = view.numpy()
    del first, view
    assert pool.empty((n,), torch.uint8).data_ptr() != address  # a numpy array of a view still holds it
    del array
    again = pool.empty((n,), torch.uint8)
    assert again.data_ptr() == address  # free now: handed out again
    written = memoryview(again.reshape(-1).numpy()).cast("B")  # what OutputFile's threads hold
    del again
    assert pool.empty((n,), torch.uint8).data_ptr() != address
    del written
    assert pool.empty((n // 2, 2), torch.uint8).data_ptr() == address  # same size, another shape
    assert pool.held_bytes() == 2 * n  # the temporary blocks above were free again at once
    small = pool.empty((16,), torch.float32)
    assert small.shape == (16,) and pool.held_bytes() == 2 * n  # small blocks are not pooled


def test_kept_buffers_are_bounded_and_cleared():
    pool = buffers.BufferPool(keep=2)
    live = [pool.empty((buffers.POOL_MIN,), torch.uint8) for _ in range(4)]
    assert len({t.data_ptr() for t in live}) == 4 and pool.held_bytes() == 2 * buffers.POOL_MIN
    pool.clear()
    assert pool.held_bytes() == 0 and all(t.numel() == buffers.POOL_MIN for t in live)


def test_transposed_and_contiguous_copy_exactly():
    x = torch.arange(12 * 7, dtype=torch.float32).reshape(12, 7).to(torch.bfloat16)
    assert torch.equal(buffers.transposed(x), x.t().contiguous())
    assert buffers.contiguous(x) is x
    assert torch.equal(buffers.contiguous(x.t()[2:5]), x.t()[2:5].contiguous())


ROUTES = [
    ("{hf}", ["--to", "dcp"]),
    ("{dcp}", ["--to", "hf", "--assets-dir", "{hf}"]),
    ("{hf}", ["--to", "megatron", "--tp", "2", "--ep", "2"]),
    ("{mg}", ["--to", "hf", "--assets-dir", "{hf}"]),
    ("{mg}", ["--to", "megatron", "--tp", "1", "--ep", "1"]),
]


@pytest.mark.parametrize("fixture", ["tiny-moe", "tiny-moe-tf5"])
def test_every_block_pooled_gives_the_same_bytes(tmp_path, monkeypatch, fixture):
    hf = FIX / fixture
    run_cli("convert", hf, tmp_path / "dcp", "--to", "dcp", "-q")
    run_cli("convert", hf, tmp_path / "mg", "--to", "megatron", "--tp", "2", "--ep", "2", "-q")
    paths = {"hf": str(hf), "dcp": str(tmp_path / "dcp"), "mg": str(tmp_path / "mg")}
    digests = {}
    for pool_min in (2**62, 1):  # nothing pooled, then every block (reads, transposes) pooled
        monkeypatch.setattr(buffers, "POOL_MIN", pool_min)
        for i, (src, argv) in enumerate(ROUTES):
            out = tmp_path / f"out-{pool_min}-{i}"
            run_cli("convert", src.format(**paths), out, *[a.format(**paths) for a in argv], "-q")
            digests.setdefault(i, []).append(folder_digest(out))
    assert all(a == b for a, b in digests.values())
