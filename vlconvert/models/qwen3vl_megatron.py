"""Qwen3-VL / Qwen3-VL-MoE <-> Megatron-Core names and split rules, as data.

Names follow Megatron-Bridge / mbridge: the language model under ``language_model.``, the ViT under
``vision_model.``. Each Megatron parameter is one :class:`Param`: its global name (global layer and
expert numbers; :mod:`vlconvert.megatron_convert` renumbers them per rank), its full (unsplit) shape,
the rows it is made of (a row map over HF source matrices) and how tensor parallelism splits it.

Source matrices (:class:`Src`) are HF tensors in HF orientation, except experts: ``Src(name, e)`` is
expert ``e`` of a fused expert tensor seen in Megatron orientation ``[out, in]`` (``gate_up`` -> [2I, H],
``down`` -> [H, I]), whatever orientation the file stores.

Spec ``te``: input norms fused into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``
(TELayerNormColumnParallelLinear). Spec ``local``: separate ``input_layernorm`` / ``pre_mlp_layernorm``
(legacy ``.pt`` state dicts keep module names). MoE layers always use ``pre_mlp_layernorm``.
Experts ``grouped``: TEGroupedMLP ``experts.linear_fc1.weight{i}``; ``sequential``: SequentialMLP
``experts.local_experts.{i}.linear_fc1.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlconvert import ops
from vlconvert.errors import UserError
from vlconvert.models.qwen3vl import EMBED, LM_HEAD, Skeleton

SPECS = ("te", "local")
EXPERT_STYLES = ("grouped", "sequential")
LM = "model.language_model."
VIS = "model.visual."
MLM = "language_model."
MVIS = "vision_model."


@dataclass(frozen=True)
class Src:
    """A source matrix: a whole HF tensor, or expert ``expert`` of a fused expert tensor ([out, in])."""

    hf: str
    expert: int | None = None

    def __str__(self) -> str:
        return self.hf if self.expert is None else f"{self.hf}[{self.expert}]"


@dataclass(frozen=True)
class Param:
    """One Megatron parameter, globally numbered, and how to build it from HF source matrices.

    ``rows``: the full tensor's dim-0 rows as ``(Src | None, start, stop)``; ``None`` = zero rows
    (vocab padding). ``split``: ``none`` (replicated), ``rows`` (column parallel / vocab: chunk of
    ``rows``), ``halves`` (gated fc1: each half of ``rows`` chunked separately), ``cols`` (row parallel:
    chunk of dim 1 of the single source). ``group``: ``tp`` or ``etp`` (expert tensor parallel).
    ``stage``: ``first`` (ViT, embedding), ``last`` (final norm, output layer) or ``layer``.
    """

    name: str  # global name; layer/expert numbers are placeholders {layer} and {expert}
    shape: tuple[int, ...]
    rows: tuple[tuple[Src | None, int, int], ...]
    split: str
    group: str = "tp"
    stage: str = "first"
    layer: int | None = None
    expert: int | None = None

    def local_name(self, layer: int | None = None, expert: int | None = None) -> str:
        """The name inside a rank file (local layer and expert numbers)."""
        return self.name.format(layer=layer, expert=expert)

    def sources(self) -> list[Src]:
        """Every source matrix this parameter reads."""
        seen: dict[Src, None] = {}
        for src, _, _ in self.rows:
            if src is not None:
                seen[src] = None
        return list(seen)


def _whole(src: Src, shape: tuple[int, ...], name: str, split: str = "none", **kw) -> Param:
    return Param(name, shape, ((src, 0, shape[0]),), split, **kw)


def source_shape(skeleton: Skeleton, src: Src) -> tuple[int, ...]:
    """Shape of a source matrix (experts: one expert, Megatron orientation)."""
    shape = skeleton.shape_in(src.hf, "released")
    if src.expert is None:
        return shape
    return (shape[2], shape[1])  # released [E, H, 2I] -> [2I, H]; [E, I, H] -> [H, I]


def is_moe_layer(skeleton: Skeleton, layer: int) -> bool:
    """True when HF layer ``layer`` has a sparse MoE block."""
    return f"{LM}layers.{layer}.mlp.gate.weight" in skeleton.tensors


def megatron_params(skeleton: Skeleton, *, spec: str = "te", experts: str = "grouped",
                    padded_vocab: int | None = None) -> list[Param]:
    """Every Megatron parameter of the model in state-dict order, globally numbered, with its recipe."""
    if spec not in SPECS:
        raise UserError(f"unknown --spec '{spec}': use one of {', '.join(SPECS)}")
    if experts not in EXPERT_STYLES:
        raise UserError(f"unknown --experts '{experts}': use one of {', '.join(EXPERT_STYLES)}")
    info = skeleton.info
    if info.raw.get("text_config", {}).get("attention_bias"):
        raise UserError("attention_bias=True is not supported for Qwen3-VL Megatron conversion")
    shape = lambda n: skeleton.shape_in(n, "released")  # noqa: E731
    out: list[Param] = []
    out += _vision_params(skeleton, spec, shape)
    vocab = shape(EMBED)[0]
    vp = padded_vocab or vocab
    hidden = info.hidden
    vocab_rows = ((Src(EMBED), 0, vocab),) + (((None, vocab, vp),) if vp > vocab else ())
    out.append(Param(f"{MLM}embedding.word_embeddings.weight", (vp, hidden), vocab_rows, "rows", stage="first"))
    for layer in range(info.layers):
        out += _lm_layer_params(skeleton, layer, spec, experts, shape)
    out.append(_whole(Src(f"{LM}norm.weight"), shape(f"{LM}norm.weight"),
                      f"{MLM}decoder.final_layernorm.weight", stage="last"))
    head = EMBED if info.tied else LM_HEAD
    head_rows = ((Src(head), 0, vocab),) + (((None, vocab, vp),) if vp > vocab else ())
    # Tied: the output layer exists only on a last stage that is not also the first (PP > 1); the
    # planner drops it otherwise. It is a copy of the word embeddings.
    out.append(Param(f"{MLM}output_layer.weight", (vp, hidden), head_rows, "rows", stage="last"))
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


def _lm_layer_params(skeleton: Skeleton, layer: int, spec: str, experts: str, shape) -> list[Param]:
    info = skeleton.info
    hf = f"{LM}layers.{layer}."
    mg = f"{MLM}decoder.layers.{{layer}}."
    kw = {"stage": "layer", "layer": layer}
    out: list[Param] = []
    norm1 = f"{mg}self_attention.linear_qkv.layer_norm_weight" if spec == "te" else f"{mg}input_layernorm.weight"
    out.append(_whole(Src(f"{hf}input_layernorm.weight"), shape(f"{hf}input_layernorm.weight"), norm1, **kw))
    tags = {t: Src(f"{hf}self_attn.{t}_proj.weight") for t in "qkv"}
    rows = tuple((tags[t], a, z) for t, a, z in ops.qkv_row_map(info.heads, info.kv_heads, info.head_dim))
    out.append(Param(f"{mg}self_attention.linear_qkv.weight", (ops.total_rows(rows), info.hidden), rows, "rows",
                     **kw))
    out.append(_whole(Src(f"{hf}self_attn.q_norm.weight"), shape(f"{hf}self_attn.q_norm.weight"),
                      f"{mg}self_attention.q_layernorm.weight", **kw))
    out.append(_whole(Src(f"{hf}self_attn.k_norm.weight"), shape(f"{hf}self_attn.k_norm.weight"),
                      f"{mg}self_attention.k_layernorm.weight", **kw))
    out.append(_whole(Src(f"{hf}self_attn.o_proj.weight"), shape(f"{hf}self_attn.o_proj.weight"),
                      f"{mg}self_attention.linear_proj.weight", "cols", **kw))
    post = f"{hf}post_attention_layernorm.weight"
    if is_moe_layer(skeleton, layer):
        out.append(_whole(Src(post), shape(post), f"{mg}pre_mlp_layernorm.weight", **kw))
        out.append(_whole(Src(f"{hf}mlp.gate.weight"), shape(f"{hf}mlp.gate.weight"), f"{mg}mlp.router.weight", **kw))
        gate_up = f"{hf}mlp.experts.gate_up_proj"
        down = f"{hf}mlp.experts.down_proj"
        n_exp, hidden, two_i = shape(gate_up)
        inter = two_i // 2
        if experts == "grouped":
            fc1, fc2 = f"{mg}mlp.experts.linear_fc1.weight{{expert}}", f"{mg}mlp.experts.linear_fc2.weight{{expert}}"
        else:
            fc1 = f"{mg}mlp.experts.local_experts.{{expert}}.linear_fc1.weight"
            fc2 = f"{mg}mlp.experts.local_experts.{{expert}}.linear_fc2.weight"
        for e in range(n_exp):
            src = Src(gate_up, e)
            out.append(Param(fc1, (two_i, hidden), ((src, 0, inter), (src, inter, two_i)), "halves",
                             group="etp", expert=e, **kw))
            out.append(Param(fc2, (hidden, inter), ((Src(down, e), 0, hidden),), "cols", group="etp", expert=e,
                             **kw))
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
