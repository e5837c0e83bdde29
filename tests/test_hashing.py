"""The manifest's digests: sha256 of every 64 MiB piece, hashed in parallel, checkable with dd | sha256sum.

Every digest here is compared with ``hashlib.sha256`` of the same bytes cut at the same boundaries.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from vlconvert import hashing, publish
from vlconvert.cli import main

PIECE = hashing.PIECE_BYTES


def pieces(data: bytes, size: int = PIECE) -> list[str]:
    return [hashlib.sha256(data[i:i + size]).hexdigest() for i in range(0, len(data), size)]


def expected_digest(data: bytes, size: int = PIECE) -> hashing.Digest:
    parts = pieces(data, size)
    return parts if len(parts) > 1 else hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("length", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_pieces_hashed_in_parallel_equal_hashlib_over_the_same_cuts(length, monkeypatch, tmp_path):
    """Bytes given in random cuts, some as buffers and some as ranges of a file, any piece boundary."""
    monkeypatch.setattr(hashing, "PIECE_BYTES", 4096)
    rng = random.Random(length)
    data = rng.randbytes(length)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    hasher, at = hashing.PieceHasher(), 0
    while at < length:
        n = min(rng.randint(1, 3000), length - at)
        if rng.random() < 0.5:
            hasher.update(memoryview(data[at:at + n]))
        else:
            hasher.update_range(src, at, n)
        at += n
    assert hasher.digest() == expected_digest(data, 4096)
    assert hashing.file_digest(src) == expected_digest(data, 4096)
    assert hashing.is_digest(hashing.file_digest(src))


def test_a_file_that_ends_early_is_an_error_not_a_digest(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100)
    hasher = hashing.PieceHasher()
    hasher.update_range(src, 50, 100)
    with pytest.raises(hashing.ShortFile, match="ended at byte 100"):
        hasher.digest()


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, bytes]:
    """A file of 2.5 real pieces (160 MiB)."""
    data = random.Random(0).randbytes(2 * PIECE + PIECE // 2)
    path = tmp_path_factory.mktemp("big") / "src.bin"
    path.write_bytes(data)
    return path, data


def test_an_output_file_of_several_pieces_is_journaled_with_each_piece_digest(big, tmp_path):
    """Writes and kernel-copied ranges, with a CRC-32 over a range: the journal holds the pieces of the bytes on
    disk, and piece i is what `dd bs=64M skip=i count=1 | sha256sum` prints."""
    src, data = big
    journal, crc = [], publish.Checksum()

    class Stage:
        rehashed: list = []

        def journal(self, rel, size, sha256, state):
            journal.append((size, sha256))

    out = tmp_path / "out.bin"
    f = publish.OutputFile(out, Stage(), "out.bin")
    f.write(b"head" * 1000)
    f.copy_range(src, 3, PIECE + 5, crc=crc)
    f.write(bytes(data[:3 * 2**20]))
    f.copy_range(src, PIECE, len(data) - PIECE)
    f.close()
    expected = b"head" * 1000 + data[3:PIECE + 8] + data[:3 * 2**20] + data[PIECE:]
    assert out.read_bytes() == expected
    assert journal == [(len(expected), pieces(expected))] and len(journal[0][1]) == 3
    assert crc.value == zlib.crc32(data[3:PIECE + 8])
    dd = subprocess.run(f"dd if={out} bs=64M skip=2 count=1 status=none | sha256sum", shell=True, check=True,
                        capture_output=True, text=True).stdout.split()[0]
    assert dd == journal[0][1][2]


def _manifest_folder(folder: Path, files: dict[str, bytes], version: int) -> None:
    folder.mkdir()
    entries = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        entries[name] = (publish.manifest_entry(len(data), expected_digest(data)) if version == 2
                         else {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": "vlconvert-manifest", "version": version, "files": entries}
    if version == 2:
        manifest["piece_bytes"] = PIECE
    (folder / publish.MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("version", [2, 1])
def test_verify_manifest_checks_pieces_and_names_the_piece_that_differs(big, tmp_path, version):
    """Version 2 (pieces) and version 1 (vlconvert 0.2: whole-file sha256) manifests are both checked."""
    _, data = big
    folder = tmp_path / "out"
    _manifest_folder(folder, {"big.bin": data, "small.json": b"{}"}, version)
    if version == 2:
        recorded = json.loads((folder / publish.MANIFEST_NAME).read_text())["files"]
        assert recorded["big.bin"] == {"size": len(data), "sha256_pieces": pieces(data)}
        assert recorded["small.json"] == {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}
    assert CliRunner().invoke(main, ["verify", "--manifest", str(folder)]).exit_code == 0
    with open(folder / "big.bin", "r+b") as f:  # one byte of the third piece
        f.seek(2 * PIECE + 10)
        f.write(bytes([data[2 * PIECE + 10] ^ 1]))
    result = CliRunner().invoke(main, ["verify", "--manifest", str(folder)])
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    if version == 2:
        assert "big.bin: sha256 differs from the manifest in 1 of 3 pieces" in said, result.output
        assert f"piece 2, from byte {2 * PIECE}" in said, result.output
    else:
        assert "big.bin: sha256 differs from the manifest" in said, result.output


@pytest.mark.parametrize("entry", [{"size": 3 * PIECE, "sha256_pieces": ["a" * 64, "b" * 64]},
                                   {"size": 1, "sha256_pieces": ["a" * 64, "b" * 64]},
                                   {"size": True, "sha256": "a" * 64},
                                   {"size": 1, "sha256_pieces": "a" * 64}])
def test_a_manifest_whose_pieces_do_not_fit_the_size_is_corrupt(tmp_path, entry):
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / publish.MANIFEST_NAME).write_text(json.dumps(
        {"format": "vlconvert-manifest", "version": 2, "piece_bytes": PIECE, "files": {"f": entry}}))
    result = CliRunner().invoke(main, ["verify", "--manifest", str(tmp_path)])
    assert result.exit_code == 1 and "is corrupt" in result.output, result.output


def test_a_manifest_with_other_pieces_is_refused_by_name(tmp_path):
    (tmp_path / publish.MANIFEST_NAME).write_text(json.dumps(
        {"format": "vlconvert-manifest", "version": 2, "piece_bytes": 2**20, "files": {}}))
    result = CliRunner().invoke(main, ["verify", "--manifest", str(tmp_path)])
    assert result.exit_code == 1 and "pieces of 1048576 bytes" in result.output, result.output


def test_hashing_threads_start_again_in_a_forked_child(tmp_path):
    """A torchrun-style fork after hashing started: the child hashes with its own threads (no hang)."""
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(3 * 2**20))
    assert hashing.file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = hashing.file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(("n1", "n2"), [(0, 0), (0, 5), (5, 0), (1, 1), (1000, 4097), (3, 2**20 + 3)])
def test_crc32_combine_equals_zlib_over_the_joined_bytes(n1, n2):
    a, b = random.Random(n1).randbytes(n1), random.Random(n2 + 1).randbytes(n2)
    assert hashing.crc32_combine(zlib.crc32(a), zlib.crc32(b), n2) == zlib.crc32(a + b)


def test_a_record_crc_over_buffers_and_ranges_hashed_by_other_threads(monkeypatch, tmp_path):
    """A zip record's CRC-32 when its copied ranges are read (and CRC'd) by the hashing threads, piece by piece,
    between buffers CRC'd on the checksum thread: equal to zlib over the bytes, and the file's pieces too."""
    monkeypatch.setattr(hashing, "PIECE_BYTES", 4096)
    rng = random.Random(7)
    data = rng.randbytes(50_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    journal, crc, expected = [], publish.Checksum(), b""

    class Stage:
        rehashed: list = []

        def journal(self, rel, size, sha256, state):
            journal.append((size, sha256))

    f = publish.OutputFile(tmp_path / "out.bin", Stage(), "out.bin")
    at = 0
    while at < len(data):
        n = min(rng.randint(1, 9000), len(data) - at)
        if rng.random() < 0.5:
            f.copy_range(src, at, n, crc=crc)
        else:
            f.write(bytes(data[at:at + n]) * 1, crc=crc)
        expected += data[at:at + n]
        at += n
    f.write_later(4, lambda: crc.value.to_bytes(4, "little"))  # a data descriptor: needs every part
    f.close()
    assert crc.value == zlib.crc32(data)
    on_disk = (tmp_path / "out.bin").read_bytes()
    assert on_disk == data + zlib.crc32(data).to_bytes(4, "little")
    assert journal == [(len(on_disk), pieces(on_disk, 4096))]
