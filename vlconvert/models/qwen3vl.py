"""Qwen3-VL (dense) and Qwen3-VL-MoE: config reading, the skeleton (every key, shape and dtype), expert orientation.

The skeleton is computed from config.json in pure Python, mirroring transformers' modules, so no
command pays for importing transformers' model code; ``tests/test_skeleton.py`` checks it against a
model built by the installed transformers on the meta device (:func:`_skeleton_from_transformers`).

Key names are the transformers module names, which are also the names on disk in released
checkpoints (``model.language_model.*``, ``model.visual.*``, ``lm_head.weight``). The only on-disk
difference between transformers versions is the orientation of the fused MoE experts:

* released (transformers 4.57 and the hub files): ``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]
* transformers 5 run time and its ``save_pretrained``: ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]

In both, the gate is the first half of the 2I axis.

:data:`FAMILY` is this module's :class:`~vlconvert.models.family.Family` (the registry lists it); the HF <->
Megatron table is :mod:`vlconvert.models.qwen3vl_megatron`. The family-neutral types (``ModelInfo``,
``Skeleton``...) live in :mod:`vlconvert.models.base` and are re-exported here.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata  # noqa: F401 - tests patch importlib.metadata.version through this module
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlconvert.dtypes import BFLOAT16, parse_dtype
from vlconvert.errors import UserError
from vlconvert.lazy import torch
from vlconvert.models.base import (  # noqa: F401 - re-exported: the names callers import from here
    EXPERT_LAYOUTS,
    ModelInfo,
    Skeleton,
    TensorSpec,
    _major_version,
    convert_expert,
    expert_layout_of,
    layer_norm_shapes,
    linear_shapes,
    read_config_json,
    runtime_experts_layout,
)
from vlconvert.models.base import config_int as _int
from vlconvert.models.family import Family, MegatronPrefixes

if TYPE_CHECKING:
    from vlconvert.models.megatron_table import Param

EXPERT_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
LM_HEAD = "lm_head.weight"
EMBED = "model.language_model.embed_tokens.weight"
FAMILIES = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}


# Sane upper bounds for the sizes a config names (the largest released Qwen3-VL is far below each): a
# hostile or mistyped config.json (num_hidden_layers: 1e12) is refused here, before any plan or skeleton
# allocates per layer, per expert or per row. Bounds are checked against the tensors later (shape checks).
SIZE_BOUNDS = {
    "text_config": {"num_hidden_layers": 2**12, "hidden_size": 2**17, "intermediate_size": 2**20,
                    "moe_intermediate_size": 2**20, "vocab_size": 2**23, "num_experts": 2**14,
                    "num_local_experts": 2**14, "num_experts_per_tok": 2**14, "num_attention_heads": 2**12,
                    "num_key_value_heads": 2**12, "head_dim": 2**14},
    "vision_config": {"depth": 2**10, "hidden_size": 2**16, "intermediate_size": 2**18, "num_heads": 2**12,
                      "out_hidden_size": 2**17, "num_position_embeddings": 2**24, "patch_size": 2**10,
                      "spatial_merge_size": 2**6, "temporal_patch_size": 2**6, "in_channels": 2**6},
}


def _check_sizes(text: dict, vision: dict) -> None:
    """Refuse sizes beyond :data:`SIZE_BOUNDS` (one line naming the field) before anything is allocated."""
    for key, section in (("text_config", text), ("vision_config", vision)):
        for name, bound in SIZE_BOUNDS[key].items():
            value = section.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not value <= bound:
                shown = value if isinstance(value, int) and value < 10**30 else f"{float(value):.3g}"
                raise UserError(f"config field '{key}.{name}' is {shown}, more than any model vlconvert can "
                                f"convert ({bound:,} at most): is config.json corrupt?")


def load_config(path_or_dict: str | Path | dict) -> ModelInfo:
    """Read a Qwen3-VL / Qwen3-VL-MoE config.json (4.57 or 5.x style) into :class:`ModelInfo`."""
    raw = path_or_dict if isinstance(path_or_dict, dict) else read_config_json(path_or_dict)
    family = raw.get("model_type")
    if family is None:
        raise UserError("the config has no model_type: is it a Qwen3-VL config.json?")
    if family not in FAMILIES:
        raise UserError(f"model_type '{family}' is not supported: vlconvert handles {', '.join(FAMILIES)}")
    text = raw.get("text_config") or {}
    vision = raw.get("vision_config") or {}
    for key, section in (("text_config", text), ("vision_config", vision)):
        if not isinstance(section, dict):
            raise UserError(f"the config's {key} is a {type(section).__name__}, not an object")
    _check_sizes(text, vision)
    try:
        experts = int(text.get("num_experts", text.get("num_local_experts", 0)) or 0) if family == "qwen3_vl_moe" else 0
        dtype_text = raw.get("dtype") or raw.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
        return ModelInfo(
            family=family,
            tied=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            hidden=int(text["hidden_size"]), layers=int(text["num_hidden_layers"]),
            heads=int(text["num_attention_heads"]), kv_heads=int(text["num_key_value_heads"]),
            head_dim=int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]),
            vocab=int(text["vocab_size"]), intermediate=int(text.get("intermediate_size", 0)),
            experts=experts, experts_per_token=int(text.get("num_experts_per_tok", 0) or 0),
            moe_intermediate=int(text.get("moe_intermediate_size", 0) or 0),
            vision_depth=int(vision["depth"]), vision_hidden=int(vision["hidden_size"]),
            vision_heads=int(vision["num_heads"]), vision_intermediate=int(vision["intermediate_size"]),
            deepstack=tuple(vision.get("deepstack_visual_indexes", ())),
            dtype=parse_dtype(dtype_text) if isinstance(dtype_text, str) else None,
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"config is missing or has a bad value for {exc}") from exc


def is_expert(name: str) -> bool:
    """True for the fused 3-D MoE expert tensors."""
    return name.endswith(EXPERT_SUFFIXES)


# Class defaults of transformers' Qwen3-VL configs (5.x), used where config.json leaves a field out.
_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "in_channels": 3,
    "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 3584,
    "num_position_embeddings": 2304, "deepstack_visual_indexes": (8, 16, 24),
}
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_vl": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "attention_bias": False},
    "qwen3_vl_moe": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": None, "attention_bias": False,
                     "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "num_experts": 60,
                     "mlp_only_layers": None},
}


def _skeleton_shapes(raw: dict, runtime_experts: str) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the transformers ``*ForConditionalGeneration`` model and its shape, in the
    model's registration order (vision tower, language model, ``lm_head``), computed from config.json alone.

    Mirrors transformers' Qwen3-VL / Qwen3-VL-MoE modules; ``tests/test_skeleton.py`` checks it against a
    model built by the installed transformers.
    """
    family = raw.get("model_type")
    vision = {**_VISION_DEFAULTS, **(raw.get("vision_config") or {})}
    text_defaults = _TEXT_DEFAULTS[family]
    text = dict(raw.get("text_config") or {})
    if family == "qwen3_vl_moe" and "num_local_experts" in text:  # transformers maps num_experts onto it
        text["num_experts"] = text["num_local_experts"]
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_out: int, n_in: int, bias: bool) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def layer_norm(name: str, dim: int) -> None:
        shapes[f"{name}.weight"] = (dim,)
        shapes[f"{name}.bias"] = (dim,)

    # vision tower: model.visual.*
    hv, iv = _int(vision, {}, "hidden_size"), _int(vision, {}, "intermediate_size")
    patch, temporal = _int(vision, {}, "patch_size"), _int(vision, {}, "temporal_patch_size")
    merged = hv * _int(vision, {}, "spatial_merge_size") ** 2
    out = _int(vision, {}, "out_hidden_size")
    shapes["model.visual.patch_embed.proj.weight"] = (hv, _int(vision, {}, "in_channels"), temporal, patch, patch)
    shapes["model.visual.patch_embed.proj.bias"] = (hv,)
    shapes["model.visual.pos_embed.weight"] = (_int(vision, {}, "num_position_embeddings"), hv)
    for j in range(_int(vision, {}, "depth")):
        block = f"model.visual.blocks.{j}"
        layer_norm(f"{block}.norm1", hv)
        layer_norm(f"{block}.norm2", hv)
        linear(f"{block}.attn.qkv", 3 * hv, hv, True)
        linear(f"{block}.attn.proj", hv, hv, True)
        linear(f"{block}.mlp.linear_fc1", iv, hv, True)
        linear(f"{block}.mlp.linear_fc2", hv, iv, True)
    mergers = [("model.visual.merger", hv)]
    mergers += [(f"model.visual.deepstack_merger_list.{k}", merged)
                for k in range(len(vision["deepstack_visual_indexes"]))]
    for prefix, norm_dim in mergers:  # the main merger norms before the 2x2 shuffle, deepstack ones after
        layer_norm(f"{prefix}.norm", norm_dim)
        linear(f"{prefix}.linear_fc1", merged, merged, True)
        linear(f"{prefix}.linear_fc2", out, merged, True)

    # language model: model.language_model.*
    h, vocab = _int(text, text_defaults, "hidden_size"), _int(text, text_defaults, "vocab_size")
    heads = _int(text, text_defaults, "num_attention_heads")
    kv_heads = text.get("num_key_value_heads", text_defaults["num_key_value_heads"])
    kv_heads = heads if kv_heads is None else _int({"num_key_value_heads": kv_heads}, {}, "num_key_value_heads")
    head_dim = text.get("head_dim", text_defaults["head_dim"])
    head_dim = _int({"head_dim": head_dim}, {}, "head_dim") if head_dim else h // heads
    bias = bool(text.get("attention_bias", text_defaults["attention_bias"]))
    inter = _int(text, text_defaults, "intermediate_size")
    experts = _int(text, text_defaults, "num_experts") if family == "qwen3_vl_moe" else 0
    if experts > 0:
        moe_inter = _int(text, text_defaults, "moe_intermediate_size")
        sparse_step = _int(text, text_defaults, "decoder_sparse_step")
        mlp_only = set(text.get("mlp_only_layers") or ())
        if runtime_experts == "transformers5":
            experts_shapes = {"gate_up_proj": (experts, 2 * moe_inter, h), "down_proj": (experts, h, moe_inter)}
        else:
            experts_shapes = {"gate_up_proj": (experts, h, 2 * moe_inter), "down_proj": (experts, moe_inter, h)}
    shapes["model.language_model.embed_tokens.weight"] = (vocab, h)
    for i in range(_int(text, text_defaults, "num_hidden_layers")):
        layer = f"model.language_model.layers.{i}"
        linear(f"{layer}.self_attn.q_proj", heads * head_dim, h, bias)
        linear(f"{layer}.self_attn.k_proj", kv_heads * head_dim, h, bias)
        linear(f"{layer}.self_attn.v_proj", kv_heads * head_dim, h, bias)
        linear(f"{layer}.self_attn.o_proj", h, heads * head_dim, bias)
        shapes[f"{layer}.self_attn.q_norm.weight"] = (head_dim,)
        shapes[f"{layer}.self_attn.k_norm.weight"] = (head_dim,)
        if experts > 0 and i not in mlp_only and (i + 1) % sparse_step == 0:
            if runtime_experts != "transformers5":  # transformers 4.x registers the router first
                shapes[f"{layer}.mlp.gate.weight"] = (experts, h)
            for proj, shape in experts_shapes.items():
                shapes[f"{layer}.mlp.experts.{proj}"] = shape
            if runtime_experts == "transformers5":
                shapes[f"{layer}.mlp.gate.weight"] = (experts, h)
        else:
            linear(f"{layer}.mlp.gate_proj", inter, h, False)
            linear(f"{layer}.mlp.up_proj", inter, h, False)
            linear(f"{layer}.mlp.down_proj", h, inter, False)
        shapes[f"{layer}.input_layernorm.weight"] = (h,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (h,)
    shapes["model.language_model.norm.weight"] = (h,)
    shapes[LM_HEAD] = (vocab, h)  # in the state dict also when tied
    return shapes


def build_skeleton(config: str | Path | dict | ModelInfo) -> Skeleton:
    """Every key, shape and dtype of the model, from its config alone (pure Python: no model is built)."""
    info = config if isinstance(config, ModelInfo) else load_config(config)
    return FAMILY.build_skeleton(info)


def _meta_model(raw: dict) -> Any:
    """The installed transformers' model for ``raw`` (a config.json dict), built on the meta device."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.for_model(**copy.deepcopy(raw))
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(cfg)


def _skeleton_from_transformers(config: str | Path | dict | ModelInfo) -> Skeleton:
    """Reference for :func:`build_skeleton`: build the model with transformers on the meta device (slow:
    imports the model code) and read its state dict. Used by the tests."""
    info = config if isinstance(config, ModelInfo) else load_config(config)
    try:
        model = _meta_model(info.raw)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad config
        raise UserError(f"transformers cannot build a {info.family} model from this config: {exc}") from exc
    dtype = info.dtype or BFLOAT16
    tensors = {name: TensorSpec(tuple(t.shape), dtype) for name, t in model.state_dict().items()}
    return Skeleton(info=info, tensors=tensors, runtime_experts=measured_runtime_experts_layout())


@functools.lru_cache(maxsize=1)
def measured_runtime_experts_layout() -> str:
    """Which expert orientation the installed transformers holds in memory, found by building a tiny
    meta-device MoE model (imports transformers' model code: seconds; ``vlconvert doctor`` uses it)."""
    raw = {"model_type": "qwen3_vl_moe", "tie_word_embeddings": False,
           "text_config": {"hidden_size": 8, "intermediate_size": 8, "moe_intermediate_size": 2,
                           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                           "head_dim": 4, "vocab_size": 16, "num_experts": 2, "num_experts_per_tok": 1,
                           "rope_scaling": {"mrope_section": [1, 0, 1], "rope_type": "default",
                                            "mrope_interleaved": True}},
           "vision_config": {"depth": 1, "hidden_size": 8, "intermediate_size": 8, "num_heads": 2,
                             "out_hidden_size": 8, "num_position_embeddings": 4,
                             "deepstack_visual_indexes": []}}
    shape = _meta_model(raw).state_dict()["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape
    return "transformers5" if tuple(shape) == (2, 4, 8) else "released"


_LM_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")

# The six released sizes (reference/qwen3vl-hf.md §1.2-1.3): the dims that tell them apart.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "Qwen3-VL-2B": dict(family="qwen3_vl", hidden=2048, layers=28, heads=16, kv_heads=8, intermediate=6144,
                        experts=0, moe_intermediate=0, vision_depth=24, vision_hidden=1024, tied=True),
    "Qwen3-VL-4B": dict(family="qwen3_vl", hidden=2560, layers=36, heads=32, kv_heads=8, intermediate=9728,
                        experts=0, moe_intermediate=0, vision_depth=24, vision_hidden=1024, tied=True),
    "Qwen3-VL-8B": dict(family="qwen3_vl", hidden=4096, layers=36, heads=32, kv_heads=8, intermediate=12288,
                        experts=0, moe_intermediate=0, vision_depth=27, vision_hidden=1152, tied=False),
    "Qwen3-VL-32B": dict(family="qwen3_vl", hidden=5120, layers=64, heads=64, kv_heads=8, intermediate=25600,
                         experts=0, moe_intermediate=0, vision_depth=27, vision_hidden=1152, tied=False),
    "Qwen3-VL-30B-A3B": dict(family="qwen3_vl_moe", hidden=2048, layers=48, heads=32, kv_heads=4,
                             intermediate=6144, experts=128, moe_intermediate=768, vision_depth=27,
                             vision_hidden=1152, tied=False),
    "Qwen3-VL-235B-A22B": dict(family="qwen3_vl_moe", hidden=4096, layers=94, heads=64, kv_heads=4,
                               intermediate=12288, experts=128, moe_intermediate=1536, vision_depth=27,
                               vision_hidden=1152, tied=False),
}


class Qwen3VLFamily(Family):
    """Qwen3-VL dense and MoE: fused 3-D experts, a TP-split Megatron-Core ViT with deepstack mergers."""

    name = "qwen3_vl"
    model_types = tuple(FAMILIES)
    architectures = tuple(FAMILIES.values())
    megatron_prefixes = MegatronPrefixes(language="language_model.", vision="vision_model.")
    embed = EMBED
    output = LM_HEAD
    expert_storage = "fused"
    vision_tensor_parallel = True
    layer_pattern = _LM_LAYER
    hf_vision_prefix = "model.visual."
    transposed_experts = True
    known_sizes = KNOWN_MODELS

    def load_config(self, raw: dict) -> ModelInfo:
        return load_config(raw)

    def skeleton_shapes(self, info: ModelInfo, runtime_experts: str) -> dict[str, tuple[int, ...]]:
        return _skeleton_shapes(info.raw, runtime_experts)

    def is_expert(self, name: str) -> bool:
        return is_expert(name)

    def is_vision(self, name: str) -> bool:
        return name.startswith("model.visual.")

    def megatron_params(self, skeleton: Skeleton, *, spec: str = "te", experts: str = "grouped",
                        padded_vocab: int | None = None) -> list[Param]:
        from vlconvert.models.qwen3vl_megatron import megatron_params

        return megatron_params(skeleton, spec=spec, experts=experts, padded_vocab=padded_vocab)

    def measured_runtime_experts_layout(self) -> str:
        return measured_runtime_experts_layout()

    def bridge_model_config(self, info: ModelInfo, **sizes: Any) -> dict:
        from vlconvert.models.qwen3vl_consumers import bridge_model_config

        return bridge_model_config(info, **sizes)

    def megatron_lm_args(self, info: ModelInfo, **sizes: Any) -> dict:
        from vlconvert.models.qwen3vl_consumers import megatron_lm_args

        return megatron_lm_args(info, **sizes)


FAMILY = Qwen3VLFamily()
