"""Qwen3 and Qwen3-MoE text models (``qwen3``, ``qwen3_moe``): the Qwen3-VL language model alone.

Canonical names are the released checkpoints' (and transformers' ``save_pretrained``): ``model.embed_tokens``,
``model.layers.N.*``, ``model.norm``, ``lm_head``. Qwen3-MoE experts are stored **per expert**
(``model.layers.N.mlp.experts.E.gate_proj/up_proj/down_proj.weight``, 2-D ``[out, in]``); transformers 5
fuses them at load time (``conversion_mapping.py`` "qwen2_moe" pattern: ``experts.gate_up_proj`` [E, 2I, H]
= per expert cat(gate, up) on dim 0, ``experts.down_proj`` [E, H, I]) and splits them again on save, so the
fused names exist only in a transformers 5 model's memory (and a DCP saved from it).

Megatron side: Megatron-LM's GPTModel, unprefixed (``embedding.word_embeddings.weight``,
``decoder.layers.L.*``, ``output_layer.weight``), the table of :mod:`vlconvert.models.gpt_table` (the names
Megatron-Bridge 0.6.2's Qwen3 / Qwen3-MoE bridges use). Bridge's ``run_config.yaml``:
:meth:`Qwen3TextFamily.bridge_model_config` (``Qwen3Bridge`` / ``Qwen3MoEBridge.provider_bridge``).

:func:`lm_shapes` (a Qwen GPT language model's tensors under a prefix) is shared with the VL families.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from vlconvert.dtypes import BFLOAT16, parse_dtype
from vlconvert.errors import UsageError, UserError
from vlconvert.models import bridge_config as bc
from vlconvert.models.base import ModelInfo, RuntimeTensor, Skeleton, config_int, linear_shapes, renamed
from vlconvert.models.family import EXPERT_STYLES, SPECS, Family, MegatronPrefixes
from vlconvert.models.gpt_table import decoder_layer_params, embedding_param, final_params
from vlconvert.models.megatron_table import Param
from vlconvert.models.qwen3vl import SIZE_BOUNDS

HF_LM = "model."
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_PER_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")

# Class defaults of transformers' Qwen3Config / Qwen3MoeConfig (5.x), used where config.json leaves a field out.
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "attention_bias": False},
    "qwen3_moe": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": None, "attention_bias": False,
                  "decoder_sparse_step": 1, "moe_intermediate_size": 768, "num_experts": 128,
                  "num_experts_per_tok": 8, "mlp_only_layers": None},
}

# transformers 5.12's Qwen3Config / Qwen3MoeConfig class defaults of the fields Megatron-Bridge 0.6.2 reads (the
# version Bridge runs with): a field config.json leaves out is one the config object still has
_ROPE = {"rope_theta": 10000.0, "rope_type": "default"}
_BRIDGE_COMMON = {"max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "initializer_range": 0.02,
                  "attention_dropout": 0.0, "tie_word_embeddings": False, "attention_bias": False,
                  "hidden_act": "silu", "rope_parameters": _ROPE}
BRIDGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": {**_BRIDGE_COMMON, "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128},
    "qwen3_moe": {**_BRIDGE_COMMON, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                  "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 4, "num_experts": 128,
                  "num_experts_per_tok": 8, "moe_intermediate_size": 768, "router_aux_loss_coef": 0.001,
                  "norm_topk_prob": False},
}
GPT_PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"


def check_text_sizes(text: dict, where: str = "") -> None:
    """Refuse language-model sizes beyond vlconvert's bounds (one line naming the field)."""
    for name, bound in SIZE_BOUNDS["text_config"].items():
        value = text.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value <= bound:
            shown = value if isinstance(value, int) and value < 10**30 else f"{float(value):.3g}"
            raise UserError(f"config field '{where}{name}' is {shown}, more than any model vlconvert can "
                            f"convert ({bound:,} at most): is config.json corrupt?")


def text_fields(text: dict, defaults: dict[str, Any]) -> dict[str, int]:
    """The language model's integer sizes (config value, else the class default), checked."""
    text = dict(text)
    if "num_local_experts" in text:  # transformers maps num_experts onto it
        text["num_experts"] = text["num_local_experts"]
    heads = config_int(text, defaults, "num_attention_heads")
    hidden = config_int(text, defaults, "hidden_size")
    kv = text.get("num_key_value_heads", defaults.get("num_key_value_heads"))
    head_dim = text.get("head_dim", defaults.get("head_dim"))
    out = {"hidden": hidden, "heads": heads, "vocab": config_int(text, defaults, "vocab_size"),
           "layers": config_int(text, defaults, "num_hidden_layers"),
           "intermediate": config_int(text, defaults, "intermediate_size"),
           "kv_heads": heads if kv is None else config_int({"k": kv}, {}, "k"),
           "head_dim": config_int({"k": head_dim}, {}, "k") if head_dim else hidden // heads,
           "experts": 0, "experts_per_token": 0, "moe_intermediate": 0, "sparse_step": 1}
    if "num_experts" in defaults:
        out["experts"] = config_int(text, defaults, "num_experts")
        out["experts_per_token"] = config_int(text, defaults, "num_experts_per_tok")
        out["moe_intermediate"] = config_int(text, defaults, "moe_intermediate_size")
        out["sparse_step"] = config_int(text, defaults, "decoder_sparse_step")
    return out


def model_dtype(*sections: dict) -> Any:
    """The dtype a config names (``dtype`` / ``torch_dtype``, first section first), or None."""
    for section in sections:
        for key in ("dtype", "torch_dtype"):
            if isinstance(section.get(key), str):
                return parse_dtype(section[key])
    return None


def is_sparse_layer(text: dict, fields: dict[str, int], layer: int) -> bool:
    """True when ``layer`` has a MoE block (transformers' rule: not in mlp_only_layers, every sparse_step)."""
    mlp_only = set(text.get("mlp_only_layers") or ())
    return fields["experts"] > 0 and layer not in mlp_only and (layer + 1) % fields["sparse_step"] == 0


def lm_shapes(shapes: dict[str, tuple[int, ...]], text: dict, fields: dict[str, int], prefix: str, *,
              runtime_experts: str, qk_norm: bool, qkv_bias: bool, o_bias: bool) -> None:
    """Add a Qwen GPT language model's tensors under ``prefix`` (``embed_tokens``, ``layers.N.*``, ``norm``) in
    registration order; MoE experts per expert (released layout), the router first under transformers 4."""
    h, inter, heads, kv, hd = (fields[k] for k in ("hidden", "intermediate", "heads", "kv_heads", "head_dim"))
    shapes[f"{prefix}embed_tokens.weight"] = (fields["vocab"], h)
    for i in range(fields["layers"]):
        layer = f"{prefix}layers.{i}"
        linear_shapes(shapes, f"{layer}.self_attn.q_proj", heads * hd, h, qkv_bias)
        linear_shapes(shapes, f"{layer}.self_attn.k_proj", kv * hd, h, qkv_bias)
        linear_shapes(shapes, f"{layer}.self_attn.v_proj", kv * hd, h, qkv_bias)
        linear_shapes(shapes, f"{layer}.self_attn.o_proj", h, heads * hd, o_bias)
        if qk_norm:
            shapes[f"{layer}.self_attn.q_norm.weight"] = (hd,)
            shapes[f"{layer}.self_attn.k_norm.weight"] = (hd,)
        if is_sparse_layer(text, fields, i):
            router = {f"{layer}.mlp.gate.weight": (fields["experts"], h)}
            if runtime_experts != "transformers5":  # transformers 4.x registers the router first
                shapes.update(router)
            mi = fields["moe_intermediate"]
            for e in range(fields["experts"]):
                expert = f"{layer}.mlp.experts.{e}"
                linear_shapes(shapes, f"{expert}.gate_proj", mi, h, False)
                linear_shapes(shapes, f"{expert}.up_proj", mi, h, False)
                linear_shapes(shapes, f"{expert}.down_proj", h, mi, False)
            if runtime_experts == "transformers5":
                shapes.update(router)
        else:
            linear_shapes(shapes, f"{layer}.mlp.gate_proj", inter, h, False)
            linear_shapes(shapes, f"{layer}.mlp.up_proj", inter, h, False)
            linear_shapes(shapes, f"{layer}.mlp.down_proj", h, inter, False)
        shapes[f"{layer}.input_layernorm.weight"] = (h,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (h,)
    shapes[f"{prefix}norm.weight"] = (h,)


def fused_expert_runtime(skeleton: Skeleton, per_expert: Callable[[str], bool]) -> list[RuntimeTensor]:
    """The canonical tensors with each layer's per-expert ``experts.E.gate_proj/up_proj/down_proj`` replaced by
    transformers 5's fused ``experts.gate_up_proj`` / ``experts.down_proj``, where the first of them stood."""
    out: list[RuntimeTensor] = []
    done: set[str] = set()
    for t in renamed(skeleton, {}):
        name = t.name
        if not per_expert(name):
            out.append(t)
            continue
        head = name[:name.index(".mlp.experts.") + len(".mlp.experts.")]
        if head in done:
            continue
        done.add(head)
        experts = skeleton.info.experts
        inter, hidden = skeleton.shape_in(f"{head}0.gate_proj.weight", "released")
        gate_up = tuple(row for e in range(experts) for row in ((f"{head}{e}.gate_proj.weight", 0, inter),
                                                                 (f"{head}{e}.up_proj.weight", 0, inter)))
        down = tuple((f"{head}{e}.down_proj.weight", 0, hidden) for e in range(experts))
        out.append(RuntimeTensor(f"{head}gate_up_proj", (experts, 2 * inter, hidden), gate_up, stacked=True))
        out.append(RuntimeTensor(f"{head}down_proj", (experts, hidden, inter), down, stacked=True))
    return out


def check_spec(spec: str, experts: str) -> None:
    """Refuse an unknown Megatron spec or experts style (one line)."""
    if spec not in SPECS:
        raise UsageError(f"unknown --spec '{spec}': use one of {', '.join(SPECS)}")
    if experts not in EXPERT_STYLES:
        raise UsageError(f"unknown --experts '{experts}': use one of {', '.join(EXPERT_STYLES)}")


class Qwen3TextFamily(Family):
    """Qwen3 dense and Qwen3-MoE: a flat config, per-expert MoE tensors, Megatron-LM's unprefixed GPTModel."""

    name = "qwen3"
    model_types = tuple(ARCHITECTURES)
    architectures = tuple(ARCHITECTURES.values())
    megatron_prefixes = MegatronPrefixes(language="")
    embed = EMBED
    output = LM_HEAD
    expert_storage = "per_expert"
    layer_pattern = _LAYER

    def load_config(self, raw: dict) -> ModelInfo:
        model_type = raw.get("model_type")
        if model_type not in TEXT_DEFAULTS:
            raise UserError(f"model_type '{model_type}' is not a Qwen3 text model")
        check_text_sizes(raw)
        try:
            f = text_fields(raw, TEXT_DEFAULTS[model_type])
            return ModelInfo(family=model_type, tied=bool(raw.get("tie_word_embeddings", False)), hidden=f["hidden"],
                             layers=f["layers"], heads=f["heads"], kv_heads=f["kv_heads"], head_dim=f["head_dim"],
                             vocab=f["vocab"], intermediate=f["intermediate"], experts=f["experts"],
                             experts_per_token=f["experts_per_token"], moe_intermediate=f["moe_intermediate"],
                             vision_depth=0, vision_hidden=0, vision_heads=0, vision_intermediate=0, deepstack=(),
                             dtype=model_dtype(raw), raw=raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"config is missing or has a bad value for {exc}") from exc

    def skeleton_shapes(self, info: ModelInfo, runtime_experts: str) -> dict[str, tuple[int, ...]]:
        raw = info.raw
        defaults = TEXT_DEFAULTS[info.family]
        shapes: dict[str, tuple[int, ...]] = {}
        lm_shapes(shapes, raw, text_fields(raw, defaults), HF_LM, runtime_experts=runtime_experts, qk_norm=True,
                  qkv_bias=bool(raw.get("attention_bias", False)), o_bias=bool(raw.get("attention_bias", False)))
        shapes[LM_HEAD] = (info.vocab, info.hidden)  # in the state dict also when tied
        return shapes

    def is_routed_expert(self, name: str) -> bool:
        return _PER_EXPERT.search(name) is not None

    def runtime_tensors(self, skeleton: Skeleton) -> list[RuntimeTensor] | None:
        """transformers 5 fuses each MoE layer's per-expert tensors at load (``experts.gate_up_proj`` [E, 2I, H]:
        per expert gate rows then up rows; ``experts.down_proj`` [E, H, I]) and splits them again on save."""
        if not skeleton.info.is_moe or skeleton.runtime_experts != "transformers5":
            return None
        return fused_expert_runtime(skeleton, self.is_routed_expert)

    def megatron_params(self, skeleton: Skeleton, *, spec: str = "te", experts: str = "grouped",
                        padded_vocab: int | None = None) -> list[Param]:
        check_spec(spec, experts)
        if skeleton.info.raw.get("attention_bias"):
            raise UserError("attention_bias=True is not supported for Qwen3 Megatron conversion")
        mg = self.megatron_prefixes.language
        out = [embedding_param(skeleton, EMBED, mg, padded_vocab)]
        for layer in range(skeleton.info.layers):
            out += decoder_layer_params(skeleton, layer, hf_lm=HF_LM, mg_lm=mg, spec=spec, experts=experts)
        out += final_params(skeleton, f"{HF_LM}norm.weight", EMBED, LM_HEAD, mg, padded_vocab)
        return out

    def bridge_model_config(self, info: ModelInfo, *, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                            make_vocab_size_divisible_by: int = 128, hf_model_id: str | None = None,
                            consumer: str | None = None, **_: Any) -> dict:
        """Bridge 0.6.2's ``GPTModelProvider`` as ``Qwen3Bridge`` / ``Qwen3MoEBridge.provider_bridge`` derive it:
        the base ``provider_bridge`` (mapped fields, RoPE or YaRN, dtype, activation), then Qwen3's fixed fields
        and, for MoE, the router and dispatcher settings (``moe_router_pre_softmax`` = not ``norm_topk_prob``)."""
        bc.check_consumer(info.family, consumer)
        raw = info.raw
        fields = text_fields(raw, TEXT_DEFAULTS[info.family])
        if info.is_moe and not all(is_sparse_layer(raw, fields, i) for i in range(info.layers)):
            raise UserError("Megatron-Bridge 0.6.2 builds every Qwen3-MoE layer as a MoE layer and this config has "
                            "dense ones (mlp_only_layers / decoder_sparse_step): its run_config.yaml cannot "
                            "describe the model; use --for mbridge or --for megatron-lm")
        view = bc.hf_view(raw, BRIDGE_DEFAULTS[info.family])
        if info.is_moe:  # one attribute under two names (transformers' attribute_map): the config's value for both
            view["num_experts"] = view["num_local_experts"] = info.experts
        kwargs = bc.provider_kwargs(view, info.dtype, divisible_by=make_vocab_size_divisible_by)
        model: dict[str, Any] = {"_target_": GPT_PROVIDER,
                                 **{k: v for k, v in kwargs.items() if k not in bc.MLA_FIELDS}}
        model.setdefault("position_embedding_type", "rope")  # "yarn" when the RoPE type says so
        model.update(normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False, add_qkv_bias=False,
                     hidden_dropout=0.0, qk_layernorm=True, autocast_dtype=bc.dtype_ref(BFLOAT16))
        if info.is_moe:
            model.update(moe_grouped_gemm=True, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3,
                         moe_router_pre_softmax=not view.get("norm_topk_prob"),
                         moe_token_dispatcher_type="alltoall", moe_permute_fusion=True)
        return {**model, **bc.parallel_fields(tp=tp, pp=pp, ep=ep, etp=etp, hf_model_id=hf_model_id)}


FAMILY = Qwen3TextFamily()
