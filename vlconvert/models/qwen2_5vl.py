"""Qwen2.5-VL (``qwen2_5_vl``): a Qwen2 language model (q/k/v biases, no q/k norms) and a window-attention ViT.

Canonical names are the released checkpoints' (transformers 4.49 era), which transformers 4.52+ and 5.x also
write with ``save_pretrained`` (``conversion_mapping.py`` renames on load and back on save): ``visual.*``
(``patch_embed.proj`` without bias, ``blocks.N.norm1/norm2`` RMSNorm, ``attn.qkv`` / ``attn.proj`` with biases,
gated ``mlp.gate_proj/up_proj/down_proj`` with biases, ``merger.ln_q`` + ``merger.mlp.0`` / ``mlp.2``; no
deepstack), ``model.embed_tokens`` / ``model.layers.N.*`` / ``model.norm`` and ``lm_head``. A transformers
4.52+/5.x model holds them as ``model.visual.*`` and ``model.language_model.*``
(:meth:`Qwen25VLFamily.canonical_name` maps those back). Released config.json files keep the language
model's fields at the top level; transformers 5 writes them under ``text_config``: both are read.

Megatron side (Megatron-Bridge 0.6.2's Qwen2.5-VL bridge): the language model under ``language_model.``
(:mod:`vlconvert.models.gpt_table`, QKV biases interleaved like the weights); the vision tower is the HF
module itself, kept under ``visual.`` with its HF names and replicated on every TP rank. Bridge's
``run_config.yaml``: :meth:`Qwen25VLFamily.bridge_model_config` (``Qwen25VLBridge.provider_bridge``).
"""

from __future__ import annotations

import re
from typing import Any

from vlconvert.errors import UserError
from vlconvert.models import bridge_config as bc
from vlconvert.models.base import ModelInfo, RuntimeTensor, Skeleton, as_dict, config_int, linear_shapes, renamed
from vlconvert.models.family import Family, MegatronPrefixes
from vlconvert.models.gpt_table import decoder_layer_params, embedding_param, final_params
from vlconvert.models.megatron_table import Param, Src, _whole
from vlconvert.models.qwen3_text import check_spec, check_text_sizes, lm_shapes, model_dtype, text_fields
from vlconvert.models.qwen3vl import SIZE_BOUNDS

HF_LM = "model."
VIS = "visual."
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_RUNTIME_NAMES = ((re.compile(r"^model\.visual\."), VIS), (re.compile(r"^model\.language_model\."), HF_LM))

# Class defaults of transformers' Qwen2_5_VLTextConfig / Qwen2_5_VLVisionConfig (5.x).
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": None,
}
VISION_DEFAULTS: dict[str, Any] = {
    "depth": 32, "hidden_size": 3584, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 3584,
}
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings", "dtype", "torch_dtype")

# transformers 5.12's Qwen2_5_VLTextConfig: the top-level fields a released (flat) config.json hands to it, and the
# class defaults of those Megatron-Bridge 0.6.2 reads (the version Bridge runs with)
_TEXT_PARAMS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                "use_cache", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
                "attention_dropout", "rope_parameters", "rope_scaling", "rope_theta", "bos_token_id",
                "eos_token_id", "pad_token_id")
BRIDGE_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
    "initializer_range": 0.02, "attention_dropout": 0.0, "hidden_act": "silu",
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "bos_token_id": 151643,
    "eos_token_id": 151645,
}
PROVIDER = "megatron.bridge.models.qwen_vl.qwen25_vl_provider.Qwen25VLModelProvider"
VISION_CONFIG = "transformers.models.qwen2_5_vl.configuration_qwen2_5_vl.Qwen2_5_VLVisionConfig"


def text_config(raw: dict) -> dict:
    """The language model's fields: ``text_config`` (transformers 5), else the top level (released configs)."""
    text = as_dict(raw.get("text_config"), "text_config")
    if text:
        return text
    return {k: raw[k] for k in _TEXT_KEYS if k in raw}


def _vision_sizes(vision: dict) -> None:
    for name, bound in SIZE_BOUNDS["vision_config"].items():
        value = vision.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value <= bound:
            raise UserError(f"config field 'vision_config.{name}' is {value}, more than any model vlconvert can "
                            f"convert ({bound:,} at most): is config.json corrupt?")


class Qwen25VLFamily(Family):
    """Qwen2.5-VL: Qwen2 language model with QKV biases, window-attention ViT kept as the HF module in Megatron."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    megatron_prefixes = MegatronPrefixes(language="language_model.", vision=VIS)
    embed = EMBED
    output = LM_HEAD
    layer_pattern = _LAYER
    hf_vision_prefix = VIS
    qk_norm = False
    qkv_bias = True

    def load_config(self, raw: dict) -> ModelInfo:
        text = text_config(raw)
        vision = {**VISION_DEFAULTS, **as_dict(raw.get("vision_config"), "vision_config")}
        check_text_sizes(text, "text_config." if raw.get("text_config") else "")
        _vision_sizes(vision)
        try:
            f = text_fields(text, TEXT_DEFAULTS)
            return ModelInfo(
                family="qwen2_5_vl",
                tied=bool(raw.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False)),
                hidden=f["hidden"], layers=f["layers"], heads=f["heads"], kv_heads=f["kv_heads"],
                head_dim=f["head_dim"], vocab=f["vocab"], intermediate=f["intermediate"], experts=0,
                experts_per_token=0, moe_intermediate=0,
                vision_depth=config_int(vision, {}, "depth"), vision_hidden=config_int(vision, {}, "hidden_size"),
                vision_heads=config_int(vision, {}, "num_heads"),
                vision_intermediate=config_int(vision, {}, "intermediate_size"), deepstack=(),
                dtype=model_dtype(raw, text), raw=raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"config is missing or has a bad value for {exc}") from exc

    def skeleton_shapes(self, info: ModelInfo, runtime_experts: str) -> dict[str, tuple[int, ...]]:
        raw = info.raw
        vision = {**VISION_DEFAULTS, **(raw.get("vision_config") or {})}
        shapes: dict[str, tuple[int, ...]] = {}
        hv, iv = config_int(vision, {}, "hidden_size"), config_int(vision, {}, "intermediate_size")
        patch, temporal = config_int(vision, {}, "patch_size"), config_int(vision, {}, "temporal_patch_size")
        shapes[f"{VIS}patch_embed.proj.weight"] = (hv, config_int(vision, {}, "in_channels"), temporal, patch, patch)
        for j in range(config_int(vision, {}, "depth")):
            block = f"{VIS}blocks.{j}"
            shapes[f"{block}.norm1.weight"] = (hv,)
            shapes[f"{block}.norm2.weight"] = (hv,)
            linear_shapes(shapes, f"{block}.attn.qkv", 3 * hv, hv, True)
            linear_shapes(shapes, f"{block}.attn.proj", hv, hv, True)
            linear_shapes(shapes, f"{block}.mlp.gate_proj", iv, hv, True)
            linear_shapes(shapes, f"{block}.mlp.up_proj", iv, hv, True)
            linear_shapes(shapes, f"{block}.mlp.down_proj", hv, iv, True)
        merged = hv * config_int(vision, {}, "spatial_merge_size") ** 2
        shapes[f"{VIS}merger.ln_q.weight"] = (hv,)
        linear_shapes(shapes, f"{VIS}merger.mlp.0", merged, merged, True)
        linear_shapes(shapes, f"{VIS}merger.mlp.2", config_int(vision, {}, "out_hidden_size"), merged, True)
        text = text_config(raw)
        lm_shapes(shapes, text, text_fields(text, TEXT_DEFAULTS), HF_LM, runtime_experts=runtime_experts,
                  qk_norm=False, qkv_bias=True, o_bias=False)
        shapes[LM_HEAD] = (info.vocab, info.hidden)  # in the state dict also when tied
        return shapes

    def is_vision(self, name: str) -> bool:
        return name.startswith(VIS)

    def text_config(self, raw: dict) -> dict:
        return text_config(raw)

    def runtime_tensors(self, skeleton: Skeleton) -> list[RuntimeTensor]:
        """transformers 4.52+ / 5 hold ``model.visual.*`` and ``model.language_model.*`` (``lm_head`` stays)."""
        names = {}
        for name in skeleton.tensors:
            if self.is_vision(name):
                names[name] = "model." + name
            elif name.startswith(HF_LM):
                names[name] = "model.language_model." + name[len(HF_LM):]
        return renamed(skeleton, names)

    def canonical_name(self, name: str) -> str:
        for pattern, prefix in _RUNTIME_NAMES:
            if pattern.match(name):
                return pattern.sub(prefix, name, count=1)
        return name

    def megatron_params(self, skeleton: Skeleton, *, spec: str = "te", experts: str = "grouped",
                        padded_vocab: int | None = None) -> list[Param]:
        check_spec(spec, experts)
        mg = self.megatron_prefixes.language
        # the vision tower: the HF module under the same names, replicated
        out = [_whole(Src(n), skeleton.shape_in(n, "released"), n) for n in skeleton.tensors if self.is_vision(n)]
        out.append(embedding_param(skeleton, EMBED, mg, padded_vocab))
        for layer in range(skeleton.info.layers):
            out += decoder_layer_params(skeleton, layer, hf_lm=HF_LM, mg_lm=mg, spec=spec, experts=experts,
                                        qk_norm=False, qkv_bias=True)
        out += final_params(skeleton, f"{HF_LM}norm.weight", EMBED, LM_HEAD, mg, padded_vocab)
        return out

    def bridge_model_config(self, info: ModelInfo, *, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                            make_vocab_size_divisible_by: int = 128, hf_model_id: str | None = None,
                            consumer: str | None = None, **_: Any) -> dict:
        """Bridge 0.6.2's ``Qwen25VLModelProvider`` as ``Qwen25VLBridge.provider_bridge`` derives it: the language
        model's mapped fields (``text_config``, or the top-level fields transformers hands to it), QKV biases, the
        top-level tie flag and token ids, the HF vision config (Bridge keeps ``mrope_section`` at its default)."""
        bc.check_consumer(info.family, consumer)
        raw = info.raw
        nested = as_dict(raw.get("text_config"), "text_config")
        text = nested or {k: raw[k] for k in _TEXT_PARAMS if k in raw}
        dtype = bc.section_dtype(text, raw)  # a flat config's text part takes the top-level dtype
        view = bc.hf_view(text, BRIDGE_TEXT_DEFAULTS)
        vision = as_dict(raw.get("vision_config"), "vision_config")
        model: dict[str, Any] = {"_target_": PROVIDER,
                                 **bc.provider_kwargs(view, dtype, divisible_by=make_vocab_size_divisible_by)}
        model.update(normalization="RMSNorm", gated_linear_unit=True, add_qkv_bias=True, add_bias_linear=False,
                     hidden_dropout=0.0, rotary_base=bc.rope_theta(view),
                     share_embeddings_and_output_weights=bool(raw.get("tie_word_embeddings", False)),
                     position_embedding_type="mrope",
                     vision_config=bc.hf_config_ref(VISION_CONFIG, vision, bc.section_dtype(vision)),
                     bos_token_id=view.get("bos_token_id", 151643), eos_token_id=view.get("eos_token_id", 151645),
                     vision_start_token_id=raw.get("vision_start_token_id", 151652),
                     vision_end_token_id=raw.get("vision_end_token_id", 151653),
                     vision_token_id=raw.get("vision_token_id", 151654),
                     image_token_id=raw.get("image_token_id", 151655),
                     video_token_id=raw.get("video_token_id", 151656))
        return {**model, **bc.parallel_fields(tp=tp, pp=pp, ep=ep, etp=etp, hf_model_id=hf_model_id)}


FAMILY = Qwen25VLFamily()
