"""Megatron-Bridge's record of a model (``run_config.yaml``, section ``model:``) as plain data, from an HF config.

Megatron-Bridge 0.6.2 keeps the model it trained as its provider dataclass, written with a ``_target_`` naming the
provider class and one key per field; ``load_model_config`` / ``load_megatron_model`` instantiate it again. A
bridge derives that provider from an HF config in two steps, which this module mirrors for the families:

1. ``MegatronModelBridge.hf_config_to_provider_kwargs``: every HF field of :data:`CONFIG_MAPPING` the config object
   has (the first one present wins), ``rotary_base`` from ``rope_parameters`` when no ``rope_theta`` was mapped, the
   YaRN fields when the RoPE type is ``yarn``, ``make_vocab_size_divisible_by`` (the largest power of 2 up to 128
   dividing the vocabulary), the dtype flags and ``activation_func`` from ``hidden_act``
   (:func:`provider_kwargs`);
2. the bridge's ``provider_bridge``: the family's own fixed and derived fields (in each family module).

"The config object has" means the fields of config.json's section together with the class defaults of the
transformers config class (transformers 5.12, the version Bridge 0.6.2 runs with): a family passes those defaults
as ``defaults`` to :func:`hf_view`. Every field not written keeps the provider's default, as Bridge's own save
reads back. Values Bridge holds as Python objects are written the way its YAML representers write them: a torch
dtype or a function as ``{_target_: <dotted name>, _call_: false}``, an HF sub-config as its class and fields
(:func:`hf_config_ref`).
"""

from __future__ import annotations

from typing import Any

from vlconvert.dtypes import BFLOAT16, FLOAT16, FLOAT32, DType
from vlconvert.errors import UserError

# (HF config field, provider field), in Bridge 0.6.2's ``MegatronModelBridge.CONFIG_MAPPING`` order
CONFIG_MAPPING = (
    ("num_hidden_layers", "num_layers"), ("hidden_size", "hidden_size"), ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"), ("num_key_value_heads", "num_query_groups"),
    ("head_dim", "kv_channels"), ("vocab_size", "vocab_size"), ("max_position_embeddings", "seq_length"),
    ("rms_norm_eps", "layernorm_epsilon"), ("initializer_range", "init_method_std"),
    ("attention_dropout", "attention_dropout"), ("hidden_dropout", "hidden_dropout"),
    ("tie_word_embeddings", "share_embeddings_and_output_weights"), ("attention_bias", "add_qkv_bias"),
    ("mlp_bias", "add_bias_linear"), ("use_qk_norm", "qk_layernorm"), ("rope_theta", "rotary_base"),
    ("partial_rotary_factor", "rotary_percent"), ("num_experts", "num_moe_experts"),
    ("num_local_experts", "num_moe_experts"), ("num_experts_per_tok", "moe_router_topk"),
    ("moe_intermediate_size", "moe_ffn_hidden_size"), ("aux_loss_alpha", "moe_aux_loss_coeff"),
    ("router_aux_loss_coef", "moe_aux_loss_coeff"), ("scoring_func", "moe_router_score_function"),
    ("n_routed_experts", "num_moe_experts"), ("n_group", "moe_router_num_groups"),
    ("topk_group", "moe_router_group_topk"), ("routed_scaling_factor", "moe_router_topk_scaling_factor"),
    ("q_lora_rank", "q_lora_rank"), ("kv_lora_rank", "kv_lora_rank"), ("qk_nope_head_dim", "qk_head_dim"),
    ("qk_rope_head_dim", "qk_pos_emb_head_dim"), ("v_head_dim", "v_head_dim"),
    ("num_nextn_predict_layers", "mtp_num_layers"), ("mtp_num_hidden_layers", "mtp_num_layers"))
# provider fields only an MLA provider has: the GPT providers built through ``provider_bridge`` drop them
MLA_FIELDS = frozenset({"q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"})
# (HF rope_scaling key, provider field) when the RoPE type is yarn (a GPT provider)
YARN_MAPPING = (("factor", "yarn_rotary_scaling_factor"),
                ("original_max_position_embeddings", "yarn_original_max_position_embeddings"),
                ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"), ("mscale", "yarn_mscale"),
                ("mscale_all_dim", "yarn_mscale_all_dim"))
# hidden_act -> the function Bridge's ACTIVATION_FUNC_MAP gives, as its YAML representer names it
ACTIVATIONS = {"silu": "torch.nn.functional.silu"}


def check_consumer(family: str, consumer: str | None) -> None:
    """Refuse a Megatron-Bridge version other than 0.6 (``--for megatron-bridge-0.3``) for a family whose record
    follows Bridge 0.6.2's bridges only (one line)."""
    if consumer not in (None, "megatron-bridge"):
        raise UserError(f"writing {consumer}'s run_config.yaml for {family} is not supported (Megatron-Bridge 0.6's "
                        "is: --for megatron-bridge); use --for mbridge or --for megatron-lm")


def dtype_ref(dtype: DType) -> dict:
    """A torch dtype as Bridge's YAML representer writes it."""
    return {"_target_": str(dtype), "_call_": False}  # str(torch.bfloat16) == "torch.bfloat16"


def function_ref(dotted: str) -> dict:
    """A function (by its dotted name) as Bridge's YAML representer writes it."""
    return {"_target_": dotted, "_call_": False}


def rope(section: dict) -> dict:
    """The section's RoPE parameters (``rope_parameters`` in transformers 5, ``rope_scaling`` before)."""
    value = section.get("rope_parameters") or section.get("rope_scaling") or {}
    return value if isinstance(value, dict) else {}


def hf_view(section: dict, defaults: dict) -> dict:
    """What Bridge's ``getattr`` finds on the HF config object: the config's fields over the class defaults."""
    return {**defaults, **section}


def mapped_fields(view: dict) -> dict[str, Any]:
    """:data:`CONFIG_MAPPING` applied to ``view`` (the first HF field present wins), then ``rotary_base`` from the
    RoPE parameters when no ``rope_theta`` field was there."""
    out: dict[str, Any] = {}
    for hf_name, field_name in CONFIG_MAPPING:
        if hf_name in view and field_name not in out:
            out[field_name] = view[hf_name]
    if "rotary_base" not in out and "rope_theta" in rope(view):
        out["rotary_base"] = rope(view)["rope_theta"]
    return out


def rope_theta(view: dict) -> Any:
    """Bridge's ``rope_theta_from_hf``: the ``rope_theta`` field, else the RoPE parameters' (KeyError if neither)."""
    if view.get("rope_theta") is not None:
        return view["rope_theta"]
    return rope(view)["rope_theta"]


def vocab_divisor(vocab: int, start: int = 128) -> int:
    """Bridge's ``make_vocab_size_divisible_by``: the largest power of 2 up to ``start`` (128) dividing ``vocab``."""
    base = max(int(start), 1)
    while vocab % base:
        base //= 2
    return base


def provider_kwargs(view: dict, dtype: DType | None, *, divisible_by: int = 128) -> dict[str, Any]:
    """Bridge's ``hf_config_to_provider_kwargs`` of ``view`` (an HF language-model config's fields with its class
    defaults): mapped fields, YaRN fields, vocabulary divisor, dtype flags and the activation function."""
    out = mapped_fields(view)
    scaling = rope(view)
    if (scaling.get("type") or scaling.get("rope_type")) == "yarn":
        out["position_embedding_type"] = "yarn"
        out.update({field: scaling[key] for key, field in YARN_MAPPING if scaling.get(key) is not None})
        if "truncate" in scaling:
            out["yarn_correction_range_round_to_int"] = scaling["truncate"]
    if out.get("vocab_size") is not None:
        out["make_vocab_size_divisible_by"] = vocab_divisor(out["vocab_size"], divisible_by)
    dtype = dtype or FLOAT32
    out.update(fp16=dtype == FLOAT16, bf16=dtype == BFLOAT16, params_dtype=dtype_ref(dtype))
    out["activation_func"] = activation_ref(view)
    return out


def activation_ref(view: dict) -> dict:
    """The config's ``hidden_act`` as Bridge's ``activation_func`` (left out, Bridge's loader builds
    megatron-core's default, gelu); one line for an activation Bridge's record cannot name."""
    act = view.get("hidden_act") or view.get("hidden_activation") or "silu"
    if act not in ACTIVATIONS:
        raise UserError(f"writing Megatron-Bridge's run_config.yaml for hidden_act '{act}' is not supported "
                        f"(only {', '.join(ACTIVATIONS)}): use --for mbridge or --for megatron-lm")
    return function_ref(ACTIVATIONS[act])


def hf_config_ref(target: str, fields: dict, dtype: DType | None) -> dict:
    """An HF sub-config as Bridge serializes it: its class as ``_target_``, its fields as arguments (RoPE fields
    merged into ``rope_parameters`` as transformers 5 keeps them; ``dtype`` as a torch dtype, or left out)."""
    out: dict[str, Any] = {"_target_": target}
    out.update({k: v for k, v in fields.items() if k not in ("torch_dtype", "dtype", "rope_scaling", "rope_theta")})
    if "num_local_experts" in out:  # the constructor's name for it (transformers maps it to num_local_experts)
        out["num_experts"] = out.pop("num_local_experts")
    parameters = rope(fields)
    if parameters or "rope_theta" in fields:
        theta = {"rope_theta": fields["rope_theta"]} if "rope_theta" in fields else {}
        out["rope_parameters"] = {**parameters, **theta}
    if dtype is not None:
        out["dtype"] = dtype_ref(dtype)
    return out


def parallel_fields(*, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                    hf_model_id: str | None = None) -> dict[str, Any]:
    """The parallel sizes the checkpoint was written for and the HF model Bridge takes the tokenizer from."""
    out: dict[str, Any] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                           "expert_model_parallel_size": ep}
    if etp is not None:
        out["expert_tensor_parallel_size"] = etp
    if hf_model_id is not None:
        out["hf_model_id"] = hf_model_id
    return out


def section_dtype(*sections: dict) -> DType | None:
    """The first dtype named by ``dtype`` / ``torch_dtype`` in ``sections`` (None when none is)."""
    from vlconvert.dtypes import parse_dtype

    for section in sections:
        for key in ("dtype", "torch_dtype"):
            if isinstance(section.get(key), str):
                return parse_dtype(section[key])
    return None
