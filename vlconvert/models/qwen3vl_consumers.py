"""What Megatron frameworks store about a Qwen3-VL model beside its weights, as plain data.

- Megatron-Bridge keeps the model as its provider dataclass in ``run_config.yaml`` (``model:``, with a
  ``_target_``); :func:`bridge_model_config` gives the fields Bridge's own Qwen3-VL bridges set from an
  HF config (``Qwen3VLBridge.provider_bridge`` / ``Qwen3VLMoEBridge.provider_bridge`` of Bridge 0.6.2,
  through its ``CONFIG_MAPPING``); every other field keeps the provider's default, as in Bridge's save.
- Megatron-LM keeps its command line as ``args`` (an ``argparse.Namespace``) in the common state;
  :func:`megatron_lm_args` gives the fields its loaders read for this architecture.
"""

from __future__ import annotations

from typing import Any

from vlconvert.dtypes import BFLOAT16, FLOAT16, FLOAT32
from vlconvert.models import bridge_config as bc
from vlconvert.models.megatron_table import hf_vision_tensors  # noqa: F401 - re-exported: the old name
from vlconvert.models.qwen3vl import ModelInfo

_BRIDGE_PROVIDERS = {False: "megatron.bridge.models.qwen_vl.qwen3_vl_provider.Qwen3VLModelProvider",
                     True: "megatron.bridge.models.qwen_vl.qwen3_vl_provider.Qwen3VLMoEModelProvider"}
_HF_CONFIGS = {"qwen3_vl": "transformers.models.qwen3_vl.configuration_qwen3_vl.Qwen3VL{}Config",
               "qwen3_vl_moe": "transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe.Qwen3VLMoe{}Config"}


def bridge_model_config(info: ModelInfo, *, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                        make_vocab_size_divisible_by: int = 128, hf_model_id: str | None = None,
                        consumer: str | None = None) -> dict:
    """The ``model:`` section of a Megatron-Bridge ``run_config.yaml`` for this model (``hf_model_id``: the HF
    folder Bridge finds the tokenizer and config in; the same for every ``consumer`` with a run_config.yaml)."""
    raw = info.raw
    text = dict(raw.get("text_config") or {})
    vision = dict(raw.get("vision_config") or {})
    dtype = info.dtype or FLOAT32
    model: dict[str, Any] = {"_target_": _BRIDGE_PROVIDERS[info.is_moe], **bc.mapped_fields(text)}
    rope = bc.rope(text)
    model.update(fp16=dtype == FLOAT16, bf16=dtype == BFLOAT16, params_dtype=bc.dtype_ref(dtype),
                 normalization="RMSNorm", gated_linear_unit=True, add_qkv_bias=bool(text.get("attention_bias")),
                 add_bias_linear=False, qk_layernorm=True, hidden_dropout=0.0,
                 share_embeddings_and_output_weights=bool(raw.get("tie_word_embeddings", False)))
    model["activation_func"] = bc.activation_ref(text)
    if info.is_moe:
        model.update(moe_ffn_hidden_size=info.moe_intermediate, num_moe_experts=info.experts,
                     moe_router_topk=info.experts_per_token, decoder_sparse_step=text.get("decoder_sparse_step", 1),
                     mlp_only_layers=list(text.get("mlp_only_layers") or []), moe_grouped_gemm=True,
                     moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3,
                     moe_router_pre_softmax=False, moe_token_dispatcher_type="alltoall", moe_permute_fusion=True)
    family = "qwen3_vl_moe" if info.is_moe else "qwen3_vl"
    model.update(position_embedding_type="mrope",
                 vision_config=bc.hf_config_ref(_HF_CONFIGS[family].format("Vision"), vision, dtype),
                 hf_text_config=bc.hf_config_ref(_HF_CONFIGS[family].format("Text"), text, dtype),
                 head_dim=info.head_dim, bos_token_id=text.get("bos_token_id", 151643),
                 eos_token_id=text.get("eos_token_id", 151645),
                 vision_start_token_id=raw.get("vision_start_token_id", 151652),
                 vision_end_token_id=raw.get("vision_end_token_id", 151653),
                 image_token_id=raw.get("image_token_id", 151655), video_token_id=raw.get("video_token_id", 151656),
                 mrope_section=list(rope.get("mrope_section", [24, 20, 20])))
    model.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                 make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    if etp is not None:
        model["expert_tensor_parallel_size"] = etp
    if hf_model_id is not None:
        model["hf_model_id"] = hf_model_id
    return model


def megatron_lm_args(info: ModelInfo, **sizes: Any) -> dict:
    """The fields of Megatron-LM's ``args`` for this model's language model (``pretrain_gpt.py`` flags): see
    :func:`vlconvert.models.gpt_table.megatron_lm_args`."""
    from vlconvert.models.gpt_table import megatron_lm_args as gpt_args

    text = info.raw.get("text_config") or {}
    return gpt_args(info, text, qk_norm=True, qkv_bias=False, **sizes)
