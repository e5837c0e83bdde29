"""Hostile and malformed input files: each ends in one ``error:`` line naming the file, exit 1, nothing published.

Every reader (safetensors headers and indexes, DCP ``.metadata`` and records, Megatron rank files and the
tracker, tokenizer files, templates and ``--data`` JSONL) raises a UserError for these, never another
exception, and checks everything before an output is published.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from vlconvert.cli import main
from vlconvert.dcp_convert import hf_to_dcp
from vlconvert.errors import UserError
from vlconvert.layouts import megatron as mlay
from vlconvert.layouts.dcp import METADATA_NAME, DCPReader, read_dcp_metadata
from vlconvert.layouts.hf import INDEX_NAME, HFCheckpoint, read_header
from vlconvert.megatron_convert import hf_to_megatron

FIX = Path(__file__).resolve().parents[1] / "fixtures"
TIED = FIX / "tiny-dense-tied"


# ------------------------------------------------------------------------------------------ helpers
def invoke(*args: object) -> Result:
    """Run ``vlconvert`` in-process (exceptions are caught by the runner, never by the test)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(result: Result) -> str:
    """Assert the one-line ``error:`` contract; return that line."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not lines[0].startswith("error: internal error"), lines[0]  # a reader must raise its own UserError
    return lines[0]


def cli_error(*args: object) -> str:
    return one_error(invoke(*args))


def copy_tree(src: Path, dst: Path) -> Path:
    """A real copy (fixtures are hard-linked elsewhere: never edit them in place)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


def safetensors_bytes(header: object, data: bytes = b"", *, raw_header: bytes | None = None,
                      length: int | None = None) -> bytes:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def one_shard_folder(tmp_path: Path, content: bytes) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(content)
    return folder


def f32(shape: object, offsets: object) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


# ------------------------------------------------------------------------------------ safetensors
HEADER_CASES = [
    ("negative-begin", {"a": f32([1], [-4, 0])}, 4, "bad data_offsets"),
    ("begin-after-end", {"a": f32([1], [8, 4])}, 8, "bad data_offsets"),
    ("three-offsets", {"a": f32([1], [0, 4, 8])}, 8, "bad data_offsets"),
    ("float-offsets", {"a": f32([1], [0.0, 4.0])}, 4, "bad data_offsets"),
    ("bool-offsets", {"a": f32([1], [False, True])}, 4, "bad data_offsets"),
    ("past-the-end", {"a": f32([100], [0, 400])}, 4, "is truncated: header needs"),
    ("wrong-byte-count", {"a": f32([2], [0, 4])}, 4, "has 4 bytes for shape [2]"),
    ("overlap", {"a": f32([2], [0, 8]), "b": f32([2], [4, 12])}, 12, "overlaps the tensor before it"),
    ("gap", {"a": f32([1], [0, 4]), "b": f32([1], [8, 12])}, 12, "leaves a gap at byte 4"),
    ("not-from-zero", {"a": f32([1], [4, 8])}, 8, "leaves a gap at byte 0"),
    ("trailing-bytes", {"a": f32([1], [0, 4])}, 12, "8 bytes follow the last tensor"),
    ("shape-2**70", {"a": f32([2**70], [0, 4])}, 4, "bad shape"),
    ("shape-product", {"a": f32([0, 2**40, 2**40], [0, 0])}, 0, "too large to exist"),
    ("shape-negative", {"a": f32([-1], [0, 4])}, 4, "bad shape"),
    ("shape-float", {"a": f32([1.5], [0, 4])}, 4, "bad shape"),
    ("shape-bool", {"a": f32([True], [0, 4])}, 4, "bad shape"),
    ("shape-string", {"a": f32(["1"], [0, 4])}, 4, "bad shape"),
    ("shape-not-list", {"a": f32(4, [0, 4])}, 4, "bad shape"),
    ("dtype-unknown", {"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, 4, "unknown dtype 'F33'"),
    ("dtype-number", {"a": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, 4, "unknown dtype 7"),
    ("entry-list", {"a": [1, 2]}, 0, "header entry 'a' is not an object"),
    ("entry-missing-key", {"a": {"dtype": "F32", "data_offsets": [0, 4]}}, 4, "has no 'shape'"),
    ("metadata-list", {"__metadata__": ["x"], "a": f32([1], [0, 4])}, 4, "__metadata__ is not an object of strings"),
    ("metadata-number-value", {"__metadata__": {"format": 1}}, 0, "__metadata__ is not an object of strings"),
    ("header-list", [], 0, "header is not a JSON object"),
]


@pytest.mark.parametrize("header,data_len,message", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_bad_safetensors_header(tmp_path: Path, header: object, data_len: int, message: str) -> None:
    folder = one_shard_folder(tmp_path, safetensors_bytes(header, bytes(data_len)))
    with pytest.raises(UserError, match="^'.*model.safetensors' ") as info:
        read_header(folder / "model.safetensors")
    assert message in str(info.value)
    line = cli_error("inspect", folder, "--json")
    assert message in line and "model.safetensors" in line


RAW_HEADER_CASES = [
    ("overflowing-float", b'{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', "bad shape"),
    ("huge-integer-literal", b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
     "is not usable JSON"),
    ("deep-nesting", b"[" * 100_000, "nested too deeply"),
    ("deep-object", b'{"a":' * 50_000, "nested too deeply"),
    ("invalid-utf8", b'{"\xff\xfe": 1}', "not valid UTF-8"),
    ("not-json", b"{not json}", "not valid JSON"),
    ("nan", b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', "bad shape"),
]


@pytest.mark.parametrize("raw,message", [c[1:] for c in RAW_HEADER_CASES], ids=[c[0] for c in RAW_HEADER_CASES])
def test_malformed_safetensors_json(tmp_path: Path, raw: bytes, message: str) -> None:
    folder = one_shard_folder(tmp_path, safetensors_bytes(None, bytes(4), raw_header=raw))
    line = cli_error("inspect", folder, "--json")
    assert message in line and "model.safetensors" in line


def test_header_length_lies(tmp_path: Path) -> None:
    folder = one_shard_folder(tmp_path, safetensors_bytes({}, length=2**63))
    assert "does not fit the file size" in cli_error("inspect", folder)
    (folder / "model.safetensors").write_bytes(b"\x01\x02")
    assert "shorter than 8 bytes" in cli_error("inspect", folder)


# ------------------------------------------------------------------------------------------ index
def _index_folder(tmp_path: Path) -> Path:
    return copy_tree(TIED, tmp_path / "hf")


def _write_index(folder: Path, content: object | bytes) -> None:
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    (folder / INDEX_NAME).write_bytes(raw)


INDEX_CASES = [
    ("not-object", [1, 2], "the index is not a JSON object"),
    ("weight-map-list", {"weight_map": ["model-00001-of-00003.safetensors"]}, "weight_map is missing or not an object"),
    ("weight-map-missing", {"metadata": {}}, "weight_map is missing or not an object"),
    ("value-not-string", {"weight_map": {"x": 3}}, "weight_map['x'] is not a file name string"),
    ("parent", {"weight_map": {"x": "../x.safetensors"}}, "which is not a file name inside the folder"),
    ("absolute", {"weight_map": {"x": "/etc/passwd"}}, "which is not a file name inside the folder"),
    ("subfolder", {"weight_map": {"x": "sub/x.safetensors"}}, "which is not a file name inside the folder"),
    ("invalid-utf8", b'{"weight_map": {"\xff": "a"}}', "is not valid UTF-8"),
    ("deep", b"[" * 100_000, "nested too deeply"),
    ("infinite-total-size", b'{"metadata": {"total_size": 1e400}, "weight_map": {}}', "metadata.total_size is inf"),
]


@pytest.mark.parametrize("content,message", [c[1:] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES])
def test_bad_index(tmp_path: Path, content: object, message: str) -> None:
    folder = _index_folder(tmp_path)
    _write_index(folder, content)
    line = cli_error("inspect", folder, "--json")
    assert message in line and INDEX_NAME in line


def test_index_through_a_symlinked_folder_is_refused(tmp_path: Path) -> None:
    folder = _index_folder(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(TIED / "model-00002-of-00003.safetensors", outside / "x.safetensors")
    (folder / "sub").symlink_to(outside)
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"] = {k: ("sub/x.safetensors" if v.startswith("model-00002") else v)
                           for k, v in index["weight_map"].items()}
    _write_index(folder, index)
    assert "not a file name inside the folder" in cli_error("inspect", folder)


def test_shard_symlink_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    folder = _index_folder(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = folder / "model-00002-of-00003.safetensors"
    shard.rename(outside / shard.name)
    shard.symlink_to(outside / shard.name)
    line = cli_error("inspect", folder)
    assert "links to" in line and "outside the checkpoint folder" in line


def test_hf_cache_snapshot_links_are_read(tmp_path: Path) -> None:
    """The Hugging Face cache layout (snapshots/REV/file -> ../../blobs/SHA) stays readable."""
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for path in TIED.iterdir():
        shutil.copyfile(path, repo / "blobs" / path.name)
        (snap / path.name).symlink_to(Path("../../blobs") / path.name)
    assert len(HFCheckpoint(snap).tensors) == len(HFCheckpoint(TIED).tensors)


# -------------------------------------------------------------------------------------------- DCP
@pytest.fixture(scope="module")
def dcp_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("hostile-dcp")
    hf_to_dcp(TIED, base / "dcp")
    return base / "dcp"


@pytest.fixture
def dcp(dcp_base: Path, tmp_path: Path) -> Path:
    return copy_tree(dcp_base, tmp_path / "dcp")


def edit_metadata(folder: Path, edit) -> None:
    """Unpickle ``.metadata`` (our own file), let ``edit`` change it, pickle it back."""
    path = folder / METADATA_NAME
    metadata = pickle.loads(path.read_bytes())
    edit(metadata)
    path.write_bytes(pickle.dumps(metadata))


def _first(metadata):
    key = next(iter(metadata.state_dict_metadata))
    index = next(i for i in metadata.storage_data if i.fqn == key)
    return key, metadata.state_dict_metadata[key], index, metadata.storage_data[index]


def _set_path(value):
    def edit(md):
        md.storage_data = {i: type(s)(value, s.offset, s.length) for i, s in md.storage_data.items()}
    return edit


def _set_storage(field: str, value):
    def edit(md):
        _, _, index, info = _first(md)
        setattr(info, field, value)
    return edit


def _set_entry(field: str, value):
    def edit(md):
        setattr(_first(md)[1], field, value)
    return edit


def _set_chunk(field: str, value):
    def edit(md):
        setattr(_first(md)[1].chunks[0], field, value)
    return edit


def _set_dtype(value):
    def edit(md):
        _first(md)[1].properties.dtype = value
    return edit


def _shrink_record(md):
    _, _, _, info = _first(md)
    info.length = 16


DCP_CASES = [
    ("path-parent", _set_path("../__0_0.distcp"), "not a file name inside the checkpoint folder"),
    ("path-absolute", _set_path("/etc/passwd"), "not a file name inside the checkpoint folder"),
    ("path-not-string", _set_path(7), "not a file name inside the checkpoint folder"),
    ("path-through-folder", _set_path("sub/__0_0.distcp"), "not a file name inside the checkpoint folder"),
    ("state-dict-metadata-list", lambda md: setattr(md, "state_dict_metadata", []),
     "state_dict_metadata is not a dict"),
    ("storage-data-list", lambda md: setattr(md, "storage_data", [1]), "storage_data is not a dict"),
    ("planner-data-list", lambda md: setattr(md, "planner_data", [1]), "planner_data is not a dict"),
    ("chunks-not-list", _set_entry("chunks", "abc"), "chunks that are not a list"),
    ("size-negative", _set_entry("size", torch.Size([-1])), "has a bad size"),
    ("size-float", _set_entry("size", (1.5,)), "has a bad size"),
    ("size-huge", _set_entry("size", torch.Size([2**40, 2**40])), "too large to exist"),
    ("chunk-offsets-negative", _set_chunk("offsets", torch.Size([-1])), "bad offsets/sizes"),
    ("chunk-sizes-not-ints", _set_chunk("sizes", ("a",)), "bad offsets/sizes"),
    ("chunk-rank-mismatch", _set_chunk("sizes", torch.Size([64, 1])), "bad offsets/sizes"),
    ("chunk-outside", _set_chunk("sizes", torch.Size([33])), "has a chunk at [0] of [33] outside its size [32]"),
    ("dtype-string", _set_dtype("float32"), "has no valid dtype"),
    ("storage-offset-negative", _set_storage("offset", -1), "has offset -1"),
    ("storage-length-float", _set_storage("length", 1.5), "and length 1.5"),
    ("storage-length-bool", _set_storage("length", True), "and length True"),
    ("record-too-small", _shrink_record, "needs 64 bytes, its record in"),
]


@pytest.mark.parametrize("edit,message", [c[1:] for c in DCP_CASES], ids=[c[0] for c in DCP_CASES])
def test_bad_dcp_metadata(dcp: Path, tmp_path: Path, edit, message: str) -> None:
    edit_metadata(dcp, edit)
    with pytest.raises(UserError):
        DCPReader(dcp)
    line = cli_error("dcp-to-hf", dcp, tmp_path / "out", "--assets-dir", TIED)
    assert message in line and str(dcp) in line
    assert not (tmp_path / "out").exists()


def test_dcp_metadata_refuses_other_globals_and_garbage(dcp: Path, tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (dcp / METADATA_NAME).write_bytes(pickle.dumps(Evil()))
    line = cli_error("inspect", dcp, "--assets-dir", TIED)
    assert "holds something other than DCP metadata: refusing to load posix.system" in line
    assert not (tmp_path / "pwned").exists()
    (dcp / METADATA_NAME).write_bytes(b"\x80\x04garbage")
    assert "is corrupt or truncated" in cli_error("inspect", dcp, "--assets-dir", TIED)
    (dcp / METADATA_NAME).write_bytes(pickle.dumps({"not": "metadata"}))
    assert "is not DCP metadata" in cli_error("inspect", dcp, "--assets-dir", TIED)


MEMO_BOMBS = [b"\x80\x02Nr\xff\xff\xff\xff.", b"\x80\x02Np4294967295\n."]  # 9 bytes -> a 64 GiB memo


@pytest.mark.parametrize("bomb", MEMO_BOMBS, ids=["long-binput", "put"])
def test_pickle_memo_bomb_is_refused(dcp: Path, mg: Path, tmp_path: Path, bomb: bytes) -> None:
    """CPython's unpickler would allocate and zero a memo array as large as the index a PUT names."""
    (dcp / METADATA_NAME).write_bytes(bomb)
    line = cli_error("inspect", dcp, "--assets-dir", TIED)
    assert "is corrupt or truncated (UnpicklingError: memo index" in line
    path = rank_path(mg)
    zip_with(path, bomb)
    line = cli_error("megatron-to-hf", mg, tmp_path / "out", "--assets-dir", TIED)
    assert "will not unpickle (UnpicklingError: memo index" in line and str(path) in line


def test_dcp_data_file_linked_from_outside_is_refused(dcp: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (dcp / "__0_0.distcp").rename(outside / "__0_0.distcp")
    (dcp / "__0_0.distcp").symlink_to(outside / "__0_0.distcp")
    line = cli_error("dcp-to-hf", dcp, tmp_path / "out", "--assets-dir", TIED)
    assert "links to" in line and "outside the checkpoint folder" in line and not (tmp_path / "out").exists()


def test_dcp_chunks_must_tile_the_tensor(dcp: Path) -> None:
    def overlap(md):
        key, entry, index, info = _first(md)  # a [32] tensor: chunks [0, 20) and [10, 22) overlap, [22, 32) lost
        entry.chunks = [ChunkStorageMetadata(torch.Size([0]), torch.Size([20])),
                        ChunkStorageMetadata(torch.Size([10]), torch.Size([12]))]
        md.storage_data[MetadataIndex(key, torch.Size([10]), 0)] = info

    edit_metadata(dcp, overlap)
    with pytest.raises(UserError, match="two of its chunks overlap"):
        DCPReader(dcp)

    def short(md):
        key, entry, index, info = _first(md)
        entry.chunks = [ChunkStorageMetadata(torch.Size([0]), torch.Size([20]))]

    edit_metadata(dcp, short)
    with pytest.raises(UserError, match="its chunks cover 20 of its 32 elements"):
        DCPReader(dcp)


def test_dcp_compressed_record_is_refused(dcp: Path, tmp_path: Path) -> None:
    """A deflated entry inside a record (torch.load would inflate it to any size it claims)."""
    buf = io.BytesIO()
    torch.save(torch.zeros(64, dtype=torch.bfloat16), buf)
    plain = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for info in plain.infolist():
            zf.writestr(info.filename, plain.read(info))
    (dcp / "__0_9.distcp").write_bytes(bomb.getvalue())

    def point(md):
        _, _, index, info = _first(md)
        md.storage_data[index] = type(info)("__0_9.distcp", 0, len(bomb.getvalue()))

    edit_metadata(dcp, point)
    line = cli_error("dcp-to-hf", dcp, tmp_path / "out", "--assets-dir", TIED)
    assert "__0_9.distcp' is corrupt at byte 0: record entry" in line and "is compressed" in line
    assert not (tmp_path / "out").exists()


def test_dcp_record_that_is_not_a_zip(dcp: Path, tmp_path: Path) -> None:
    with open(dcp / "__0_0.distcp", "r+b") as f:
        f.write(b"JUNK")
    line = cli_error("dcp-to-hf", dcp, tmp_path / "out", "--assets-dir", TIED)
    assert "__0_0.distcp' is corrupt at byte 0: not a torch.save record" in line


def test_unprintable_values_still_give_one_line(tmp_path: Path) -> None:
    """A pickle can build a list nested 100k deep (no recursion needed): messages describe it by type."""
    from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata

    from vlconvert.layouts import dcp as dcp_layout

    deep: list = []
    inner = deep
    for _ in range(100_000):
        inner.append([])
        inner = inner[0]
    entry = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([1]), [])
    entry.size = deep
    with pytest.raises(UserError, match="has a bad size <list>$"):
        dcp_layout._check_tensor_entry(tmp_path / METADATA_NAME, "k", entry)


def test_read_dcp_metadata_missing_attributes(dcp: Path) -> None:
    """A BUILD without the dataclass fields (attributes simply absent)."""
    def strip(md):
        del md.state_dict_metadata

    edit_metadata(dcp, strip)
    with pytest.raises(UserError, match="state_dict_metadata is not a dict"):
        read_dcp_metadata(dcp)


# --------------------------------------------------------------------------------------- Megatron
@pytest.fixture(scope="module")
def mg_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("hostile-mg")
    hf_to_megatron(TIED, base / "mg")
    return base / "mg"


@pytest.fixture
def mg(mg_base: Path, tmp_path: Path) -> Path:
    return copy_tree(mg_base, tmp_path / "mg")


def rank_path(root: Path) -> Path:
    return root / "release" / "mp_rank_00" / mlay.RANK_FILE


def zip_with(path: Path, pkl: bytes, records: dict[str, bytes] | None = None,
             compression: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl, compress_type=compression)
        for key, data in (records or {}).items():
            zf.writestr(f"archive/data/{key}", data)


def mg_pickle(payload: object) -> bytes:
    buf = io.BytesIO()
    mlay._dump(payload, buf)
    return buf.getvalue()


def tensor_ref(key: str, shape: tuple[int, ...], numel: int) -> object:
    return mlay._TensorRef(mlay._StorageRef(key, torch.float32, numel), shape)


def test_megatron_zip_bomb_is_refused_with_flat_memory(mg: Path, tmp_path: Path) -> None:
    path = rank_path(mg)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf, \
            zf.open("archive/data.pkl", "w", force_zip64=True) as out:
        block = bytes(2**20)
        for _ in range(mlay.MAX_DATA_PKL // 2**20 + 16):  # 80 MiB of zeros: ~80 KiB on disk
            out.write(block)
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="data.pkl inflates to 83886080 bytes, more than the 64 MiB"):
            mlay.RankFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20
    line = cli_error("megatron-to-hf", mg, tmp_path / "out", "--assets-dir", TIED)
    assert "data.pkl inflates to" in line and not (tmp_path / "out").exists()


def test_megatron_data_pkl_bound_enforced_while_reading(tmp_path: Path, monkeypatch) -> None:
    """A directory that understates data.pkl: the read itself stops at the bound."""
    path = tmp_path / "r.pt"
    zip_with(path, mg_pickle({"model": {}}) + b"\0" * 5000, compression=zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    cd = raw.rindex(b"PK\x01\x02")
    struct.pack_into("<I", raw, cd + 24, 100)  # the central directory now says 100 bytes
    path.write_bytes(bytes(raw))
    monkeypatch.setattr(mlay, "MAX_DATA_PKL", 1000)
    with pytest.raises(UserError, match="r.pt"):
        mlay.RankFile(path)


class _Reduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


MG_PICKLE_CASES = [
    ("device-huge-index", {"model": {}, "x": _Reduce(torch.device, "cuda:99999999999")}, "will not unpickle"),
    ("device-float", {"model": {}, "x": _Reduce(torch.device, 1.5)}, "will not unpickle"),
    ("size-in-model", {"model": {"w": _Reduce(torch.Size, [2**70])}}, "model entry 'w' is not a tensor (Size)"),
    ("shape-huge", {"model": {"w": tensor_ref("0", (2**70,), 1)}}, "has offset 0, shape [1180591620717411303424]"),
    ("shape-product", {"model": {"w": tensor_ref("0", (2**40, 2**40), 1)}}, "has a shape too large to exist"),
    ("rebuild-float-offset", {"model": {"w": _Reduce(torch._utils._rebuild_tensor_v2, "s", 1e300, (1,), (1,))}},
     "will not unpickle"),
    ("codecs-odd-encoding", {"model": {}, "x": _Reduce(__import__("_codecs").encode, "x", "rot13")},
     "will not unpickle"),
    ("model-not-dict", {"model": [1, 2]}, "its 'model' entry is not a dict"),
    ("model-key-not-str", {"model": {3: None}}, "a model entry name is not a string"),
    ("not-a-dict", [1, 2, 3], "does not hold a checkpoint dict"),
    ("no-model", {"optimizer": {}}, "has no 'model' entry"),
    ("missing-record", {"model": {"w": tensor_ref("7", (4,), 4)}}, "references storage record '7', which is missing"),
    ("outside-record", {"model": {"w": tensor_ref("0", (100,), 100)}}, "reaches byte 400 of storage record '0'"),
    ("meta-tp-string", {"model": {}, "vlconvert": {"tp": "x"}}, "corrupt vlconvert metadata: 'tp' is 'x'"),
    ("meta-config-bad-json", {"model": {}, "vlconvert": {"hf_config": "{oops"}}, "hf_config is not valid JSON"),
    ("meta-config-list", {"model": {}, "vlconvert": {"hf_config": "[1]"}}, "hf_config is not a config object"),
    ("meta-text-config-list", {"model": {}, "vlconvert": {"hf_config": '{"text_config": []}'}},
     "hf_config is not a config object"),
    ("meta-stage-layers", {"model": {}, "vlconvert": {"stage_layers": "3"}}, "stage_layers is not a list"),
]


@pytest.mark.parametrize("payload,message", [c[1:] for c in MG_PICKLE_CASES], ids=[c[0] for c in MG_PICKLE_CASES])
def test_hostile_rank_pickle(mg: Path, tmp_path: Path, payload: object, message: str) -> None:
    path = rank_path(mg)
    zip_with(path, mg_pickle(payload), {"0": bytes(16)})
    with pytest.raises(UserError):
        mlay.RankFile(path)
    line = cli_error("megatron-to-hf", mg, tmp_path / "out", "--assets-dir", TIED)
    assert message in line and str(path) in line
    assert not (tmp_path / "out").exists()


class _RebuiltThenBuilt(mlay._TensorRef):
    """A tensor whose pickle BUILDs new attributes onto the rebuilt object (bypassing its constructor)."""

    def __reduce__(self):
        return (*super().__reduce__(), {"shape": ("a",), "offset": -1})


def test_build_onto_a_rebuilt_tensor(mg: Path, tmp_path: Path) -> None:
    path = rank_path(mg)
    ref = _RebuiltThenBuilt(mlay._StorageRef("0", torch.float32, 4), (4,))
    zip_with(path, mg_pickle({"model": {"w": ref}}), {"0": bytes(16)})
    line = cli_error("megatron-to-hf", mg, tmp_path / "out", "--assets-dir", TIED)
    assert "tensor 'w' has a malformed storage reference, offset, shape or stride" in line


def test_disallowed_global_is_never_called(mg: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = rank_path(mg)
    zip_with(path, mg_pickle({"model": {"w": _Reduce(os.system, f"touch {marker}")}}))
    line = cli_error("megatron-to-hf", mg, tmp_path / "out", "--assets-dir", TIED)
    assert "model entry 'w' is not a tensor (system)" in line and not marker.exists()
    zip_with(path, mg_pickle({"model": {}, "args": _Reduce(os.system, f"touch {marker}")}))
    assert isinstance(mlay.RankFile(path).args, dict) and not marker.exists()


def test_non_numeric_decoder_layer(mg: Path, tmp_path: Path) -> None:
    path = rank_path(mg)
    with zipfile.ZipFile(path) as zf:
        entries = {info.filename: zf.read(info) for info in zf.infolist()}
    pkl = entries["archive/data.pkl"]
    entries["archive/data.pkl"] = pkl.replace(b"language_model.decoder.layers.0.", b"language_model.decoder.layers.x.",
                                              1)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    line = cli_error("megatron-to-hf", mg, tmp_path / "out", "--assets-dir", TIED)
    assert str(path) in line


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_rank_file(mg: Path, tmp_path: Path, cut: float) -> None:
    path = rank_path(mg)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * cut)])
    line = cli_error("megatron-to-hf", mg, tmp_path / "out", "--assets-dir", TIED)
    assert "is not a zip-format torch checkpoint or is corrupt" in line and str(path) in line


def test_garbage_in_data_pkl_is_caught_by_crc(mg: Path, tmp_path: Path) -> None:
    path = rank_path(mg)
    raw = bytearray(path.read_bytes())
    start = raw.index(b"archive/data.pkl") + len("archive/data.pkl")
    raw[start + 200] ^= 0xFF
    path.write_bytes(bytes(raw))
    line = cli_error("megatron-to-hf", mg, tmp_path / "out", "--assets-dir", TIED)
    assert str(path) in line and "corrupt" in line


TRACKER_CASES = [
    ("binary", b"\xff\xfe\x00garbage", "is corrupt: not plain text (byte 0 is 0xff)"),
    ("huge", b"1" * 10_000, "is corrupt: over 4096 bytes"),
    ("negative", b"-5", "holds '-5', neither 'release' nor an iteration number"),
    ("release-junk", b"release junk\n\x1b[31m", "holds 'release junk"),
    ("too-many-digits", b"9" * 30, "neither 'release' nor an iteration number"),
    ("empty", b"", "holds '', neither"),
]


@pytest.mark.parametrize("content,message", [c[1:] for c in TRACKER_CASES], ids=[c[0] for c in TRACKER_CASES])
def test_bad_tracker(mg: Path, tmp_path: Path, content: bytes, message: str) -> None:
    (mg / mlay.TRACKER).write_bytes(content)
    line = cli_error("megatron-to-hf", mg, tmp_path / "out", "--assets-dir", TIED)
    assert message in line and mlay.TRACKER in line and not (tmp_path / "out").exists()


def test_tracker_with_a_newline_is_fine(mg: Path) -> None:
    (mg / mlay.TRACKER).write_bytes(b"release\n")
    assert mlay.find_iteration_dir(mg)[0] == mg / "release"


# ------------------------------------------------------------------------------------ retag-think
@pytest.fixture
def tok_folder(tmp_path: Path) -> Path:
    return copy_tree(TIED, tmp_path / "src")


TOKENIZER_CASES = [
    ("tokenizer.json", b"[1, 2]", "holds a list where a JSON object belongs"),
    ("tokenizer.json", b'{"added_tokens": {"a": 1}}', "added_tokens is an object, not a list"),
    ("tokenizer.json", b'{"added_tokens": [{"content": "<think>", "id": "7"}]}',
     "added_tokens[0] is not an object with a string content and an integer id"),
    ("tokenizer.json", b'{"added_tokens": [], "model": []}', "model is a list, not an object"),
    ("tokenizer.json", b'{"added_tokens": [], "model": {"vocab": {"a": -1}}}', "has a value that is not a token id"),
    ("tokenizer.json", b'{"added_tokens": [], "model": {"vocab": 3}}', "model.vocab is a number"),
    ("tokenizer.json", b'{"\xff": 1}', "is not valid UTF-8 text (byte 2)"),
    ("tokenizer.json", b"[" * 100_000, "nested too deeply"),
    ("tokenizer.json", b'{"added_tokens": [{"content": "<think>", "id": 1}, {"content": "</think>", "id": 2}], '
                       b'"model": {"type": "Nope"}}', "cannot be loaded by the tokenizers library"),
    ("tokenizer_config.json", b'["a"]', "holds a list where a JSON object belongs"),
    ("tokenizer_config.json", b'{"a": 1,}', "is not valid JSON"),
    ("added_tokens.json", b'"x"', "holds a string where a JSON object belongs"),
    ("added_tokens.json", b'{"<think>": "2024"}', "is not an object of token -> integer id"),
    ("special_tokens_map.json", b"null", "holds null where a JSON object belongs"),
    ("chat_template.json", b"[]", "holds a list where a JSON object belongs"),
    ("chat_template.json", b'{"chat_template": "\xc3\x28"}', "is not valid UTF-8 text"),
    ("chat_template.jinja", b"{{ '<think>' }}\xff", "is not valid UTF-8 text (byte 15)"),
]


@pytest.mark.parametrize("name,content,message", TOKENIZER_CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(TOKENIZER_CASES)])
def test_bad_tokenizer_files(tok_folder: Path, tmp_path: Path, name: str, content: bytes, message: str) -> None:
    if name == "added_tokens.json":  # give the folder a valid one first (the fixture has none)
        (tok_folder / name).write_text('{"<think>": 2024, "</think>": 2025}')
    (tok_folder / name).write_bytes(content)
    out = tmp_path / "out"
    line = cli_error("retag-think", tok_folder, "--out", out)
    assert message in line and name in line and not out.exists()
    if name == "tokenizer.json":
        line = cli_error("retag-think", tok_folder, "--check")
        assert message in line and name in line


DATA_CASES = [
    ("broken-line", b'{"a": "<think>x</think>"}\n{not json\n', "line 2 is not valid JSON"),
    ("invalid-utf8", b'{"a": "ok"}\n{"a": "\xff<think>"}\n', "line 2 is not valid UTF-8"),
    ("invalid-utf8-late", b'{"a": "ok"}\n' * 5000 + b'{"a": "\xff"}\n', "line 5001 is not valid UTF-8"),
    ("deep", b'{"a": "<think>", "b": ' + b"[" * 990 + b"]" * 990 + b"}\n", "line 1 is nested too deeply"),
    ("deeper", b"[" * 100_000 + b"\n", "line 1 is nested too deeply"),
    ("lone-surrogate", b'{"a": "<think>\\ud800"}\n', "line 1 holds a lone surrogate escape"),
    ("huge-int", b'{"a": ' + b"9" * 5000 + b"}\n", "line 1 is not usable JSON"),
]


@pytest.mark.parametrize("content,message", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_publishes_nothing(tok_folder: Path, tmp_path: Path, content: bytes, message: str) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    out, data_out = tmp_path / "out", tmp_path / "train.out.jsonl"
    line = cli_error("retag-think", tok_folder, "--out", out, "--data", data, "--data-out", data_out)
    assert message in line and str(data) in line
    assert not out.exists() and not data_out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_good_data_still_retags(tok_folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"a": "<think>x</think>"}\r\n\n{"b": 1}\n')
    out, data_out = tmp_path / "out", tmp_path / "train.out.jsonl"
    result = invoke("retag-think", tok_folder, "--out", out, "--data", data, "--data-out", data_out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"]["records_changed"] == 1
    assert data_out.read_bytes() == b'{"a": "<thinking>x</thinking>"}\r\n\n{"b": 1}\n'


def test_embedding_that_is_not_a_matrix(tok_folder: Path, tmp_path: Path) -> None:
    """A header whose embedding is 1-D (same bytes): retag refuses it, --check reports it."""
    name = "model.language_model.embed_tokens.weight"
    shard = HFCheckpoint(tok_folder).tensors[name].file
    raw = shard.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    header[name]["shape"] = [header[name]["shape"][0] * header[name]["shape"][1]]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + length:])
    line = cli_error("retag-think", tok_folder, "--out", tmp_path / "out")
    assert f"'{shard}' stores '{name}' with shape [131072], not a [rows, hidden] matrix" in line
    result = invoke("retag-think", tok_folder, "--check", "--json")
    assert result.exit_code == 0, result.output
    assert "not a [rows, hidden] matrix" in json.loads(result.stdout)["weights_error"]


def test_dcp_chunk_boxes_must_tile_the_tensor(tmp_path: Path) -> None:
    """Chunks of a 2-D sharding (boxes, not row slabs) are checked pairwise: four quarters tile a [4, 4]
    tensor; moving one over its neighbour (same element count) is one line naming the tensor."""
    from vlconvert.layouts.dcp import Chunk, _check_tiling

    def boxes(*corners: tuple[int, int]) -> list[Chunk]:
        return [Chunk((r, c), (2, 2), tmp_path / "d", 0, 0) for r, c in corners]

    _check_tiling(tmp_path / ".metadata", "w", (4, 4), boxes((0, 0), (0, 2), (2, 0), (2, 2)))
    with pytest.raises(UserError, match="'w' of size \\[4, 4\\]: two of its chunks overlap"):
        _check_tiling(tmp_path / ".metadata", "w", (4, 4), boxes((0, 0), (0, 1), (2, 0), (2, 2)))
