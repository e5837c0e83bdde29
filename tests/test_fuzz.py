"""Seeded fuzzing of every file kind the readers accept: random byte flips and truncations.

Each case mutates one file of a working copy, runs a command in-process and restores the file. The contract:
exit 0 with sane output (a flip may be harmless, e.g. inside tensor data, which has no checksum by design),
or exit 1 with exactly one ``error:`` line on stderr (or, for ``verify``/``inspect``, a JSON report of the
difference and nothing on stderr), never a traceback, never the CLI's "internal error" fallback (every
reader must raise its own UserError naming the file), never a published output after a failure.
Flips are concentrated in headers, metadata and pickles, where a reader has something to detect.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from vlconvert.cli import main
from vlconvert.dcp_convert import hf_to_dcp
from vlconvert.layouts import megatron as mlay
from vlconvert.layouts.dcp import METADATA_NAME, read_dcp_metadata
from vlconvert.megatron_convert import hf_to_megatron

FIX = Path(__file__).resolve().parents[1] / "fixtures"
SOURCE = FIX / "tiny-dense-tied"
SEED = 8  # issue 8
SHARDS = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
Ranges = list[tuple[int, int]]


@dataclass
class World:
    """The inputs, built once: pristine folders and working copies the cases mutate and restore."""

    hf: Path  # pristine HF folder (also --assets-dir)
    hfw: Path  # working copy of hf
    dcpw: Path
    mgw: Path
    out: Path  # where converting commands write (removed after every case)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    base = tmp_path_factory.mktemp("fuzz")
    hf = base / "hf"
    shutil.copytree(SOURCE, hf, copy_function=shutil.copyfile)  # fixtures are hard-linked: never mutate them
    hf_to_dcp(hf, base / "dcp")
    hf_to_megatron(hf, base / "mg")
    for name in ("hf", "dcp", "mg"):
        shutil.copytree(base / name, base / f"{name}w", copy_function=shutil.copyfile)
    return World(hf, base / "hfw", base / "dcpw", base / "mgw", base / "out")


# ------------------------------------------------------------------------------------------ checking
def _json_ok(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def verdict(result: Result, out: Path | None = None, report_ok: bool = False) -> str | None:
    """None when ``result`` keeps the contract, else what is wrong."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        exc = result.exception
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    if "Traceback" in result.output:
        return "traceback in the output"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.exit_code == 0:
        if not _json_ok(result.stdout):
            return f"exit 0 without a JSON summary: {result.stdout[:200]!r}"
        if out is not None and not out.is_dir():
            return "exit 0 but nothing published"
        return None
    if result.exit_code != 1:
        return f"exit code {result.exit_code}: {result.output[-300:]!r}"
    if out is not None and out.exists():
        return "exit 1 but the output was published"
    if not lines and report_ok and _json_ok(result.stdout):
        return None  # verify / inspect: a difference or inconsistency, reported as JSON
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"exit 1 without exactly one error line: {result.stderr[-400:]!r}"
    if lines[0].startswith("error: internal error"):
        return lines[0][:300]  # the CLI's last line of defence: a reader missed it
    return None


class Fuzzer:
    """Runs the cases of one target and collects every broken contract."""

    def __init__(self, name: str):
        self.rng = random.Random(f"{SEED}-{name}")
        self.failures: list[str] = []
        self.cases = 0

    def mutate(self, data: bytes, regions: Ranges, truncate_share: float = 0.2,
               low_share: float = 0.0) -> tuple[bytes, str]:
        """Flip 1-3 bytes (XOR with a non-zero byte) at positions drawn from ``regions``, or truncate.

        ``low_share`` of the flips XOR with 1-127, which keeps ASCII text ASCII: JSON that still parses,
        with a changed name, number or bracket, instead of yet another invalid UTF-8 byte.
        """
        rng = self.rng
        if rng.random() < truncate_share:
            cut = rng.randrange(0, len(data))
            return data[:cut], f"truncated at {cut}"
        out = bytearray(data)
        where = []
        weights = [end - start for start, end in regions]
        for _ in range(rng.choice((1, 1, 2, 3))):
            start, end = rng.choices(regions, weights)[0]
            pos = rng.randrange(start, end)
            out[pos] ^= rng.randrange(1, 128) if rng.random() < low_share else rng.randrange(1, 256)
            where.append(pos)
        return bytes(out), f"flipped {where}"

    def run(self, path: Path, data: bytes, what: str, command: Callable[[], tuple[Result, Path | None, bool]]) -> None:
        """Write ``data`` to ``path``, run ``command``, check, restore ``path``."""
        original = path.read_bytes()
        path.write_bytes(data)
        self.cases += 1
        try:
            result, out, report_ok = command()
            problem = verdict(result, out, report_ok)
            if problem:
                self.failures.append(f"{path.name} {what}: {problem}")
        finally:
            path.write_bytes(original)
            if out is not None and out.exists():
                shutil.rmtree(out)

    def check(self, minimum: int) -> None:
        assert self.cases >= minimum
        assert not self.failures, f"{len(self.failures)} of {self.cases} cases broke the contract:\n" + \
            "\n".join(self.failures[:15])


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def inspect_cmd(folder: Path, *extra: object) -> Callable[[], tuple[Result, Path | None, bool]]:
    return lambda: (invoke("inspect", folder, *extra, "--json"), None, True)


def convert_cmd(name: str, src: Path, world: World) -> Callable[[], tuple[Result, Path | None, bool]]:
    return lambda: (invoke(name, src, world.out, "--assets-dir", world.hf, "--json"), world.out, False)


def zip_data_ranges(buf: bytes, base: int = 0) -> Ranges:
    """Byte ranges (in the file, offset by ``base``) of the tensor payloads of a torch zip archive."""
    ranges = []
    with zipfile.ZipFile(io.BytesIO(buf)) as zf:
        for info in zf.infolist():
            if "/data/" in info.filename:
                n, m = int.from_bytes(buf[info.header_offset + 26:info.header_offset + 28], "little"), \
                    int.from_bytes(buf[info.header_offset + 28:info.header_offset + 30], "little")
                start = info.header_offset + 30 + n + m
                ranges.append((base + start, base + start + info.file_size))
    return ranges


def complement(ranges: Ranges, size: int) -> Ranges:
    """The parts of ``[0, size)`` outside ``ranges``."""
    out, pos = [], 0
    for start, end in sorted(ranges):
        if start > pos:
            out.append((pos, start))
        pos = max(pos, end)
    if pos < size:
        out.append((pos, size))
    return out


# ---------------------------------------------------------------------------------------- safetensors
def test_fuzz_safetensors_headers(world: World) -> None:
    fuzz = Fuzzer("safetensors-header")
    for i in range(300):
        path = world.hfw / SHARDS[i % 3]
        data = path.read_bytes()
        header_end = 8 + int.from_bytes(data[:8], "little")
        regions = [(0, 8), (8, header_end)] if i % 4 == 0 else [(8, header_end)]
        mutated, what = fuzz.mutate(data, regions, low_share=0.7)
        if i % 6 == 5:  # a full read too: tensors whose header still parses are compared with the source
            fuzz.run(path, mutated, what, lambda: (invoke("verify", world.hfw, world.hf, "--json"), None, True))
        else:
            fuzz.run(path, mutated, what, inspect_cmd(world.hfw))
    fuzz.check(300)


def test_fuzz_safetensors_data(world: World) -> None:
    """Flips in tensor bytes are undetectable by design: verify must report them, never crash."""
    fuzz = Fuzzer("safetensors-data")
    for i in range(30):
        path = world.hfw / SHARDS[i % 3]
        data = path.read_bytes()
        header_end = 8 + int.from_bytes(data[:8], "little")
        mutated, what = fuzz.mutate(data, [(header_end, len(data))], truncate_share=0.1)
        fuzz.run(path, mutated, what, lambda: (invoke("verify", world.hfw, world.hf, "--json"), None, True))
    fuzz.check(30)


def test_fuzz_index(world: World) -> None:
    fuzz = Fuzzer("index")
    path = world.hfw / "model.safetensors.index.json"
    data = path.read_bytes()
    for _ in range(120):
        mutated, what = fuzz.mutate(data, [(0, len(data))], low_share=0.7)
        fuzz.run(path, mutated, what, inspect_cmd(world.hfw))
    fuzz.check(120)


# ------------------------------------------------------------------------------------------------ DCP
def test_fuzz_dcp_metadata(world: World) -> None:
    fuzz = Fuzzer("dcp-metadata")
    path = world.dcpw / METADATA_NAME
    data = path.read_bytes()
    for i in range(250):
        mutated, what = fuzz.mutate(data, [(0, len(data))], low_share=0.5)
        if i % 4 == 3:
            fuzz.run(path, mutated, what, convert_cmd("dcp-to-hf", world.dcpw, world))
        else:
            fuzz.run(path, mutated, what, inspect_cmd(world.dcpw, "--assets-dir", world.hf))
    fuzz.check(250)


def test_fuzz_distcp(world: World) -> None:
    fuzz = Fuzzer("distcp")
    metadata = read_dcp_metadata(world.dcpw)
    files = sorted({info.relative_path for info in metadata.storage_data.values()})
    for i in range(90):
        name = files[i % len(files)]
        path = world.dcpw / name
        data = path.read_bytes()
        payload: Ranges = []
        for info in metadata.storage_data.values():
            if info.relative_path == name:
                payload += zip_data_ranges(data[info.offset:info.offset + info.length], info.offset)
        regions = complement(payload, len(data)) if i % 5 else [(0, len(data))]
        mutated, what = fuzz.mutate(data, regions, truncate_share=0.1)
        if i % 3 == 0:
            fuzz.run(path, mutated, what, convert_cmd("dcp-to-hf", world.dcpw, world))
        else:  # reads every chunk too, without writing
            fuzz.run(path, mutated, what, lambda: (invoke("verify", world.dcpw, world.hf, "--json"), None, True))
    fuzz.check(90)


# ------------------------------------------------------------------------------------------- Megatron
def _rank_file(world: World) -> Path:
    return world.mgw / "release" / "mp_rank_00" / mlay.RANK_FILE


def test_fuzz_rank_file_bytes(world: World) -> None:
    fuzz = Fuzzer("rank-file")
    path = _rank_file(world)
    data = path.read_bytes()
    regions = complement(zip_data_ranges(data), len(data))
    for i in range(150):
        mutated, what = fuzz.mutate(data, regions)
        if i % 3 == 2:
            fuzz.run(path, mutated, what, convert_cmd("megatron-to-hf", world.mgw, world))
        else:
            fuzz.run(path, mutated, what, inspect_cmd(world.mgw))
    fuzz.check(150)


def _rezip(data: bytes, pkl: bytes) -> bytes:
    """``data`` (a torch zip) with its data.pkl replaced, CRC and sizes rewritten to match."""
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info in src.infolist():
            zf.writestr(info.filename, pkl if info.filename.endswith("/data.pkl") else src.read(info))
    return buf.getvalue()


def test_fuzz_rank_file_pickle(world: World) -> None:
    """Flips inside data.pkl behind a valid CRC: what the restricted unpickler itself must withstand."""
    fuzz = Fuzzer("rank-pickle")
    path = _rank_file(world)
    data = path.read_bytes()
    pkl = next(zipfile.ZipFile(io.BytesIO(data)).read(n) for n in zipfile.ZipFile(io.BytesIO(data)).namelist()
               if n.endswith("/data.pkl"))
    for i in range(200):
        mutated, what = fuzz.mutate(pkl, [(0, len(pkl))], truncate_share=0.15, low_share=0.5)
        command = convert_cmd("megatron-to-hf", world.mgw, world) if i % 3 == 2 else inspect_cmd(world.mgw)
        fuzz.run(path, _rezip(data, mutated), f"data.pkl {what}", command)
    fuzz.check(200)


def test_fuzz_tracker(world: World) -> None:
    fuzz = Fuzzer("tracker")
    path = world.mgw / mlay.TRACKER
    seeds = [b"release", b"release\n", b"1200", b" 7 \n"]
    for i in range(80):
        if i % 5 == 4:
            mutated, what = bytes(fuzz.rng.randrange(256) for _ in range(fuzz.rng.randrange(0, 40))), "random bytes"
        else:
            seed = seeds[i % len(seeds)]
            mutated, what = fuzz.mutate(seed, [(0, len(seed))], low_share=0.7)
        fuzz.run(path, mutated, f"{what} -> {mutated!r}", inspect_cmd(world.mgw))
    fuzz.check(80)


# -------------------------------------------------------------------------------------------- tokenizer
def test_fuzz_tokenizer_json(world: World) -> None:
    fuzz = Fuzzer("tokenizer")
    path = world.hfw / "tokenizer.json"
    data = path.read_bytes()
    head = data.index(b'"model"')  # the added tokens, normalizer and pre-tokenizer come first: flip there mostly
    for i in range(200):
        mutated, what = fuzz.mutate(data, [(0, head)] if i % 3 else [(0, len(data))], low_share=0.7)
        if i % 10 == 9:  # a full retag too (reads every tokenizer file, rewrites, publishes)
            fuzz.run(path, mutated, what, lambda: (invoke("retag-think", world.hfw, "--out", world.out, "--json"),
                                                   world.out, False))
        else:
            fuzz.run(path, mutated, what, lambda: (invoke("retag-think", world.hfw, "--check", "--json"), None, False))
    fuzz.check(200)
