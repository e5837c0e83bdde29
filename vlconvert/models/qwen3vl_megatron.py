"""Qwen3-VL / Qwen3-VL-MoE <-> Megatron-Core names and split rules, as data: the family's parameter table.

Names follow Megatron-Bridge / mbridge: the language model under ``language_model.``, the ViT under
``vision_model.``. Each Megatron parameter is one :class:`~vlconvert.models.megatron_table.Param` (see
:mod:`vlconvert.models.megatron_table` for the row maps and split rules, :mod:`vlconvert.models.gpt_table`
for the language model's rows, shared with the other Qwen families).

The family-neutral machinery that used to live here (``Src``, ``Param``, ``RankTensor``, ``RankPlan``,
``MegatronPlan``, ``plan_megatron_ranks``, stage helpers...) is in :mod:`vlconvert.models.megatron_table`
and re-exported here under the old names.
"""

from __future__ import annotations

import re

from vlconvert import ops
from vlconvert.errors import UsageError, UserError
from vlconvert.models.gpt_table import decoder_layer_params, embedding_param, final_params
from vlconvert.models.gpt_table import is_moe_layer as _is_moe_layer
from vlconvert.models.megatron_table import (  # noqa: F401 - re-exported: the names callers import from here
    EXPERT_STYLES,
    SPECS,
    MegatronPlan,
    Param,
    RankPlan,
    RankTensor,
    Seg,
    Src,
    _as_skeleton,
    _dtype_for,
    _placement,
    _split,
    _stages_of,
    _whole,
    balanced_pp_split,
    canonical_tensors,
    check_coverage,
    config_bytes,
    layer_of,
    output_dtype,
    plan_megatron_ranks,
    propose_pp_split,
    source_shape,
    stage_bytes_inputs,
    stage_costs,
    stage_layer_counts,
)
from vlconvert.models.qwen3vl import EMBED, LM_HEAD, Skeleton

_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")
LM = "model.language_model."
VIS = "model.visual."
MLM = "language_model."
MVIS = "vision_model."


def is_moe_layer(skeleton: Skeleton, layer: int) -> bool:
    """True when HF layer ``layer`` has a sparse MoE block."""
    return _is_moe_layer(skeleton, LM, layer)


def megatron_params(skeleton: Skeleton, *, spec: str = "te", experts: str = "grouped",
                    padded_vocab: int | None = None) -> list[Param]:
    """Every Megatron parameter of the model in state-dict order, globally numbered, with its recipe."""
    if spec not in SPECS:
        raise UsageError(f"unknown --spec '{spec}': use one of {', '.join(SPECS)}")
    if experts not in EXPERT_STYLES:
        raise UsageError(f"unknown --experts '{experts}': use one of {', '.join(EXPERT_STYLES)}")
    info = skeleton.info
    if info.raw.get("text_config", {}).get("attention_bias"):
        raise UserError("attention_bias=True is not supported for Qwen3-VL Megatron conversion")
    shape = lambda n: skeleton.shape_in(n, "released")  # noqa: E731
    out: list[Param] = []
    out += _vision_params(skeleton, spec, shape)
    out.append(embedding_param(skeleton, EMBED, MLM, padded_vocab))
    for layer in range(info.layers):
        out += decoder_layer_params(skeleton, layer, hf_lm=LM, mg_lm=MLM, spec=spec, experts=experts)
    out += final_params(skeleton, f"{LM}norm.weight", EMBED, LM_HEAD, MLM, padded_vocab)
    return out


def _vision_params(skeleton: Skeleton, spec: str, shape) -> list[Param]:
    info = skeleton.info
    out: list[Param] = []
    for n in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed.weight"):
        out.append(_whole(Src(VIS + n), shape(VIS + n), MVIS + n))
    heads = info.vision_heads
    head_dim = info.vision_hidden // heads
    for b in range(info.vision_depth):
        hf = f"{VIS}blocks.{b}."
        mg = f"{MVIS}decoder.layers.{b}."
        norm1 = f"{mg}self_attention.linear_qkv.layer_norm_" if spec == "te" else f"{mg}input_layernorm."
        norm2 = f"{mg}mlp.linear_fc1.layer_norm_" if spec == "te" else f"{mg}pre_mlp_layernorm."
        for part in ("weight", "bias"):
            out.append(_whole(Src(f"{hf}norm1.{part}"), shape(f"{hf}norm1.{part}"), f"{norm1}{part}"))
            qkv = f"{hf}attn.qkv.{part}"
            rows = tuple((Src(qkv), a, z) for _, a, z in ops.vision_qkv_row_map(heads, head_dim))
            out.append(Param(f"{mg}self_attention.linear_qkv.{part}", shape(qkv), rows, "rows"))
        out.append(_whole(Src(f"{hf}attn.proj.weight"), shape(f"{hf}attn.proj.weight"),
                          f"{mg}self_attention.linear_proj.weight", "cols"))
        out.append(_whole(Src(f"{hf}attn.proj.bias"), shape(f"{hf}attn.proj.bias"),
                          f"{mg}self_attention.linear_proj.bias"))
        for part in ("weight", "bias"):
            out.append(_whole(Src(f"{hf}norm2.{part}"), shape(f"{hf}norm2.{part}"), f"{norm2}{part}"))
        out += _mlp_pair(f"{hf}mlp.", f"{mg}mlp.", shape)
    mergers = [(f"{VIS}merger.", f"{MVIS}merger.")]
    mergers += [(f"{VIS}deepstack_merger_list.{i}.", f"{MVIS}decoder.deepstack_merger_list.{i}.")
                for i in range(len(info.deepstack))]
    for hf, mg in mergers:
        for part in ("weight", "bias"):
            out.append(_whole(Src(f"{hf}norm.{part}"), shape(f"{hf}norm.{part}"), f"{mg}patch_norm.{part}"))
        out += _mlp_pair(hf, mg, shape)
    return out


def _mlp_pair(hf: str, mg: str, shape) -> list[Param]:
    """A plain (not gated) two-layer MLP with biases: fc1 column parallel, fc2 row parallel."""
    out = []
    for part in ("weight", "bias"):
        n = f"{hf}linear_fc1.{part}"
        out.append(_whole(Src(n), shape(n), f"{mg}linear_fc1.{part}", "rows"))
    n = f"{hf}linear_fc2.weight"
    out.append(_whole(Src(n), shape(n), f"{mg}linear_fc2.weight", "cols"))
    n = f"{hf}linear_fc2.bias"
    out.append(_whole(Src(n), shape(n), f"{mg}linear_fc2.bias"))
    return out
