"""Rows that lie verbatim in an input file are copied file to file (``copy_file_range``), not through memory:
the bytes are the same either way, and the copy fails like a write does."""

from __future__ import annotations

import errno
import hashlib
import os
import zlib
from pathlib import Path

import pytest
from helpers import folder_digest, run_cli

from vlconvert import publish
from vlconvert.engine import Converter
from vlconvert.errors import UserError

FIX = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """tiny-moe (experts stored as transformers 5 saves them) in every layout vlconvert reads."""
    root = tmp_path_factory.mktemp("inputs")
    hf = FIX / "tiny-moe-tf5"
    run_cli("convert", hf, root / "dcp", "--to", "dcp", "--experts-layout", "transformers5", "-q")
    run_cli("convert", hf, root / "megatron", "--to", "megatron", "--tp", "2", "--ep", "2", "-q")
    run_cli("convert", hf, root / "torch_dist", "--to", "torch_dist", "-q")
    return {"hf": hf, "dcp": root / "dcp", "megatron": root / "megatron", "torch_dist": root / "torch_dist"}


def _counting_kernel(monkeypatch) -> list[int]:
    copied = [0]
    real = publish.kernel_copy

    def kernel_copy(*args):
        n = real(*args)
        copied[0] += n
        return n

    monkeypatch.setattr(publish, "kernel_copy", kernel_copy)
    return copied


ROUTES = {
    "hf->dcp": ("hf", ["--to", "dcp", "--experts-layout", "transformers5"]),
    "hf->megatron": ("hf", ["--to", "megatron", "--tp", "2", "--ep", "2"]),
    "hf->torch_dist": ("hf", ["--to", "torch_dist"]),
    "dcp->hf": ("dcp", ["--to", "hf", "--assets-dir", "{hf}", "--experts-layout", "transformers5",
                        "--max-shard-size", "300KB"]),
    "megatron->hf": ("megatron", ["--to", "hf", "--assets-dir", "{hf}", "--experts-layout", "transformers5"]),
    "megatron->megatron": ("megatron", ["--to", "megatron", "--tp", "1", "--ep", "4", "--assets-dir", "{hf}"]),
    "torch_dist->hf": ("torch_dist", ["--to", "hf", "--assets-dir", "{hf}", "--experts-layout", "transformers5"]),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_kernel_copies_give_the_bytes_of_copies_through_memory(inputs, tmp_path, monkeypatch, route):
    """Each route copies some rows in the kernel; forbidding it (another file system: EXDEV) changes no byte."""
    src, args = ROUTES[route]
    args = [a.format(hf=inputs["hf"]) for a in args]
    copied = _counting_kernel(monkeypatch)
    run_cli("convert", inputs[src], tmp_path / "kernel", *args, "-q")
    assert copied[0] > 0

    def cross_device(*_args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(publish, "kernel_copy", cross_device)
    run_cli("convert", inputs[src], tmp_path / "memory", *args, "-q")
    assert folder_digest(tmp_path / "kernel") == folder_digest(tmp_path / "memory")
    run_cli("verify", "--manifest", tmp_path / "kernel", "-q")


def test_hf_to_dcp_at_the_same_dtype_copies_every_tensor_byte_in_the_kernel(tmp_path, monkeypatch):
    hf = FIX / "tiny-moe-tf5"
    copied = _counting_kernel(monkeypatch)
    run_cli("convert", hf, tmp_path / "out", "--to", "dcp", "--experts-layout", "transformers5", "-q")
    plan = Converter(hf, tmp_path / "unused", to="dcp", experts_layout="transformers5").plan()
    assert copied[0] == plan.tensor_bytes


def test_a_cast_is_never_a_kernel_copy(tmp_path, monkeypatch):
    copied = _counting_kernel(monkeypatch)
    run_cli("convert", FIX / "tiny-dense-untied", tmp_path / "out", "--to", "dcp", "--dtype", "fp32", "-q")
    assert copied[0] == 0


def test_an_input_that_ends_inside_a_copied_range_is_one_line(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"x" * 1000)
    f = publish.OutputFile(tmp_path / "out.bin", None, "out.bin")
    f.copy_range(short, 500, 1000)
    with pytest.raises(UserError, match="truncated: it ended at byte 1000"):
        f.close()
    assert f.closed


def test_copied_ranges_are_hashed_and_crc_checked_in_order(tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(3 * publish.COPY_CHUNK + 12345)
    src.write_bytes(data)
    crc = publish.Checksum()
    journal = []

    class Stage:
        rehashed: list = []

        def journal(self, rel, size, sha256, state):
            journal.append((size, sha256))

    f = publish.OutputFile(tmp_path / "out.bin", Stage(), "out.bin")
    f.write(b"head")
    f.copy_range(src, 7, len(data) - 7, crc=crc)
    f.write(b"tail" * 300_000)
    f.close()
    expected = b"head" + data[7:] + b"tail" * 300_000
    assert (tmp_path / "out.bin").read_bytes() == expected
    assert journal == [(len(expected), hashlib.sha256(expected).hexdigest())]
    assert crc.value == zlib.crc32(data[7:])
