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
from vlconvert.dtypes import BFLOAT16, FLOAT16, FLOAT32, DType
from vlconvert.models.base import ModelInfo, Skeleton
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


def megatron_lm_args(info: ModelInfo, text: dict, *, qk_norm: bool, qkv_bias: bool, tp: int, pp: int, ep: int,
                     etp: int | None, padded_vocab: int,
                     make_vocab_size_divisible_by: int, dtype: DType | None, iteration: int) -> dict:
    """The fields of Megatron-LM's ``args`` for a Qwen GPT language model (``text``: its config section;
    ``pretrain_gpt.py`` flags),
    including those Megatron-LM's ``load_args_from_checkpoint`` / ``check_checkpoint_args`` and
    Megatron-Bridge's ``mlm_compat`` reader take from a checkpoint."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope = rope if isinstance(rope, dict) else {}
    dtype = dtype or info.dtype or FLOAT32
    moe = info.is_moe
    # transformers' rule for which layers are sparse; dense layers among them (mlp_only_layers, a sparse step)
    # make megatron-core key the checkpoint per layer and size those MLPs by ffn_hidden_size: say both
    mlp_only, step = set(text.get("mlp_only_layers") or ()), int(text.get("decoder_sparse_step") or 1)
    pattern = [int(moe and i not in mlp_only and (i + 1) % step == 0) for i in range(info.layers)]
    mixed = moe and not all(pattern)
    return dict(
        num_layers=info.layers, hidden_size=info.hidden,
        ffn_hidden_size=info.moe_intermediate if moe and not mixed else info.intermediate,
        num_attention_heads=info.heads,
        num_query_groups=info.kv_heads, group_query_attention=info.kv_heads != info.heads,
        kv_channels=info.head_dim, max_position_embeddings=text.get("max_position_embeddings", 4096),
        seq_length=text.get("max_position_embeddings", 4096), position_embedding_type="rope",
        add_position_embedding=False, use_rotary_position_embeddings=True,
        rotary_base=rope.get("rope_theta", text.get("rope_theta", 10000)), rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=False, add_bias_linear=False, add_qkv_bias=qkv_bias or bool(text.get("attention_bias")),
        swiglu=True,
        squared_relu=False, bias_swiglu_fusion=False, bias_gelu_fusion=False,
        untie_embeddings_and_output_weights=not info.tied, apply_layernorm_1p=False, normalization="RMSNorm",
        norm_epsilon=text.get("rms_norm_eps", 1e-6), qk_layernorm=qk_norm, qk_l2_norm=False,
        attention_dropout=0.0, hidden_dropout=0.0,
        num_experts=info.experts if moe else None, moe_ffn_hidden_size=info.moe_intermediate if moe else None,
        moe_router_topk=info.experts_per_token if moe else 2, moe_grouped_gemm=moe,
        moe_layer_freq=pattern if mixed else 1,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3 if moe else 0.0,
        vocab_size=info.vocab, padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=None,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp or tp, virtual_pipeline_model_parallel_size=None,
        decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None, world_size=tp * pp,
        data_parallel_size=1, params_dtype=dtype, bf16=dtype == BFLOAT16, fp16=dtype == FLOAT16,
        fp16_lm_cross_entropy=False, ckpt_format="torch_dist", use_dist_ckpt=True, no_save_optim=True,
        no_save_rng=True, async_save=False, iteration=iteration, consumed_train_samples=0, consumed_valid_samples=0,
        transformer_impl="transformer_engine", multi_latent_attention=False, heterogeneous_layers_config_path=None,
        no_persist_layer_norm=True, overlap_p2p_comm=False, fp8_param_gather=False, init_method_xavier_uniform=False,
        init_method_std=text.get("initializer_range", 0.02), config_logger_dir="", cp_comm_type=["p2p"],
        is_hybrid_model=False, hybrid_layer_pattern=None, mtp_num_layers=None, init_model_with_meta_device=False,
        context_parallel_size=1, sequence_parallel=False, ckpt_fully_parallel_save=True)
