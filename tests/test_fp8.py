"""Block-FP8 releases: dequantized on read, bit-exact to the reference, scales always applied.

A fixture is quantized here the way Qwen's FP8 releases are (float8_e4m3fn weights, ``<name>_scale_inv`` =
amax / 448 per block; embeddings, norms, lm_head, router and ``modules_to_not_convert`` kept bf16), with
blocks of 32x32 so that the tiny shapes have partial edge blocks (48 rows, 48 columns), and weights and
scales in different shards. The reference is float8 -> float32 times the stored scale, cast to bf16 once.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import load_hf_tensors, run_cli, tensor_bytes
from safetensors.torch import save_file

FIX = Path(__file__).resolve().parents[1] / "fixtures"
BLOCK = (32, 32)
KEEP_BF16 = ("model.visual.merger",)


def _expand(scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return scale.float().repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)[: shape[0], : shape[1]]


def quantize(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, scale_inv) with one scale per BLOCK, as the FP8 releases store them."""
    rows, cols = w.shape
    br, bc = BLOCK
    padded = torch.zeros(math.ceil(rows / br) * br, math.ceil(cols / bc) * bc)
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12).to(scale_dtype)
    q = (w.float() / _expand(scale, (rows, cols))).to(torch.float8_e4m3fn)
    return q, scale


def quantized(name: str, t: torch.Tensor) -> bool:
    return (t.dim() == 2 and name.endswith(".weight") and "embed" not in name and "norm" not in name
            and name != "lm_head.weight" and not name.endswith("mlp.gate.weight")
            and not name.startswith(KEEP_BF16) and "pos_embed" not in name)


def per_expert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released fused experts split into the per-expert 2-D weights Qwen's FP8 MoE releases store."""
    out = {}
    for name, t in sd.items():
        if name.endswith("experts.gate_up_proj"):  # [E, H, 2I]: gate = [..., :I]
            inter = t.shape[2] // 2
            for e in range(t.shape[0]):
                out[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = t[e, :, :inter].t().contiguous()
                out[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = t[e, :, inter:].t().contiguous()
        elif name.endswith("experts.down_proj"):  # [E, I, H]
            for e in range(t.shape[0]):
                out[name.replace("down_proj", f"{e}.down_proj.weight")] = t[e].t().contiguous()
        else:
            out[name] = t
    return out


def fused(reference: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dequantized per-expert reference put back into the fused released tensors of ``sd``."""
    out = {k: v for k, v in reference.items() if ".experts." not in k}
    for name, t in sd.items():
        if name.endswith("experts.gate_up_proj"):
            out[name] = torch.stack([torch.cat([reference[name.replace("gate_up_proj", f"{e}.{p}.weight")].t()
                                                for p in ("gate_proj", "up_proj")], dim=1) for e in range(t.shape[0])])
        elif name.endswith("experts.down_proj"):
            out[name] = torch.stack([reference[name.replace("down_proj", f"{e}.down_proj.weight")].t()
                                     for e in range(t.shape[0])])
    return out


def make_fp8(dst: Path, fixture: str = "tiny-dense-untied", scale_dtype: torch.dtype = torch.float32
             ) -> dict[str, torch.Tensor]:
    """Write an FP8 copy of ``fixture`` to ``dst``; return the exact dequantized reference tensors.

    MoE experts are stored per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``) and quantized."""
    shutil.copytree(FIX / fixture, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    original = load_hf_tensors(FIX / fixture)
    sd = per_expert(original)
    weights, scales, reference = {}, {}, {}
    for name, t in sd.items():
        if quantized(name, t):
            q, s = quantize(t, scale_dtype)
            weights[name], scales[name + "_scale_inv"] = q, s
            reference[name] = (q.float() * _expand(s, tuple(t.shape))).to(torch.bfloat16)
        else:
            weights[name] = reference[name] = t
    save_file(weights, str(dst / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(scales, str(dst / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {**{n: "model-00001-of-00002.safetensors" for n in weights},
                  **{n: "model-00002-of-00002.safetensors" for n in scales}}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(BLOCK), "modules_to_not_convert": list(KEEP_BF16)}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return fused(reference, original)


def assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and tensor_bytes(got[k]) == tensor_bytes(want[k]), k


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_fp8_to_hf_is_the_exact_dequantized_reference(tmp_path, scale_dtype):
    reference = make_fp8(tmp_path / "fp8", scale_dtype=scale_dtype)
    assert any(t.shape[0] % BLOCK[0] for t in reference.values() if t.dim() == 2)  # partial edge blocks
    run_cli("convert", tmp_path / "fp8", tmp_path / "out", "--to", "hf", "-q")
    got = load_hf_tensors(tmp_path / "out")
    assert not any(k.endswith("_scale_inv") for k in got)
    assert_equal(got, reference)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")  # a plain bf16 checkpoint again
    assert model.dtype == torch.bfloat16


def test_fp8_to_dcp_and_fp32(tmp_path):
    reference = make_fp8(tmp_path / "fp8")
    run_cli("convert", tmp_path / "fp8", tmp_path / "dcp", "--to", "dcp", "-q")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(tmp_path / "dcp", tmp_path / "dcp.pt")
    got = torch.load(tmp_path / "dcp.pt", weights_only=True)
    got.pop("lm_head.weight") if "lm_head.weight" not in reference else None
    assert_equal(got, reference)
    assert "quantization_config" not in json.loads((tmp_path / "dcp" / "config.json").read_text())
    # fp32 output: the float32 product itself, not rounded through bf16
    run_cli("convert", tmp_path / "fp8", tmp_path / "f32", "--to", "hf", "--dtype", "fp32", "-q")
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    fp8 = load_hf_tensors(tmp_path / "fp8")
    want = fp8[name].float() * _expand(fp8[name + "_scale_inv"], tuple(fp8[name].shape))
    assert torch.equal(load_hf_tensors(tmp_path / "f32")[name], want)
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


def test_a_changed_scale_changes_the_output(tmp_path):
    make_fp8(tmp_path / "fp8")
    run_cli("convert", tmp_path / "fp8", tmp_path / "a", "--to", "hf", "-q")
    shard = tmp_path / "fp8" / "model-00002-of-00002.safetensors"
    scales = load_hf_tensors(tmp_path / "fp8")
    scales = {k: v for k, v in scales.items() if k.endswith("_scale_inv")}
    name = "model.visual.blocks.0.mlp.linear_fc1.weight"  # [48, 32]: its second row block is partial
    scales[name + "_scale_inv"][1, 0] *= 2
    save_file(scales, str(shard), metadata={"format": "pt"})
    run_cli("convert", tmp_path / "fp8", tmp_path / "b", "--to", "hf", "-q")
    a, b = load_hf_tensors(tmp_path / "a")[name].float(), load_hf_tensors(tmp_path / "b")[name].float()
    assert torch.equal(b[32:], 2 * a[32:]) and torch.equal(b[:32], a[:32]) and not torch.equal(a, b)


def test_fp8_errors_are_one_line(tmp_path):
    make_fp8(tmp_path / "fp8")
    scales = {k: v for k, v in load_hf_tensors(tmp_path / "fp8").items() if k.endswith("_scale_inv")}
    name = "model.language_model.layers.0.self_attn.q_proj.weight_scale_inv"
    good = scales.pop(name)
    shard = tmp_path / "fp8" / "model-00002-of-00002.safetensors"
    index = tmp_path / "fp8" / "model.safetensors.index.json"
    index_text = index.read_text()
    weight_map = json.loads(index_text)["weight_map"]
    weight_map.pop(name)
    index.write_text(json.dumps({"weight_map": weight_map}))
    save_file(scales, str(shard))
    result = run_cli("convert", tmp_path / "fp8", tmp_path / "o", "--to", "hf", expect=1)
    assert f"has no '{name}': refusing to read it unscaled" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    scales[name] = good[:1]
    index.write_text(index_text)
    save_file(scales, str(shard))
    result = run_cli("convert", tmp_path / "fp8", tmp_path / "o", "--to", "hf", expect=1)
    assert "need [2, 2]" in result.output and len(result.output.strip().splitlines()) == 1


def test_fp8_to_megatron_column_shards_and_back(tmp_path):
    reference = make_fp8(tmp_path / "fp8")
    run_cli("convert", tmp_path / "fp8", tmp_path / "mg", "--to", "megatron", "--tp", "2", "-q")
    run_cli("convert", tmp_path / "mg", tmp_path / "hf", "--to", "hf", "--assets-dir", FIX / "tiny-dense-untied", "-q")
    assert_equal(load_hf_tensors(tmp_path / "hf"), reference)


def test_fp8_moe_release_with_per_expert_weights(tmp_path):
    reference = make_fp8(tmp_path / "fp8", "tiny-moe")  # experts [48, 64] / [64, 48]: partial 32-blocks
    assert any(k.endswith("experts.7.up_proj.weight_scale_inv") for k in load_hf_tensors(tmp_path / "fp8"))
    run_cli("convert", tmp_path / "fp8", tmp_path / "hf", "--to", "hf", "-q")
    assert_equal(load_hf_tensors(tmp_path / "hf"), reference)
    run_cli("convert", tmp_path / "fp8", tmp_path / "mg", "--to", "megatron", "--tp", "2", "--ep", "2", "-q")
    run_cli("convert", tmp_path / "fp8", tmp_path / "dcp", "--to", "dcp", "-q")
    for src in ("mg", "dcp"):
        run_cli("convert", tmp_path / src, tmp_path / f"{src}-hf", "--to", "hf", "--assets-dir", FIX / "tiny-moe", "-q")
        assert_equal(load_hf_tensors(tmp_path / f"{src}-hf"), reference)
