""".metadata without ``import torch.distributed.checkpoint``: the bytes torch's own classes give, read back.

vlconvert writes DCP ``.metadata`` from the stand-ins of ``vlconvert.layouts.dcp_classes``
(``vlconvert.layouts.dcp_pickle``). Every case here compares the written file byte for byte with
``pickle.dumps`` of the same metadata built from torch's classes by their constructors (what vlconvert
wrote before the stand-ins), with torch's own round trip of the file, and with the pure-Python pickler;
then loads the output with torch's real DCP. Reading maps torch's classes to the stand-ins through an
allowlist: any other global is refused.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import run_cli
from torch.distributed.checkpoint import metadata as tm
from torch.distributed.checkpoint import planner as tp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from transformers import AutoConfig, AutoModelForImageTextToText

from vlconvert.dtypes import to_torch as to_torch_dtype
from vlconvert.errors import UserError
from vlconvert.layouts import dcp_classes as C
from vlconvert.layouts import dcp_pickle
from vlconvert.layouts.dcp import METADATA_NAME, DCPReader, read_dcp_metadata
from vlconvert.layouts.torch_names import Layout

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def to_torch(md: C.Metadata) -> tm.Metadata:
    """``md`` rebuilt from torch's classes by their constructors, from the same values and the same
    shared objects (strings, sizes, planner_data): the object vlconvert pickled before the stand-ins."""
    memo: dict[int, object] = {}

    def conv(obj):
        if id(obj) in memo:
            return memo[id(obj)]
        if isinstance(obj, C.TensorStorageMetadata):
            new = tm.TensorStorageMetadata(properties=conv(obj.properties), size=obj.size,
                                           chunks=[conv(c) for c in obj.chunks])
        elif isinstance(obj, C.TensorProperties):
            # as read, the stand-ins hold no torch objects: a DType, a Layout, the memory format's encoding
            layout = torch.serialization._get_layout(obj.layout) if isinstance(obj.layout, Layout) else obj.layout
            memory_format = {e: f for f, e in C._encodings()}.get(obj.memory_format, obj.memory_format)
            new = tm.TensorProperties(dtype=to_torch_dtype(obj.dtype), layout=layout, requires_grad=obj.requires_grad,
                                      memory_format=memory_format, pin_memory=obj.pin_memory)
        elif isinstance(obj, C.ChunkStorageMetadata):
            new = tm.ChunkStorageMetadata(offsets=obj.offsets, sizes=obj.sizes)
        elif isinstance(obj, C.BytesStorageMetadata):
            new = tm.BytesStorageMetadata()
        elif isinstance(obj, C.MetadataIndex):
            new = tm.MetadataIndex(obj.fqn, obj.offset, obj.index)
        elif isinstance(obj, C._StorageInfo):
            extra = {"transform_descriptors": obj.transform_descriptors} if obj.transform_descriptors else {}
            new = _StorageInfo(obj.relative_path, obj.offset, obj.length, **extra)
        elif isinstance(obj, C.StorageMeta):
            new = tm.StorageMeta(checkpoint_id=obj.checkpoint_id, save_id=obj.save_id, load_id=obj.load_id,
                                 modules=list(obj.modules))
        else:
            raise AssertionError(f"unexpected {type(obj)}")
        memo[id(obj)] = new
        return new

    has_version = "version" in tm.Metadata.__dataclass_fields__
    assert ("version" in vars(md)) == has_version  # torch < 2.9 pickles no version
    version = {"version": md.version} if has_version else {}
    storage = md.storage_data
    return tm.Metadata(state_dict_metadata={k: conv(v) for k, v in md.state_dict_metadata.items()},
                       planner_data=md.planner_data,
                       storage_data={conv(i): conv(s) for i, s in storage.items()} if storage is not None else None,
                       storage_meta=conv(md.storage_meta) if md.storage_meta is not None else None, **version)


@pytest.fixture
def captured(monkeypatch) -> list:
    """(metadata, bytes) of every ``.metadata`` vlconvert pickles while the test runs."""
    seen: list = []
    real = dcp_pickle.dumps

    def spy(metadata, *args, **kwargs):
        raw = real(metadata, *args, **kwargs)
        seen.append((metadata, raw))
        return raw

    monkeypatch.setattr(dcp_pickle, "dumps", spy)
    return seen


def assert_torch_bytes(path: Path, md: C.Metadata, raw: bytes) -> None:
    """The file at ``path`` holds ``raw``: the bytes of torch's classes (built, and read back by torch),
    the pure-Python pickler's, and what reading into the stand-ins and writing again gives."""
    data = path.read_bytes()
    assert data == raw
    assert data == pickle.dumps(to_torch(md)), "not the bytes torch's classes give"
    assert data == dcp_pickle.dumps_pure(md), "the pure-Python pickler differs"
    real = pickle.loads(data)
    assert type(real) is tm.Metadata
    assert pickle.dumps(real) == data, "torch's round trip differs"
    assert dcp_pickle.dumps(dcp_pickle.loads(data)) == data, "the stand-ins' round trip differs"


def load_with_torch_dcp(folder: Path, md: C.Metadata) -> dict:
    """Every entry of the checkpoint loaded by ``dcp.load`` into a state dict nested as planner_data says."""
    state: dict = {}
    for key, entry in md.state_dict_metadata.items():
        path = md.planner_data[key]
        holder = state
        for part in path[:-1]:
            holder = holder.setdefault(part, {})
        holder[path[-1]] = io.BytesIO() if isinstance(entry, C.BytesStorageMetadata) else \
            torch.full(tuple(entry.size), 7, dtype=to_torch_dtype(entry.properties.dtype))
    dcp.load(state, checkpoint_id=str(folder))
    flat = {}
    for key in md.state_dict_metadata:
        value = state
        for part in md.planner_data[key]:
            value = value[part]
        flat[key] = value
    return flat


DCP_CASES = [
    ("tiny-dense-tied", []),
    ("tiny-dense-tied", ["--prefix", "model.", "--dtype", "bf16"]),
    ("tiny-dense-tied", ["--no-tied-lm-head", "--dtype", "fp16"]),
    ("tiny-dense-untied", ["--prefix", "model.model.", "--dtype", "fp32"]),
    ("tiny-moe", []),
    ("tiny-moe", ["--experts-layout", "released", "--dtype", "config"]),
    ("tiny-moe", ["--experts-layout", "transformers5", "--prefix", "_orig_mod.model.", "--dtype", "keep"]),
    ("tiny-moe-tf5", ["--dtype", "auto", "--prefix", "model."]),
]


@pytest.mark.parametrize("fixture,options", DCP_CASES, ids=[f"{f}{''.join(o)}" for f, o in DCP_CASES])
def test_dcp_metadata_is_torchs_bytes_and_loads_with_dcp(tmp_path: Path, captured: list, fixture: str,
                                                         options: list[str]) -> None:
    out = tmp_path / "dcp"
    run_cli("convert", FIX / fixture, out, "--to", "dcp", *options, "-q")
    assert len(captured) == 1
    md, raw = captured[0]
    assert isinstance(md, C.Metadata)
    assert_torch_bytes(out / METADATA_NAME, md, raw)
    loaded = load_with_torch_dcp(out, md)
    reader = DCPReader(out)
    assert sorted(loaded) == sorted(reader.tensors)
    for key, tensor in loaded.items():
        want = reader.read(key)
        assert tensor.dtype == want.dtype and torch.equal(tensor.view(torch.uint8), want.view(torch.uint8)), key
    reader.close()


TORCH_DIST_CASES = [
    ("tiny-moe", ["--for", "megatron-bridge"]),
    ("tiny-moe", ["--for", "megatron-bridge-0.3"]),
    ("tiny-moe", ["--for", "mbridge", "--experts", "sequential"]),
    ("tiny-moe", ["--for", "ms-swift", "--dtype", "fp32"]),
    ("tiny-moe-tf5", ["--for", "megatron-lm", "--spec", "local"]),
    ("tiny-dense-tied", ["--iteration", "5"]),
]


@pytest.mark.parametrize("fixture,options", TORCH_DIST_CASES, ids=[f"{f}{''.join(o)}" for f, o in TORCH_DIST_CASES])
def test_torch_dist_metadata_is_torchs_bytes_and_loads_with_dcp(tmp_path: Path, captured: list, fixture: str,
                                                                options: list[str]) -> None:
    """torch_dist: several chunks per key (stacked layers and experts) and bytes entries."""
    out = tmp_path / "td"
    run_cli("convert", FIX / fixture, out, "--to", "torch_dist", *options, "-q")
    assert len(captured) == 1
    md, raw = captured[0]
    (path,) = [p for p in out.rglob(METADATA_NAME)]
    assert_torch_bytes(path, md, raw)
    assert any(len(e.chunks) > 1 for e in md.state_dict_metadata.values() if isinstance(e, C.TensorStorageMetadata))
    loaded = load_with_torch_dcp(path.parent, md)
    reader = DCPReader(path.parent)
    for key in reader.tensors:
        assert torch.equal(loaded[key].view(torch.uint8), reader.read(key).view(torch.uint8)), key
    for key in reader.non_tensors:  # dcp.load puts what torch.load reads from a bytes entry in its place
        raw = reader.read_bytes_entry(key, 2**30)
        assert raw and loaded[key] == torch.load(io.BytesIO(raw), weights_only=False), key
    reader.close()


@pytest.mark.parametrize("fixture", ["tiny-dense-tied", "tiny-moe"])
def test_prefixed_dcp_loads_into_a_transformers_model_bit_exact(tmp_path: Path, fixture: str) -> None:
    """``--prefix model.`` nests the state dict as {"model": model.state_dict()} (planner_data)."""
    run_cli("convert", FIX / fixture, tmp_path / "dcp", "--to", "dcp", "--prefix", "model.", "--dtype", "bf16", "-q")
    config = AutoConfig.from_pretrained(FIX / fixture)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"))
    hf = AutoModelForImageTextToText.from_pretrained(FIX / fixture, dtype=torch.bfloat16)
    for key, tensor in hf.state_dict().items():
        if key in state["model"]:
            assert torch.equal(state["model"][key].view(torch.uint8), tensor.view(torch.uint8)), key
    assert set(hf.state_dict()) <= set(state["model"]) | {k for k in hf.state_dict() if "rotary" in k}


# ------------------------------------------------------------------------------------------- units
def _synthetic(key: str = "w") -> C.Metadata:
    key = sys.intern(key)
    size, zeros = torch.Size([4, 3]), torch.Size([0, 0])
    tensor = C.TensorStorageMetadata(properties=C.TensorProperties(dtype=torch.float8_e4m3fn), size=size,
                                     chunks=[C.ChunkStorageMetadata(offsets=zeros, sizes=size)])
    return C.make_metadata(
        state_dict_metadata={key: tensor, "blob": C.BytesStorageMetadata()},
        planner_data={key: ("model", key), "blob": ("blob",)},
        storage_data={C.MetadataIndex(key, zeros, 0): C._StorageInfo("__0_0.distcp", 0, 100),
                      C.MetadataIndex("blob"): C._StorageInfo("__0_0.distcp", 100, 7)},
        storage_meta=C.StorageMeta(checkpoint_id=None, save_id="id"), version="1.0.0")


def test_stand_ins_have_torchs_fields_and_names() -> None:
    pairs = [(C.Metadata, tm.Metadata), (C.TensorStorageMetadata, tm.TensorStorageMetadata),
             (C.BytesStorageMetadata, tm.BytesStorageMetadata), (C.ChunkStorageMetadata, tm.ChunkStorageMetadata),
             (C.TensorProperties, tm.TensorProperties), (C.MetadataIndex, tm.MetadataIndex),
             (C.StorageMeta, tm.StorageMeta), (C._StorageInfo, _StorageInfo), (C.SavePlan, tp.SavePlan),
             (C.WriteItem, tp.WriteItem), (C.TensorWriteData, tp.TensorWriteData)]
    for mine, theirs in pairs:
        names = [f.name for f in dataclasses.fields(theirs)]
        assert [f.name for f in dataclasses.fields(mine)][:len(names)] == names, theirs
        module, name = C.PICKLED_AS.get(mine) or next(k for k, v in C.READ_AS.items() if v is mine)
        assert (module, name) == (theirs.__module__, theirs.__qualname__)
        assert C.READ_AS[(module, name)] is mine
    assert C.has_version() == ("version" in tm.Metadata.__dataclass_fields__)
    assert [(e.name, e.value) for e in C._MEM_FORMAT_ENCODING] == [(e.name, e.value) for e in tm._MEM_FORMAT_ENCODING]
    assert [(e.name, e.value) for e in C.WriteItemType] == [(e.name, e.value) for e in tp.WriteItemType]
    assert C.MetadataIndex("a", [0, 1], 3) == C.MetadataIndex("a", torch.Size([0, 1]), 9)
    assert hash(C.MetadataIndex("a", [0, 1])) == hash(C.MetadataIndex("a", (0, 1), 5))


def test_alias_bytes_in_a_key_fall_back_to_the_pure_pickler() -> None:
    """A key whose UTF-8 holds the alias's opcode bytes (\\x8c = the end of 'Č'): the C pickle is not
    rewritten (two matches), the pure-Python pickler writes torch's names; same bytes as torch's classes."""
    for alias in (C.METADATA_ALIAS, C.FILESYSTEM_ALIAS):
        key = "Č" + chr(len(alias)) + alias
        assert dcp_pickle._short_unicode(alias) in key.encode()
        md = _synthetic(key)
        assert pickle.dumps(md).count(dcp_pickle._short_unicode(alias)) == 2
        raw = dcp_pickle.dumps(md)
        assert raw == pickle.dumps(to_torch(md)) == dcp_pickle.dumps_pure(md)
        assert next(iter(pickle.loads(raw).state_dict_metadata)) == key


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_protocol_gives_torchs_bytes(protocol: int) -> None:
    md = _synthetic()
    assert dcp_pickle.dumps(md, protocol) == pickle.dumps(to_torch(md), protocol)
    assert pickle.loads(dcp_pickle.dumps(md, protocol)) == to_torch(md)


def test_writing_imports_nothing_of_torch_distributed_checkpoint() -> None:
    """Checked in a fresh interpreter (this one has imported it)."""
    import subprocess

    code = ("import sys, torch\nfrom vlconvert.layouts import dcp_classes as C, dcp_pickle\n"
            "md = C.make_metadata(state_dict_metadata={}, storage_data={}, version='1.0.0')\n"
            "dcp_pickle.loads(dcp_pickle.dumps(md))\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch.distributed.checkpoint')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]"


def test_torchs_own_dcp_save_is_read_into_stand_ins_and_rewritten_identically(tmp_path: Path) -> None:
    """A ``dcp.save`` checkpoint (nested, bytes entry, several tensors): the stand-ins hold what torch reads,
    and pickling them again gives the file's bytes."""
    state = {"model": {"a.weight": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64)},
             "extra": io.BytesIO(b"hello"), "step": torch.tensor(3.0, dtype=torch.bfloat16)}
    dcp.save(state, checkpoint_id=str(tmp_path / "ck"))
    data = (tmp_path / "ck" / METADATA_NAME).read_bytes()
    mine = read_dcp_metadata(tmp_path / "ck")
    assert isinstance(mine, C.Metadata)
    assert dcp_pickle.dumps(mine) == data
    theirs = dcp.FileSystemReader(str(tmp_path / "ck")).read_metadata()
    theirs.storage_meta.load_id = mine.storage_meta.load_id  # the reader sets its own load id
    assert to_torch(mine) == theirs
    reader = DCPReader(tmp_path / "ck")
    assert torch.equal(reader.read("model.a.weight"), state["model"]["a.weight"])
    info = next(s for i, s in mine.storage_data.items() if i.fqn == "extra")
    data = (tmp_path / "ck" / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
    assert reader.read_bytes_entry("extra", 2**20) == data
    reader.close()


def test_save_plans_and_extra_attributes_are_read_as_data(tmp_path: Path) -> None:
    """megatron-core pickles save plans and its own attributes into Metadata: read, never run."""
    chunk = tm.ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([2]))
    item = tp.WriteItem(index=tm.MetadataIndex("w", [0]), type=tp.WriteItemType.SHARD,
                        tensor_data=tp.TensorWriteData(chunk=chunk, properties=tm.TensorProperties(dtype=torch.half),
                                                       size=torch.Size([2])))
    real = tm.Metadata(state_dict_metadata={}, planner_data={"plans": [tp.SavePlan([item], usable=False)]},
                       storage_data={}, storage_meta=tm.StorageMeta(checkpoint_id=Path("/x")))
    real.mcore_data = {"w": {"nd_reformulated_orig_global_shape": (2,)}}
    md = dcp_pickle.loads(pickle.dumps(real))
    (plan,) = md.planner_data["plans"]
    assert isinstance(plan, C.SavePlan) and plan.usable is False
    assert plan.items[0].type is C.WriteItemType.SHARD and plan.items[0].index == C.MetadataIndex("w", [0])
    assert plan.items[0].tensor_data.properties.dtype == torch.half
    assert md.mcore_data == real.mcore_data and md.storage_meta.checkpoint_id == Path("/x")
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / METADATA_NAME).write_bytes(pickle.dumps(real))
    assert isinstance(read_dcp_metadata(folder), C.Metadata)


def _pickle_naming(module: str, name: str) -> bytes:
    m, n = module.encode(), name.encode()
    return b"\x80\x04\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93)\x81."


@pytest.mark.parametrize("module,name", [
    ("posix", "system"), ("builtins", "eval"),
    (C.METADATA_ALIAS, "Metadata"),  # the writer's alias is no name a .metadata may use
    ("torch.distributed.checkpoint.planner", "LoadPlan"),
    ("torch.distributed.checkpoint.state_dict_loader", "load"),
    ("torch.distributed.checkpoint.metadata", "torch"),
    ("torch", "load"),
])
def test_other_globals_are_refused_with_one_line(tmp_path: Path, module: str, name: str) -> None:
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / METADATA_NAME).write_bytes(_pickle_naming(module, name))
    with pytest.raises(UserError) as info:
        read_dcp_metadata(folder)
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith(f"holds something other than DCP metadata: refusing to load {module}.{name}")
    with pytest.raises(dcp_pickle.RefusedClass):
        dcp_pickle.loads(_pickle_naming(module, name))


@pytest.mark.parametrize("dims", [(), (7,), (0, 0), (4, 3, 2)])
def test_stand_ins_print_as_torchs_objects(dims: tuple[int, ...]) -> None:
    """Names and ids vlconvert derives from metadata (DCP's save_id hashes the offsets' text) are the ones
    torch's objects give: the stand-ins print as they do."""
    from vlconvert.dtypes import BY_NAME
    from vlconvert.layouts.torch_names import STRIDED, Size

    assert str(Size(dims)) == str(torch.Size(dims)) and repr(Size(dims)) == repr(torch.Size(dims))
    assert Size(dims) == torch.Size(dims) and hash(Size(dims)) == hash(torch.Size(dims))
    assert str(STRIDED) == str(torch.strided) == repr(torch.strided)
    for name, dtype in BY_NAME.items():
        assert str(dtype) == repr(dtype) == str(getattr(torch, name)) and dtype == getattr(torch, name)
