"""Rows put together as bytes (:mod:`vlconvert.rowbytes`): the same bytes as torch's operations, and whole routes
that write them without importing torch, file for file the output of the torch path they replace."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_byte_path_writes_the_torch_paths_files
from test_qwen3_5 import _build as _build_qwen3_5

from vlconvert import rowbytes
from vlconvert.dtypes import as_dtype
from vlconvert.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"


def _bytes_of(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _as_rows(t: torch.Tensor) -> rowbytes.ByteRows:
    flat = t.contiguous().reshape(-1).view(torch.uint8).numpy().copy()
    rows = t.shape[0] if t.dim() else 1
    return rowbytes.ByteRows(flat.reshape(rows, -1), tuple(t.shape), as_dtype(t.dtype))


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.int8]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_operations_give_torchs_bytes(dtype: torch.dtype) -> None:
    a, b = _random((7, 12), dtype, 1), _random((7, 5), dtype, 2)
    ra, rb = _as_rows(a), _as_rows(b)
    assert rowbytes.raw(rowbytes.columns(ra, 3, 10)).tobytes() == _bytes_of(a[:, 3:10])
    assert rowbytes.raw(rowbytes.transposed(ra)).tobytes() == _bytes_of(a.t())
    assert rowbytes.transposed(ra).shape == (12, 7)
    assert rowbytes.raw(rowbytes.concat_columns([ra, rb])).tobytes() == _bytes_of(torch.cat([a, b], dim=1))
    c = _random((3, 12), dtype, 3)
    assert rowbytes.raw(rowbytes.concat_rows([ra, _as_rows(c)])).tobytes() == _bytes_of(torch.cat([a, c]))
    assert rowbytes.raw(ra.rows(2, 5)).tobytes() == _bytes_of(a[2:5])
    zeros = rowbytes.zeros((4, 12), as_dtype(dtype))
    assert rowbytes.raw(zeros).tobytes() == _bytes_of(torch.zeros(4, 12, dtype=dtype))
    assert torch.equal(ra.to_tensor(), a)
    three = _random((2, 3, 4), dtype, 4)
    assert rowbytes.raw(_as_rows(three).reshape((6, 4))).tobytes() == _bytes_of(three.reshape(6, 4))


def _every_pattern(dtype: torch.dtype) -> torch.Tensor:
    """Every 16-bit pattern of ``dtype`` (bf16, fp16); for fp32, 2**20 random patterns and, for each of the 2**16
    upper halves, the lower halves at and around the ties of bf16 (bit 15) and of fp16 (bit 12, deeper for its
    subnormals)."""
    if dtype != torch.float32:
        return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    uppers = torch.arange(2**16, dtype=torch.int64) << 16
    lowers = torch.tensor([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0xFFFF])
    random = torch.randint(0, 2**32, (2**20,), generator=torch.Generator().manual_seed(5))
    patterns = torch.cat([(uppers[:, None] + lowers[None, :]).reshape(-1), random])
    return torch.where(patterns >= 2**31, patterns - 2**32, patterns).to(torch.int32).view(torch.float32)


CASTS = [(a, b) for a in (torch.bfloat16, torch.float16, torch.float32)
         for b in (torch.bfloat16, torch.float16, torch.float32) if a != b]


@pytest.mark.parametrize(("stored", "dtype"), CASTS, ids=str)
def test_cast_rounds_every_value_as_torch_does(stored: torch.dtype, dtype: torch.dtype) -> None:
    """Every bf16 and fp16 value, and fp32 values at every exponent around each rounding tie (subnormals, +-inf,
    overflow to inf included): the cast's bytes are torch's. A block holding a NaN is left to torch (None)."""
    values = _every_pattern(stored)
    nan = torch.isnan(values)
    finite = values[~nan].reshape(-1, 2)
    got = rowbytes.cast(_as_rows(finite), as_dtype(dtype))
    assert got is not None and got.shape == tuple(finite.shape) and got.dtype == as_dtype(dtype)
    assert rowbytes.raw(got).tobytes() == _bytes_of(finite.to(dtype))
    assert nan.any() and rowbytes.cast(_as_rows(values[nan.nonzero()[0, 0] - 5:][:99]), as_dtype(dtype)) is None
    columns = rowbytes.columns(_as_rows(finite), 1, 2)  # a block cut from another (its own memory)
    assert rowbytes.raw(rowbytes.cast(columns, as_dtype(dtype))).tobytes() == _bytes_of(finite[:, 1:2].to(dtype))
    with pytest.raises(ValueError, match="no byte cast"):
        rowbytes.cast(_as_rows(finite), as_dtype(torch.int64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("value", [-1.0, 1.0])
def test_add_computes_as_torch_in_fp32_and_rounds_back(dtype: torch.dtype, value: float) -> None:
    """A family's value op (Qwen3.5's ``minus_one``): ``(t.float() + value).to(t.dtype)``, every value's bytes as
    torch's; the block itself is left as it was; a NaN or a dtype without the op leaves it to torch (None)."""
    values = _every_pattern(dtype)
    finite = values[~torch.isnan(values)]
    block = _as_rows(finite)
    before = rowbytes.raw(block).tobytes()
    got = rowbytes.add(block, value)
    assert got is not None and got.dtype == as_dtype(dtype) and got.shape == tuple(finite.shape)
    assert rowbytes.raw(got).tobytes() == _bytes_of((finite.float() + value).to(dtype))
    assert rowbytes.raw(block).tobytes() == before
    assert rowbytes.add(_as_rows(values), value) is None
    assert rowbytes.add(_as_rows(torch.arange(6)), value) is None


def test_large_blocks_come_from_the_pool_and_are_reused_once_free() -> None:
    from vlconvert import buffers

    shape = (buffers.POOL_MIN // 2 // 64, 64)  # POOL_MIN bytes of bf16
    first = rowbytes.empty(shape, as_dtype(torch.bfloat16))
    second = rowbytes.empty(shape, as_dtype(torch.bfloat16))  # the first is still referenced: a new buffer
    assert second.data.ctypes.data != first.data.ctypes.data
    address = first.data.ctypes.data
    del first
    third = rowbytes.empty(shape, as_dtype(torch.bfloat16))
    assert third.data.ctypes.data == address  # handed out again


def test_reading_past_the_end_of_a_file_is_one_user_error(tmp_path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(range(100)))
    with path.open("rb") as f:
        block = rowbytes.read(f, 10, (5, 4), as_dtype(torch.int16), "truncated!")
        assert rowbytes.raw(block).tobytes() == bytes(range(10, 50))
        with pytest.raises(UserError, match="truncated!"):
            rowbytes.read(f, 90, (5, 4), as_dtype(torch.int16), "truncated!")


def test_a_tensor_holding_a_nan_is_cast_by_torch_and_the_rest_as_bytes(tmp_path) -> None:
    """A NaN in one tensor: that block is cast by torch (the byte cast returns None), every other tensor as bytes;
    each output tensor equals torch's cast of its source, bit for bit."""
    from safetensors.torch import load_file, save_file

    from vlconvert.engine import Converter

    src = tmp_path / "nan"
    shutil.copytree(FIXTURES / "tiny-dense-tied", src)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(k for k, t in tensors.items() if t.dim() == 2 and t.dtype == torch.bfloat16)
    tensors[name] = tensors[name].clone()
    tensors[name].view(torch.int16)[1, 2] = 0x7F81  # a signalling NaN with a payload: CPUs and numpy differ on it
    save_file(tensors, shard, metadata={"format": "pt"})
    Converter(src, tmp_path / "out", to="hf", dtype="fp16").run()
    out = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        out.update(load_file(f))
    source = {}
    for f in src.glob("model-*.safetensors"):
        source.update(load_file(f))
    assert out.keys() == source.keys() and torch.isnan(out[name][1, 2])
    for key, tensor in source.items():
        assert _bytes_of(out[key]) == _bytes_of(tensor.to(torch.float16)), key


DENSE, MOE, MOE_TF5 = (str(FIXTURES / n) for n in ("tiny-dense-untied", "tiny-moe", "tiny-moe-tf5"))
ROUTES = {  # routes that put rows together in memory without arithmetic; {name}: a source made below
    "dense-hf-to-megatron-tp2": ["convert", DENSE, "{out}", "--to", "megatron", "--tp", "2"],
    "dense-hf-to-megatron-tp2-pp2": ["convert", DENSE, "{out}", "--to", "megatron", "--tp", "2", "--pp", "2",
                                     "--pp-first-layers", "1"],
    "dense-megatron-tp2-to-hf": ["convert", "{dense_tp2}", "{out}", "--to", "hf", "--assets-dir", DENSE],
    "dense-megatron-tp2-to-dcp": ["convert", "{dense_tp2}", "{out}", "--to", "dcp", "--assets-dir", DENSE],
    "moe-hf-to-megatron-tp2-ep2": ["convert", MOE, "{out}", "--to", "megatron", "--tp", "2", "--ep", "2"],
    "moe-hf-to-megatron-etp2-sequential": ["convert", MOE_TF5, "{out}", "--to", "megatron", "--tp", "2", "--ep", "2",
                                           "--etp", "2", "--experts", "sequential"],
    "moe-megatron-tp2-ep2-to-hf": ["convert", "{moe_tp2_ep2}", "{out}", "--to", "hf", "--assets-dir", MOE],
    "moe-megatron-to-hf-released": ["convert", "{moe_tf5_seq}", "{out}", "--to", "hf", "--assets-dir", MOE_TF5,
                                    "--experts-layout", "released"],
    "moe-hf-released-to-dcp-tf5": ["convert", MOE, "{out}", "--to", "dcp", "--experts-layout", "transformers5"],
    "moe-hf-tf5-to-hf-released": ["convert", MOE_TF5, "{out}", "--to", "hf", "--experts-layout", "released"],
    "moe-hf-to-megatron-workers": ["convert", MOE, "{out}", "--to", "megatron", "--tp", "2", "--workers", "2"],
    "moe-hf-to-torch_dist-swift": ["convert", MOE, "{out}", "--to", "torch_dist", "--tp", "2", "--ep", "2",
                                   "--for", "ms-swift"],
    "moe-torch_dist-to-hf": ["convert", "{moe_td}", "{out}", "--to", "hf", "--assets-dir", MOE],
    "moe-dcp-released-to-megatron": ["convert", "{moe_dcp}", "{out}", "--to", "megatron", "--tp", "2", "--ep", "2",
                                     "--assets-dir", MOE],
    "moe-dcp-released-to-hf-tf5": ["convert", "{moe_dcp}", "{out}", "--to", "hf", "--experts-layout", "transformers5",
                                   "--assets-dir", MOE],
    "moe-torch_dist-to-megatron": ["convert", "{moe_td}", "{out}", "--to", "megatron", "--tp", "2", "--assets-dir",
                                   MOE],
    # casts between bf16, fp16 and fp32 (rowbytes.cast); the fp16 sources round to bf16 (more mantissa bits)
    "dense-hf-to-megatron-tp2-fp32": ["convert", DENSE, "{out}", "--to", "megatron", "--tp", "2", "--dtype", "fp32"],
    "dense-megatron-tp2-to-hf-fp16": ["convert", "{dense_tp2}", "{out}", "--to", "hf", "--assets-dir", DENSE,
                                      "--dtype", "fp16"],
    "dense-dcp-fp16-to-hf-auto": ["convert", "{dense_dcp16}", "{out}", "--to", "hf", "--assets-dir", DENSE],
    "dense-dcp-fp16-to-megatron-tp2": ["convert", "{dense_dcp16}", "{out}", "--to", "megatron", "--tp", "2",
                                       "--assets-dir", DENSE, "--dtype", "bf16"],
    "moe-hf-to-dcp-fp32": ["convert", MOE, "{out}", "--to", "dcp", "--dtype", "fp32"],
    "moe-dcp-fp16-to-megatron-tp2-ep2": ["convert", "{moe_dcp16}", "{out}", "--to", "megatron", "--tp", "2", "--ep",
                                         "2", "--assets-dir", MOE, "--dtype", "bf16"],
    "moe-dcp-fp16-to-hf-tf5": ["convert", "{moe_dcp16}", "{out}", "--to", "hf", "--experts-layout", "transformers5",
                               "--assets-dir", MOE],
    # Qwen3.5: the GDN output norm's gain goes through the family's value op (minus_one: rowbytes.add)
    "q35-dense-hf-to-megatron-tp2": ["convert", "{q35_dense}", "{out}", "--to", "megatron", "--tp", "2"],
    "q35-dense-hf-to-megatron-tp2-fp32": ["convert", "{q35_dense}", "{out}", "--to", "megatron", "--tp", "2", "--dtype",
                                          "fp32"],
    "q35-megatron-tp2-to-hf": ["convert", "{q35_mg}", "{out}", "--to", "hf", "--assets-dir", "{q35_dense}"],
    "q35-torch_dist-to-hf": ["convert", "{q35_td}", "{out}", "--to", "hf", "--assets-dir", "{q35_dense}"],
    "q35-moe-hf-to-megatron-tp2-ep2": ["convert", "{q35_moe}", "{out}", "--to", "megatron", "--tp", "2", "--ep", "2"],
}


@pytest.fixture(scope="module")
def megatron_sources(tmp_path_factory) -> dict[str, Path]:
    from helpers import run_cli

    base = tmp_path_factory.mktemp("rowbytes-sources")
    run_cli("convert", DENSE, base / "dense_tp2", "--to", "megatron", "--tp", "2", "-q")
    run_cli("convert", MOE, base / "moe_tp2_ep2", "--to", "megatron", "--tp", "2", "--ep", "2", "-q")
    run_cli("convert", MOE_TF5, base / "moe_tf5_seq", "--to", "megatron", "--tp", "2", "--experts", "sequential", "-q")
    run_cli("convert", MOE, base / "moe_td", "--to", "torch_dist", "--tp", "2", "--ep", "2", "-q")
    run_cli("convert", MOE, base / "moe_dcp", "--to", "dcp", "-q")
    run_cli("convert", DENSE, base / "dense_dcp16", "--to", "dcp", "--dtype", "fp16", "-q")
    run_cli("convert", MOE, base / "moe_dcp16", "--to", "dcp", "--dtype", "fp16", "-q")
    q35 = {"q35_dense": _build_qwen3_5(base, moe=False), "q35_moe": _build_qwen3_5(base, moe=True)}
    run_cli("convert", q35["q35_dense"], base / "q35_mg", "--to", "megatron", "--tp", "2", "-q")
    run_cli("convert", q35["q35_dense"], base / "q35_td", "--to", "torch_dist", "--tp", "2", "-q")
    return {**q35, **{name: base / name for name in ("dense_tp2", "moe_tp2_ep2", "moe_tf5_seq", "moe_td", "moe_dcp",
                                                     "dense_dcp16", "moe_dcp16", "q35_mg", "q35_td")}}


@pytest.mark.parametrize("name", list(ROUTES))
def test_routes_that_only_move_bytes_need_no_torch_and_write_the_torch_paths_bytes(tmp_path, megatron_sources,
                                                                                name: str) -> None:
    """Column shares of row-parallel weights, matrices gathered from TP ranks, experts turned between [in, out]
    and [out, in], vocabulary padding: put together as bytes, torch is never imported, and every file written
    (manifest included) is the one the torch operations write."""
    assert_byte_path_writes_the_torch_paths_files(
        lambda out: [a.format(out=out, **megatron_sources) for a in ROUTES[name]], tmp_path)
