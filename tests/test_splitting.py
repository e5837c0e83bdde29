"""Ranks writing byte ranges of one file (vlconvert.splitting): the shares, written one after another here
with pieces of 4 KiB so that whole pieces, shared pieces and holes all occur, give the bytes and the digest
one writer gives; zip records crossing share boundaries get their CRC-32s combined."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from vlconvert import hashing, publish, splitting
from vlconvert.layouts.megatron import write_torch_record
from vlconvert.publish import OutputFile, Part

PIECE = 4096


@pytest.fixture
def small_pieces(monkeypatch):
    for module in (hashing, publish, splitting):
        monkeypatch.setattr(module, "PIECE_BYTES", PIECE)


def _records(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 48, generator=gen).to(torch.bfloat16) for rows in (70, 3, 200, 0, 41, 130)]


def _write(f: OutputFile, tensors: list[torch.Tensor], asked: list[int]) -> None:
    """torch.save archives end to end (as a DCP data file), each streamed in row blocks of 16 rows;
    ``asked`` counts the blocks the writer asked for."""
    def blocks(t: torch.Tensor):
        for i in range(0, t.shape[0], 16):
            asked.append(1)
            yield t[i:i + 16]
    for t in tensors:
        write_torch_record(f, tuple(t.shape), t.dtype, blocks(t))


def _split_write(path: Path, tensors: list[torch.Tensor], cuts: list[int]) -> tuple[int, object, int]:
    """Write ``path`` as shares cut at ``cuts``, one share after another, then finish them as the ranks do."""
    bounds = [0, *cuts, None]
    parts, asked = [], []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        part = Part(lo, hi)
        f = OutputFile(path, None, path.name, part)
        _write(f, tensors, asked)
        f.close()
        parts.append(part)
    reports = [splitting.crc_report({path.name: p}) for p in parts]
    crcs = splitting.combine_crcs(reports)
    for p in parts:
        splitting.fill_holes(path.parent, {path.name: p}, crcs)
    pieces = [splitting.finish_pieces(path.parent, {path.name: p}) for p in parts]
    size, digest, _ = splitting.assemble(pieces)[path.name]
    return size, digest, len(asked)


@pytest.mark.parametrize("cuts", [[PIECE * 3], [PIECE * 2, PIECE * 5, PIECE * 7], [5000, 13000], [100, 200, 30000]])
def test_shares_write_the_bytes_and_digest_of_one_writer(tmp_path, small_pieces, cuts):
    tensors = _records(0)
    whole, asked_whole = tmp_path / "one.distcp", []
    with OutputFile(whole, None, whole.name) as f:
        _write(f, tensors, asked_whole)
    expected = whole.read_bytes()
    assert len(expected) > cuts[-1]
    size, digest, asked = _split_write(tmp_path / "split.distcp", tensors, cuts)
    assert (tmp_path / "split.distcp").read_bytes() == expected
    assert size == len(expected) and digest == hashing.file_digest(whole)
    assert isinstance(digest, list) and len(digest) == hashing.pieces_of(len(expected))
    # each share asks only for blocks of the records it holds part of (a few more than one writer in all)
    assert asked < len(asked_whole) * 2
    # the archives are valid zips: the CRC-32s combined over the shares are right
    start = 0
    for t in tensors:
        record = torch.load(_one_archive(tmp_path / "split.distcp", start, tmp_path), weights_only=True)
        assert torch.equal(record, t)
        start += _archive_length(expected, start)


def _archive_length(data: bytes, start: int) -> int:
    end = data.index(b"PK\x05\x06", start)  # the end-of-central-directory record closes each archive
    return end + 22 - start


def _one_archive(path: Path, start: int, tmp: Path) -> Path:
    data = path.read_bytes()
    out = tmp / f"archive_{start}.pt"
    out.write_bytes(data[start:start + _archive_length(data, start)])
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None  # every member's CRC-32 checks
    return out


def test_a_record_seen_in_part_has_no_value_until_resolved(small_pieces):
    crc = publish.Checksum()
    crc.record, crc.seen_from = (0, 10), 4
    crc.add(memoryview(b"456789"))
    with pytest.raises(publish.OtherRanksBytes):
        _ = crc.value
    crc.resolve(123)
    assert crc.value == 123


def test_parts_that_leave_a_gap_are_an_error():
    with pytest.raises(RuntimeError, match="leave a gap"):
        splitting.combine_crcs([{"f": [(0, 10, 0, 4, 1)]}, {"f": [(0, 10, 6, 4, 2)]}])
    with pytest.raises(RuntimeError, match="cover 8 of 10"):
        splitting.combine_crcs([{"f": [(0, 10, 0, 4, 1)]}, {"f": [(0, 10, 4, 4, 2)]}])
