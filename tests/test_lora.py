"""``convert --merge-lora``: a PEFT adapter merged on conversion equals PEFT's own ``merge_and_unload``.

Adapters are made with ``peft`` on fixtures loaded in float32 (the bf16 weights upcast exactly), with
random non-zero B matrices (``init_lora_weights=False``), targets in the language model and in the vision
tower, an adapted embedding, ``modules_to_save`` (a changed lm_head), rsLoRA and rank/alpha patterns.
PEFT merged in float32 and cast to bf16 once is the reference: vlconvert computes the same float32
operations (``W + (B @ A) * scaling``) and casts once, so the comparison is bit for bit. (PEFT merging a
bf16 model instead rounds the delta to bf16 before adding it: up to one bf16 ulp away from both.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_hf_tensors, run_cli, tensor_bytes
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from vlconvert import Converter

FIX = Path(__file__).resolve().parents[1] / "fixtures"
IDS = torch.randint(0, 2000, (2, 9), generator=torch.Generator().manual_seed(3))
VARIANTS = {
    "tiny-dense-untied": dict(r=4, lora_alpha=8, modules_to_save=["lm_head"],
                              target_modules=["q_proj", "v_proj", "down_proj", "qkv", "linear_fc1", "embed_tokens"]),
    "tiny-dense-tied": dict(r=4, lora_alpha=5, use_rslora=True, rank_pattern={"q_proj": 8},
                            alpha_pattern={"down_proj": 3}, target_modules=["q_proj", "o_proj", "down_proj",
                                                                             "up_proj", "attn.proj", "linear_fc2"]),
}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.fixture(scope="module", params=list(VARIANTS))
def adapter(request, tmp_path_factory):
    """(fixture, adapter folder, PEFT's merged state dict in float32, PEFT's merged model)."""
    from peft import LoraConfig, get_peft_model

    fixture = request.param
    folder = tmp_path_factory.mktemp(fixture) / "adapter"
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(FIX / fixture, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **VARIANTS[fixture]))
    for name, module in model.named_modules():
        if name.endswith("lm_head") and hasattr(module, "modules_to_save"):
            module.modules_to_save["default"].weight.data.add_(0.01)  # a trained lm_head to save whole
    model.save_pretrained(folder)
    merged = model.merge_and_unload()
    return fixture, folder, {k: v.detach().clone() for k, v in merged.state_dict().items()}, merged


def test_merge_equals_peft_merge_and_unload_bit_for_bit(adapter, tmp_path):
    fixture, folder, merged, model = adapter
    run_cli("convert", FIX / fixture, tmp_path / "out", "--to", "hf", "--merge-lora", folder, "-q")
    got = load_hf_tensors(tmp_path / "out")
    base = load_hf_tensors(FIX / fixture)
    assert sorted(got) == sorted(base)
    changed = 0
    for name in got:
        want = merged[name].to(torch.bfloat16)
        assert tensor_bytes(got[name]) == tensor_bytes(want), name
        changed += not torch.equal(got[name], base[name])
    assert changed >= 10  # language model and vision tower both adapted
    # the merged output loads, and gives the logits of PEFT's merged model with its weights in bf16
    ours = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32)
    peft_logits = logits(model)
    torch.testing.assert_close(logits(ours), peft_logits, atol=2e-2, rtol=0)  # bf16 rounding of the weights
    rounded = AutoModelForImageTextToText.from_pretrained(FIX / fixture, dtype=torch.float32)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in merged.items()}, strict=False)
    assert torch.equal(logits(ours), logits(rounded))


def test_merge_to_dcp_and_megatron_equals_merge_to_hf(adapter, tmp_path):
    fixture, folder, _, _ = adapter
    run_cli("convert", FIX / fixture, tmp_path / "hf", "--to", "hf", "--merge-lora", folder, "-q")
    want = load_hf_tensors(tmp_path / "hf")
    run_cli("convert", FIX / fixture, tmp_path / "dcp", "--to", "dcp", "--merge-lora", folder, "-q")
    run_cli("convert", FIX / fixture, tmp_path / "mg", "--to", "megatron", "--tp", "2", "--merge-lora", folder, "-q")
    for src in ("dcp", "mg"):
        run_cli("convert", tmp_path / src, tmp_path / f"{src}-hf", "--to", "hf", "--assets-dir", FIX / fixture, "-q")
        got = load_hf_tensors(tmp_path / f"{src}-hf")
        assert all(tensor_bytes(got[k]) == tensor_bytes(want[k]) for k in want), src
    # fp32 output keeps the float32 sum (no rounding through bf16); the Python API takes the same option
    result = Converter(FIX / fixture, tmp_path / "f32", to="hf", dtype="fp32", merge_lora=folder).run()
    f32 = load_hf_tensors(result.output)
    assert all(torch.equal(f32[k].to(torch.bfloat16), want[k]) for k in want)


def _broken(folder: Path, tmp_path: Path, edit) -> Path:
    """A copy of adapter ``folder`` with ``edit(config, tensors)`` applied."""
    out = tmp_path / "broken"
    out.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    edit(config, tensors)
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


Q = "base_model.model.model.language_model.layers.0.self_attn.q_proj"


def _rename(tensors: dict, old: str, new: str) -> None:
    for part in (".lora_A.weight", ".lora_B.weight"):
        tensors[new + part] = tensors.pop(old + part)


@pytest.mark.parametrize("edit,message", [
    (lambda c, t: _rename(t, Q, Q.replace("q_proj", "qq_proj")),
     "adapter key 'base_model.model.model.language_model.layers.0.self_attn.qq_proj.lora_A' matches no tensor"),
    (lambda c, t: c.update(r=3, rank_pattern={}), "has rank"),
    (lambda c, t: t.update({Q + ".lora_B.weight": torch.ones(63, t[Q + ".lora_A.weight"].shape[0])}),
     "the adapter was made for"),
    (lambda c, t: t.update({"base_model.model.model.language_model.layers.0.mlp.experts.lora_A.weight":
                            torch.ones(2, 2)}),
     "adapts fused MoE experts ('model.language_model.layers.0.mlp.experts')"),
    (lambda c, t: c.update(use_dora=True), "DoRA"),
])
def test_bad_adapters_give_one_line(adapter, tmp_path, edit, message):
    fixture, folder, _, _ = adapter
    broken = _broken(folder, tmp_path, edit)
    result = run_cli("convert", FIX / fixture, tmp_path / "o", "--to", "hf", "--merge-lora", broken, expect=1)
    assert message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_adapter_for_another_model_and_missing_folder(adapter, tmp_path):
    fixture, folder, _, _ = adapter
    other = "tiny-moe"
    result = run_cli("convert", FIX / other, tmp_path / "o", "--to", "hf", "--merge-lora", folder, expect=1)
    assert ("matches no tensor" in result.output or "was made for" in result.output), result.output
    assert len(result.output.strip().splitlines()) == 1
    result = run_cli("convert", FIX / fixture, tmp_path / "o", "--to", "hf", "--merge-lora", tmp_path, expect=1)
    assert "is not a PEFT adapter folder" in result.output


def test_merge_into_an_fp8_release_adds_to_the_dequantized_weights(adapter, tmp_path):
    from test_fp8 import _expand, make_fp8

    fixture, folder, _, _ = adapter
    if fixture != "tiny-dense-untied":
        pytest.skip("one fixture is enough")
    make_fp8(tmp_path / "fp8", fixture)
    run_cli("convert", tmp_path / "fp8", tmp_path / "out", "--to", "hf", "--merge-lora", folder, "-q")
    got, fp8 = load_hf_tensors(tmp_path / "out"), load_hf_tensors(tmp_path / "fp8")
    lora = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    name = "model.language_model.layers.1.self_attn.q_proj.weight"
    a, b = lora[f"base_model.model.{name[:-7]}.lora_A.weight"], lora[f"base_model.model.{name[:-7]}.lora_B.weight"]
    base = fp8[name].float() * _expand(fp8[name + "_scale_inv"], tuple(fp8[name].shape))
    want = (base + (b @ a) * (config["lora_alpha"] / config["r"])).to(torch.bfloat16)
    assert torch.equal(got[name], want)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
