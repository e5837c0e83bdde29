"""HF <-> Megatron-Core tables of a Qwen-style GPT language model, shared by the families that have one.

A family calls these with its HF language-model prefix (``model.language_model.`` in the VL models,
``model.`` in the text models) and its Megatron one (``language_model.`` in Megatron-Bridge's VL models,
``""`` in Megatron-LM's GPTModel). Facts (Megatron-Core names, QKV interleave, gate/up fusion, splits) are
in ``reference/megatron-layout.md``.

Spec ``te``: input norms fused into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``
(TELayerNormColumnParallelLinear). Spec ``local``: separate ``input_layernorm`` / ``pre_mlp_layernorm``
(legacy ``.pt`` state dicts keep module names). MoE layers always use ``pre_mlp_layernorm``.
Experts ``grouped``: TEGroupedMLP ``experts.linear_fc1.weight{i}``; ``sequential``: SequentialMLP
``experts.local_experts.{i}.linear_fc1.weight``. Experts are read either from fused 3-D tensors
(``mlp.experts.gate_up_proj`` / ``down_proj``, one :class:`Src` per expert) or from per-expert 2-D tensors
(``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``).
"""

from __future__ import annotations

from collections.abc import Callable

from vlconvert import ops
from vlconvert.models.base import Skeleton
from vlconvert.models.megatron_table import Param, Src, _whole

ShapeOf = Callable[[str], tuple[int, ...]]


def released_shape(skeleton: Skeleton) -> ShapeOf:
    """Shape of a canonical tensor with fused experts in the released orientation."""
    return lambda name: skeleton.shape_in(name, "released")


def is_moe_layer(skeleton: Skeleton, hf_lm: str, layer: int) -> bool:
    """True when HF layer ``layer`` (under ``hf_lm``) has a sparse MoE block (a router)."""
    return f"{hf_lm}layers.{layer}.mlp.gate.weight" in skeleton.tensors


def _vocab_rows(src: str, vocab: int, padded: int) -> tuple[tuple[Src | None, int, int], ...]:
    return ((Src(src), 0, vocab),) + (((None, vocab, padded),) if padded > vocab else ())


def embedding_param(skeleton: Skeleton, embed: str, mg_lm: str, padded_vocab: int | None) -> Param:
    """``embedding.word_embeddings.weight``: the HF embedding, zero rows up to the padded vocabulary."""
    vocab, hidden = skeleton.shape_in(embed, "released")
    padded = padded_vocab or vocab
    return Param(f"{mg_lm}embedding.word_embeddings.weight", (padded, hidden), _vocab_rows(embed, vocab, padded),
                 "rows", stage="first")


def final_params(skeleton: Skeleton, norm: str, embed: str, output: str, mg_lm: str,
                 padded_vocab: int | None) -> list[Param]:
    """The final norm and the output layer (a copy of the embedding when tied)."""
    vocab, hidden = skeleton.shape_in(embed, "released")
    padded = padded_vocab or vocab
    head = embed if skeleton.info.tied else output
    # Tied: the output layer exists only on a last stage that is not also the first (PP > 1); the
    # planner drops it otherwise. It is a copy of the word embeddings.
    return [_whole(Src(norm), skeleton.shape_in(norm, "released"), f"{mg_lm}decoder.final_layernorm.weight",
                   stage="last"),
            Param(f"{mg_lm}output_layer.weight", (padded, hidden), _vocab_rows(head, vocab, padded), "rows",
                  stage="last")]


def decoder_layer_params(skeleton: Skeleton, layer: int, *, hf_lm: str, mg_lm: str, spec: str, experts: str,
                         qk_norm: bool = True, qkv_bias: bool = False) -> list[Param]:
    """One decoder layer: attention (fused QKV, optional biases and q/k norms), then a gated MLP or a MoE
    block (router + routed experts, fused or per-expert)."""
    info = skeleton.info
    shape = released_shape(skeleton)
    hf = f"{hf_lm}layers.{layer}."
    mg = f"{mg_lm}decoder.layers.{{layer}}."
    kw = {"stage": "layer", "layer": layer}
    out: list[Param] = []
    norm1 = f"{mg}self_attention.linear_qkv.layer_norm_weight" if spec == "te" else f"{mg}input_layernorm.weight"
    out.append(_whole(Src(f"{hf}input_layernorm.weight"), shape(f"{hf}input_layernorm.weight"), norm1, **kw))
    qkv_map = ops.qkv_row_map(info.heads, info.kv_heads, info.head_dim)
    tags = {t: Src(f"{hf}self_attn.{t}_proj.weight") for t in "qkv"}
    rows = tuple((tags[t], a, z) for t, a, z in qkv_map)
    out.append(Param(f"{mg}self_attention.linear_qkv.weight", (ops.total_rows(rows), info.hidden), rows, "rows",
                     **kw))
    if qkv_bias:
        tags = {t: Src(f"{hf}self_attn.{t}_proj.bias") for t in "qkv"}
        rows = tuple((tags[t], a, z) for t, a, z in qkv_map)
        out.append(Param(f"{mg}self_attention.linear_qkv.bias", (ops.total_rows(rows),), rows, "rows", **kw))
    if qk_norm:
        out.append(_whole(Src(f"{hf}self_attn.q_norm.weight"), shape(f"{hf}self_attn.q_norm.weight"),
                          f"{mg}self_attention.q_layernorm.weight", **kw))
        out.append(_whole(Src(f"{hf}self_attn.k_norm.weight"), shape(f"{hf}self_attn.k_norm.weight"),
                          f"{mg}self_attention.k_layernorm.weight", **kw))
    out.append(_whole(Src(f"{hf}self_attn.o_proj.weight"), shape(f"{hf}self_attn.o_proj.weight"),
                      f"{mg}self_attention.linear_proj.weight", "cols", **kw))
    post = f"{hf}post_attention_layernorm.weight"
    if is_moe_layer(skeleton, hf_lm, layer):
        out.append(_whole(Src(post), shape(post), f"{mg}pre_mlp_layernorm.weight", **kw))
        out.append(_whole(Src(f"{hf}mlp.gate.weight"), shape(f"{hf}mlp.gate.weight"), f"{mg}mlp.router.weight", **kw))
        out += _expert_params(skeleton, hf, mg, experts, kw)
    else:
        norm2 = f"{mg}mlp.linear_fc1.layer_norm_weight" if spec == "te" else f"{mg}pre_mlp_layernorm.weight"
        out.append(_whole(Src(post), shape(post), norm2, **kw))
        gate, up = f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"
        inter, hidden = shape(gate)
        out.append(Param(f"{mg}mlp.linear_fc1.weight", (2 * inter, hidden),
                         ((Src(gate), 0, inter), (Src(up), 0, inter)), "halves", **kw))
        down = f"{hf}mlp.down_proj.weight"
        out.append(_whole(Src(down), shape(down), f"{mg}mlp.linear_fc2.weight", "cols", **kw))
    return out


def _expert_params(skeleton: Skeleton, hf: str, mg: str, experts: str, kw: dict) -> list[Param]:
    """fc1 (gate and up halves, each TP-chunked) and fc2 (row parallel) of every routed expert, in expert
    order, in the expert-TP group."""
    if experts == "grouped":
        fc1, fc2 = f"{mg}mlp.experts.linear_fc1.weight{{expert}}", f"{mg}mlp.experts.linear_fc2.weight{{expert}}"
    else:
        fc1 = f"{mg}mlp.experts.local_experts.{{expert}}.linear_fc1.weight"
        fc2 = f"{mg}mlp.experts.local_experts.{{expert}}.linear_fc2.weight"
    out: list[Param] = []
    fused = f"{hf}mlp.experts.gate_up_proj"
    if fused in skeleton.tensors:  # one 3-D tensor per projection, Src(name, e) = expert e as [out, in]
        down = f"{hf}mlp.experts.down_proj"
        n_exp, hidden, two_i = skeleton.shape_in(fused, "released")
        inter = two_i // 2
        for e in range(n_exp):
            src = Src(fused, e)
            out.append(Param(fc1, (two_i, hidden), ((src, 0, inter), (src, inter, two_i)), "halves",
                             group="etp", expert=e, **kw))
            out.append(Param(fc2, (hidden, inter), ((Src(down, e), 0, hidden),), "cols", group="etp", expert=e,
                             **kw))
        return out
    for e in range(skeleton.info.experts):  # per-expert 2-D tensors
        gate, up = Src(f"{hf}mlp.experts.{e}.gate_proj.weight"), Src(f"{hf}mlp.experts.{e}.up_proj.weight")
        down = f"{hf}mlp.experts.{e}.down_proj.weight"
        inter, hidden = skeleton.shape_in(gate.hf, "released")
        out.append(Param(fc1, (2 * inter, hidden), ((gate, 0, inter), (up, 0, inter)), "halves", group="etp",
                         expert=e, **kw))
        out.append(Param(fc2, (hidden, inter), ((Src(down), 0, hidden),), "cols", group="etp", expert=e, **kw))
    return out
