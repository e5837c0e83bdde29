"""Megatron-Bridge's ``run_config.yaml`` for Qwen3, Qwen3-MoE, Qwen2.5-VL and Qwen3.5-VL (dense and MoE): ``--to
torch_dist`` with the default consumer (``--for megatron-bridge``).

Tiny bf16 models are built with transformers' own classes from a config (the shapes of ``tests/test_families.py``
and ``tests/test_qwen3_5.py``) and saved with ``save_pretrained``. The ``model:`` section read back with
``yaml.safe_load`` is checked against the values Bridge 0.6.2's bridges take from the HF config, read here from the
transformers config object itself (``AutoConfig.from_pretrained``); the weights go back to HF bit for bit. That
Bridge's own ``load_model_config`` / ``load_megatron_model`` read the file is checked in ``tests/frameworks``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_hf_tensors, run_cli
from test_families import CONFIGS as FAMILY_CONFIGS
from test_family_routes import _build

from vlconvert.engine import Converter
from vlconvert.errors import UserError
from vlconvert.models import bridge_config as bc
from vlconvert.models.registry import family_of

transformers = pytest.importorskip("transformers")

CONFIGS: dict[str, dict] = {
    "qwen3": FAMILY_CONFIGS["qwen3-tied"],
    "qwen3_moe": {**FAMILY_CONFIGS["qwen3-moe"], "mlp_only_layers": [], "norm_topk_prob": True},
    "qwen2_5_vl": FAMILY_CONFIGS["qwen2_5_vl"],
    "qwen2_5_vl-released": FAMILY_CONFIGS["qwen2_5_vl-released"],
}
PROVIDERS = {"qwen3": "megatron.bridge.models.gpt_provider.GPTModelProvider",
             "qwen3_moe": "megatron.bridge.models.gpt_provider.GPTModelProvider",
             "qwen2_5_vl": "megatron.bridge.models.qwen_vl.qwen25_vl_provider.Qwen25VLModelProvider",
             "qwen3_5": "megatron.bridge.models.qwen_vl.qwen35_vl_provider.Qwen35VLModelProvider",
             "qwen3_5_moe": "megatron.bridge.models.qwen_vl.qwen35_vl_provider.Qwen35VLMoEModelProvider"}
BF16 = {"_target_": "torch.bfloat16", "_call_": False}
SILU = {"_target_": "torch.nn.functional.silu", "_call_": False}


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_qwen3_5 import _build as build_qwen3_5

    root = tmp_path_factory.mktemp("bridge-run-config")
    out = {}
    for name, config in CONFIGS.items():
        _build(config).save_pretrained(root / name)
        out[name] = root / name
    out["qwen3_5"] = build_qwen3_5(root, False)  # with the mtp.* tensors releases carry
    out["qwen3_5_moe"] = build_qwen3_5(root, True)
    return out


def _run_config(src: Path, dst: Path, *args: str) -> dict:
    """Convert ``src`` to torch_dist for the default consumer; the ``model:`` section of its run_config.yaml."""
    run_cli("convert", src, dst, "--to", "torch_dist", *args, "-q")
    config = yaml.safe_load((dst / "iter_0000000/run_config.yaml").read_text())
    assert config["_target_"] == "megatron.bridge.training.config.ConfigContainer"
    assert config["checkpoint"]["ckpt_format"] == "torch_dist"
    return config["model"]


def _round_trip(src: Path, td: Path, out: Path) -> None:
    Converter(td, out, to="hf", assets_dir=src).run()
    want, have = load_hf_tensors(src), load_hf_tensors(out)
    assert sorted(want) == sorted(have)
    bad = [k for k in want if want[k].dtype != have[k].dtype or not torch.equal(want[k], have[k])]
    assert not bad, bad[:5]


def _divisor(vocab: int) -> int:
    return next(d for d in (128, 64, 32, 16, 8, 4, 2, 1) if vocab % d == 0)


def _language_fields(text) -> dict:
    """What Bridge's ``hf_config_to_provider_kwargs`` takes from a transformers text config object."""
    rope = text.rope_parameters
    return {"num_layers": text.num_hidden_layers, "hidden_size": text.hidden_size,
            "num_attention_heads": text.num_attention_heads, "num_query_groups": text.num_key_value_heads,
            "vocab_size": text.vocab_size, "seq_length": text.max_position_embeddings,
            "layernorm_epsilon": text.rms_norm_eps, "init_method_std": text.initializer_range,
            "attention_dropout": text.attention_dropout, "rotary_base": rope["rope_theta"],
            "make_vocab_size_divisible_by": _divisor(text.vocab_size), "fp16": False, "bf16": True,
            "params_dtype": BF16, "activation_func": SILU}


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_text_models(sources: dict, tmp_path: Path, family: str) -> None:
    from transformers import AutoConfig

    src = sources[family]
    cfg = AutoConfig.from_pretrained(src)
    model = _run_config(src, tmp_path / "td", "--tp", "2")
    want = {"_target_": PROVIDERS[family], **_language_fields(cfg), "ffn_hidden_size": cfg.intermediate_size,
            "kv_channels": cfg.head_dim, "share_embeddings_and_output_weights": cfg.tie_word_embeddings,
            "position_embedding_type": "rope", "normalization": "RMSNorm", "gated_linear_unit": True,
            "add_bias_linear": False, "add_qkv_bias": False, "hidden_dropout": 0.0, "qk_layernorm": True,
            "autocast_dtype": BF16, "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
            "expert_model_parallel_size": 1, "hf_model_id": str(src.resolve())}
    if family == "qwen3_moe":
        want.update(num_moe_experts=cfg.num_experts, moe_router_topk=cfg.num_experts_per_tok,
                    moe_ffn_hidden_size=cfg.moe_intermediate_size, moe_aux_loss_coeff=cfg.router_aux_loss_coef,
                    moe_grouped_gemm=True, moe_router_load_balancing_type="aux_loss",
                    moe_router_pre_softmax=not cfg.norm_topk_prob, moe_token_dispatcher_type="alltoall",
                    moe_permute_fusion=True)
    assert model == want
    assert (model["num_layers"], model["vocab_size"], model["make_vocab_size_divisible_by"]) == (3, 96, 32)
    assert model["share_embeddings_and_output_weights"] is (family == "qwen3")
    if family == "qwen3_moe":
        assert model["num_moe_experts"] == 4 and model["moe_router_pre_softmax"] is False
    _round_trip(src, tmp_path / "td", tmp_path / "hf")


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_5_vl-released"])
def test_qwen2_5_vl(sources: dict, tmp_path: Path, name: str) -> None:
    from transformers import AutoConfig

    src = sources[name]
    cfg = AutoConfig.from_pretrained(src)
    raw = json.loads((src / "config.json").read_text())
    model = _run_config(src, tmp_path / "td")
    vision = model.pop("vision_config")
    want = {"_target_": PROVIDERS["qwen2_5_vl"], **_language_fields(cfg.text_config),
            "ffn_hidden_size": cfg.text_config.intermediate_size, "normalization": "RMSNorm",
            "gated_linear_unit": True, "add_qkv_bias": True, "add_bias_linear": False, "hidden_dropout": 0.0,
            "share_embeddings_and_output_weights": cfg.tie_word_embeddings, "position_embedding_type": "mrope",
            "bos_token_id": cfg.text_config.bos_token_id, "eos_token_id": cfg.text_config.eos_token_id,
            "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
            "vision_token_id": 151654, "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
            "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1,
            "hf_model_id": str(src.resolve())}
    if "head_dim" in raw.get("text_config", {}):  # a field of the config object only when config.json names it
        want["kv_channels"] = raw["text_config"]["head_dim"]
    assert model == want
    assert "mrope_section" not in model  # Bridge 0.6.2 keeps its provider's default [16, 24, 24]
    assert vision["_target_"].endswith("configuration_qwen2_5_vl.Qwen2_5_VLVisionConfig")
    given = raw["vision_config"]
    assert {k: vision[k] for k in given if k not in ("dtype", "torch_dtype")} == \
        {k: v for k, v in given.items() if k not in ("dtype", "torch_dtype")}
    assert (vision["depth"], vision["hidden_size"], vision["out_hidden_size"]) == (
        cfg.vision_config.depth, cfg.vision_config.hidden_size, cfg.vision_config.out_hidden_size)
    _round_trip(src, tmp_path / "td", tmp_path / "hf")


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5(sources: dict, tmp_path: Path, family: str) -> None:
    from transformers import AutoConfig

    src = sources[family]
    cfg = AutoConfig.from_pretrained(src)
    text = cfg.text_config
    model = _run_config(src, tmp_path / "td", "--tp", "2", "--ep", "2" if family.endswith("moe") else "1")
    vision = model.pop("vision_config")
    want = {"_target_": PROVIDERS[family], **_language_fields(text), "kv_channels": text.head_dim,
            "share_embeddings_and_output_weights": cfg.tie_word_embeddings, "add_qkv_bias": False,
            "mtp_num_layers": text.mtp_num_hidden_layers, "mtp_loss_scaling_factor": 0.1,
            "normalization": "RMSNorm", "gated_linear_unit": True, "add_bias_linear": False, "qk_layernorm": True,
            "hidden_dropout": 0.0, "layernorm_zero_centered_gamma": True, "attention_output_gate": True,
            "experimental_attention_variant": "gated_delta_net",
            "linear_attention_freq": [int(t == "linear_attention") for t in text.layer_types],
            "linear_num_value_heads": text.linear_num_value_heads,
            "rotary_percent": text.rope_parameters["partial_rotary_factor"],
            "linear_conv_kernel_dim": text.linear_conv_kernel_dim, "linear_key_head_dim": text.linear_key_head_dim,
            "linear_value_head_dim": text.linear_value_head_dim, "linear_num_key_heads": text.linear_num_key_heads,
            "position_embedding_type": "mrope", "bos_token_id": text.bos_token_id,
            "eos_token_id": text.eos_token_id, "vision_start_token_id": cfg.vision_start_token_id,
            "vision_end_token_id": cfg.vision_end_token_id, "image_token_id": cfg.image_token_id,
            "video_token_id": cfg.video_token_id, "mrope_section": text.rope_parameters["mrope_section"],
            "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
            "expert_model_parallel_size": 2 if family.endswith("moe") else 1, "hf_model_id": str(src.resolve())}
    if family == "qwen3_5":
        want["ffn_hidden_size"] = text.intermediate_size
    else:
        want.update(num_moe_experts=text.num_experts, moe_router_topk=text.num_experts_per_tok,
                    moe_ffn_hidden_size=text.moe_intermediate_size, moe_aux_loss_coeff=text.router_aux_loss_coef,
                    moe_shared_expert_intermediate_size=text.shared_expert_intermediate_size,
                    moe_shared_expert_gate=True, moe_grouped_gemm=True,
                    moe_router_load_balancing_type="global_aux_loss", moe_router_pre_softmax=False,
                    moe_token_dispatcher_type="alltoall", moe_permute_fusion=True)
        if "intermediate_size" in json.loads((src / "config.json").read_text())["text_config"]:
            want["ffn_hidden_size"] = json.loads((src / "config.json").read_text())["text_config"]["intermediate_size"]
    assert model == want
    assert model["linear_attention_freq"] == [1, 0] and model["rotary_percent"] == 0.5
    assert model["mrope_section"] == [2, 1, 1] and model["mtp_num_layers"] == 1
    assert not {"head_dim", "hf_text_config", "audio_token_id"} & set(model)  # not provider fields
    assert vision["_target_"].endswith("VisionConfig") and vision["dtype"] == BF16
    assert (vision["depth"], vision["hidden_size"], vision["patch_size"]) == (
        cfg.vision_config.depth, cfg.vision_config.hidden_size, cfg.vision_config.patch_size)
    _round_trip(src, tmp_path / "td", tmp_path / "hf")  # mtp.* included


def test_qwen3_moe_with_dense_layers_is_refused_in_one_line(tmp_path: Path) -> None:
    """Bridge 0.6.2's Qwen3-MoE provider builds every layer as MoE: a config with dense layers is refused."""
    _build(FAMILY_CONFIGS["qwen3-moe"]).save_pretrained(tmp_path / "src")  # mlp_only_layers [1]
    result = run_cli("convert", tmp_path / "src", tmp_path / "td", "--to", "torch_dist", expect=1)
    assert "mlp_only_layers" in result.output and "--for mbridge" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "td").exists()


def _info(config: dict):
    return family_of(config).load_config(json.loads(json.dumps(config)))


def test_fields_config_json_leaves_out_take_transformers_class_defaults() -> None:
    """A field missing from config.json is one the transformers config object still has (its class default)."""
    config = {k: v for k, v in CONFIGS["qwen3"].items() if k not in ("rms_norm_eps", "max_position_embeddings")}
    model = family_of(config).bridge_model_config(_info(config))
    assert (model["layernorm_epsilon"], model["seq_length"]) == (1e-06, 32768)
    model = family_of(config).bridge_model_config(_info({**config, "rms_norm_eps": 1e-05}))
    assert model["layernorm_epsilon"] == 1e-05
    moe = {k: v for k, v in CONFIGS["qwen3_moe"].items() if k != "norm_topk_prob"}
    assert family_of(moe).bridge_model_config(_info(moe))["moe_router_pre_softmax"] is True  # default False


def test_yarn_rope_and_vocabulary_divisor() -> None:
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}
    config = {**CONFIGS["qwen3"], "rope_parameters": rope, "vocab_size": 151936}
    model = family_of(config).bridge_model_config(_info(config), make_vocab_size_divisible_by=128)
    assert model["position_embedding_type"] == "yarn" and model["rotary_base"] == 1e6
    assert (model["yarn_rotary_scaling_factor"], model["yarn_original_max_position_embeddings"]) == (4.0, 32768)
    assert model["make_vocab_size_divisible_by"] == 128  # 151936 = 128 x 1187
    assert bc.vocab_divisor(96) == 32 and bc.vocab_divisor(151936, 64) == 64 and bc.vocab_divisor(7) == 1


def test_unknown_activation_is_refused_in_one_line() -> None:
    config = {**CONFIGS["qwen3"], "hidden_act": "gelu"}
    with pytest.raises(UserError, match="hidden_act 'gelu'"):
        family_of(config).bridge_model_config(_info(config))


def test_megatron_bridge_0_3_is_refused_in_one_line(sources: dict, tmp_path: Path) -> None:
    """These records follow Bridge 0.6.2's bridges: ``--for megatron-bridge-0.3`` is refused, not written."""
    result = run_cli("convert", sources["qwen3"], tmp_path / "td", "--to", "torch_dist", "--for",
                     "megatron-bridge-0.3", expect=1)
    assert "megatron-bridge-0.3" in result.output and "--for megatron-bridge" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "td").exists()
