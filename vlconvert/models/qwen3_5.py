"""Qwen3.5-VL dense and MoE (Qwen3.6 uses the same classes): config, skeleton, roles, Megatron table.

Facts behind every rule here: ``docs/families/qwen3_5.md``.

Canonical names are the Hugging Face ones (``model.visual.*``, ``model.language_model.*``,
``lm_head.weight``) plus the multi-token-prediction head ``mtp.*`` that released checkpoints carry
and transformers drops on load. Routed experts have two stored forms, both in ``[out, in]``
orientation (transformers 5 run time; no transpose anywhere in this family):

* ``fused``: ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate first) and ``mlp.experts.down_proj`` [E, H, I]
  (released main decoder; Qwen3.6's MTP layer);
* ``per_expert``: ``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`` (what transformers 5.x
  ``save_pretrained`` writes; Qwen3.5's released MTP layer).

The Megatron side follows megatron-core 0.19 (``GatedDeltaNet``, gated attention, ``SharedExpertMLP``,
``MultiTokenPredictionBlock``) as Megatron-Bridge 0.6.2's Qwen3.5-VL bridges name it: LM under
``language_model.``, ViT under ``vision_model.``. :data:`FAMILY` is this module's
:class:`~vlconvert.models.family.Family`. Two rules are new to the shared Param vocabulary
(see :class:`Param35`): split ``blocks`` (each row block chunked over TP separately, e.g. GDN
``in_proj`` = per rank [q_r; k_r; v_r; z_r; b_r; a_r]) and the value op ``minus_one`` (GDN output norm:
HF plain RMSNorm gain, Megatron zero-centred gain). Bridge's ``run_config.yaml``: :func:`bridge_model_config`
(``Qwen35VLBridge`` / ``Qwen35VLMoEBridge.provider_bridge``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vlconvert import ops, rowbytes
from vlconvert.dtypes import BFLOAT16, FLOAT32, parse_dtype
from vlconvert.errors import UsageError, UserError
from vlconvert.lazy import torch
from vlconvert.models import bridge_config as bc
from vlconvert.models.base import ModelInfo, RuntimeTensor, TensorSpec, read_config_json
from vlconvert.models.base import Skeleton as BaseSkeleton
from vlconvert.models.family import EXPERT_STYLES, SPECS, Family, MegatronPrefixes, Roles
from vlconvert.models.megatron_table import Param, Src
from vlconvert.rowbytes import ByteRows

FAMILIES = {"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}
LM = "model.language_model."
VIS = "model.visual."
MTP = "mtp."
EMBED = f"{LM}embed_tokens.weight"
LM_HEAD = "lm_head.weight"
EXPERT_LAYOUTS = ("fused", "per_expert")
MLM = "language_model."
MVIS = "vision_model."

# Class defaults of transformers 5.25's Qwen3.5 configs, used where config.json leaves a field out.
_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "in_channels": 3,
    "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 3584,
    "num_position_embeddings": 2304,
}
_TEXT_COMMON: dict[str, Any] = {
    "vocab_size": 248320, "num_attention_heads": 16, "head_dim": 256, "attention_bias": False,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32,
}
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_5": {**_TEXT_COMMON, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
                "num_key_value_heads": 4},
    "qwen3_5_moe": {**_TEXT_COMMON, "hidden_size": 2048, "num_hidden_layers": 40, "num_key_value_heads": 2,
                    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts": 256,
                    "num_experts_per_tok": 8},
}
# Upper bounds that refuse a hostile or corrupt config before anything is allocated per layer/expert/row.
_BOUND = {"num_hidden_layers": 2**12, "hidden_size": 2**17, "intermediate_size": 2**20, "vocab_size": 2**23,
          "num_experts": 2**14, "num_attention_heads": 2**12, "num_key_value_heads": 2**12, "head_dim": 2**14,
          "moe_intermediate_size": 2**20, "shared_expert_intermediate_size": 2**20, "linear_key_head_dim": 2**14,
          "linear_value_head_dim": 2**14, "linear_num_key_heads": 2**12, "linear_num_value_heads": 2**12,
          "linear_conv_kernel_dim": 2**8, "mtp_num_hidden_layers": 2**6, "depth": 2**10,
          "num_heads": 2**12, "out_hidden_size": 2**17, "num_position_embeddings": 2**24, "patch_size": 2**10,
          "spatial_merge_size": 2**6, "temporal_patch_size": 2**6, "in_channels": 2**6}


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Qwen35Info(ModelInfo):
    """:class:`~vlconvert.models.base.ModelInfo` plus the Qwen3.5 facts (hybrid layers, GDN sizes, shared
    experts, MTP). ``intermediate`` is the dense MLP width (0 for MoE); ``deepstack`` is always empty."""

    layer_types: tuple[str, ...] = ()  # "linear_attention" | "full_attention" per decoder layer
    shared_intermediate: int = 0
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    conv_kernel: int = 0
    mtp_layers: int = 0

    @property
    def key_dim(self) -> int:
        """Rows of q (and of k) in the GDN projections: linear key heads x key head dim."""
        return self.linear_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        """Rows of v (and of z) in the GDN projections: linear value heads x value head dim."""
        return self.linear_value_heads * self.linear_value_head_dim


def _field(section: dict, defaults: dict, key: str, where: str) -> int:
    """An integer field (or its class default), refused when not an integer or beyond sane bounds."""
    value = section.get(key, defaults.get(key))
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"config field '{where}.{key}' must be an integer, got {value!r}")
    bound = _BOUND.get(key)
    if value < 0 or (bound is not None and value > bound):
        raise UserError(f"config field '{where}.{key}' is {value}, outside what vlconvert can convert "
                        f"(0..{bound:,}): is config.json corrupt?")
    return value


def _layer_types(text: dict, layers: int) -> tuple[str, ...]:
    """``layer_types`` as saved by transformers >= 5.5, else from ``full_attention_interval`` (default 4)."""
    types = text.get("layer_types")
    if types is None:
        interval = text.get("full_attention_interval", 4)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise UserError(f"config field 'text_config.full_attention_interval' must be a positive integer, "
                            f"got {interval!r}")
        return tuple("full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers))
    if not isinstance(types, list) or len(types) != layers:
        raise UserError(f"config field 'text_config.layer_types' must list {layers} layer types")
    bad = [t for t in types if t not in ("linear_attention", "full_attention")]
    if bad:
        raise UserError(f"config field 'text_config.layer_types' has '{bad[0]}': Qwen3.5 layers are "
                        "linear_attention or full_attention")
    return tuple(types)


def load_config(path_or_dict: str | Path | dict) -> Qwen35Info:
    """Read a Qwen3.5-VL / Qwen3.5-VL-MoE (or Qwen3.6) config.json into :class:`Qwen35Info`."""
    raw = path_or_dict if isinstance(path_or_dict, dict) else read_config_json(path_or_dict)
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"model_type '{family}' is not a Qwen3.5-VL model ({', '.join(FAMILIES)})")
    text, vision = raw.get("text_config") or {}, raw.get("vision_config") or {}
    for key, section in (("text_config", text), ("vision_config", vision)):
        if not isinstance(section, dict):
            raise UserError(f"the config's {key} is a {type(section).__name__}, not an object")
    td, vd = _TEXT_DEFAULTS[family], _VISION_DEFAULTS
    t = lambda k: _field(text, td, k, "text_config")  # noqa: E731
    v = lambda k: _field(vision, vd, k, "vision_config")  # noqa: E731
    if text.get("attention_bias", False):
        raise UserError("attention_bias=True is not a Qwen3.5 model vlconvert knows (no released one has it)")
    if text.get("attn_output_gate", True) is False:
        raise UserError("attn_output_gate=false: transformers' Qwen3.5 always gates attention (q_proj twice "
                        "as wide); this config describes another model")
    layers = t("num_hidden_layers")
    moe = family == "qwen3_5_moe"
    mtp = text.get("mtp_num_hidden_layers", 0)
    mtp = _field({"mtp_num_hidden_layers": mtp}, {}, "mtp_num_hidden_layers", "text_config")
    dtype_text = raw.get("dtype") or raw.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    info = Qwen35Info(
        family=family, tied=bool(raw.get("tie_word_embeddings", False)),
        hidden=t("hidden_size"), layers=layers, layer_types=_layer_types(text, layers),
        heads=t("num_attention_heads"), kv_heads=t("num_key_value_heads"), head_dim=t("head_dim"),
        vocab=t("vocab_size"), intermediate=0 if moe else t("intermediate_size"),
        experts=t("num_experts") if moe else 0, experts_per_token=t("num_experts_per_tok") if moe else 0,
        moe_intermediate=t("moe_intermediate_size") if moe else 0,
        shared_intermediate=t("shared_expert_intermediate_size") if moe else 0,
        linear_key_heads=t("linear_num_key_heads"), linear_value_heads=t("linear_num_value_heads"),
        linear_key_head_dim=t("linear_key_head_dim"), linear_value_head_dim=t("linear_value_head_dim"),
        conv_kernel=t("linear_conv_kernel_dim"), mtp_layers=mtp,
        vision_depth=v("depth"), vision_hidden=v("hidden_size"), vision_heads=v("num_heads"),
        vision_intermediate=v("intermediate_size"), deepstack=(),
        dtype=parse_dtype(dtype_text) if isinstance(dtype_text, str) else None, raw=raw)
    if info.heads % max(info.kv_heads, 1) or info.kv_heads == 0:
        raise UserError(f"{info.heads} attention heads are not a multiple of {info.kv_heads} KV heads")
    if info.linear_key_heads == 0 or info.linear_value_heads % info.linear_key_heads:
        raise UserError(f"{info.linear_value_heads} linear value heads are not a multiple of "
                        f"{info.linear_key_heads} linear key heads")
    return info


# ----------------------------------------------------------------------------------------- skeleton
@dataclass
class Skeleton(BaseSkeleton):
    """The neutral :class:`~vlconvert.models.base.Skeleton` plus how this checkpoint stores its experts.

    ``experts`` / ``mtp_experts``: the stored form of the routed experts of the decoder and of the MTP
    layers (``fused`` or ``per_expert``). ``mtp``: whether ``mtp.*`` is included. Fused experts have one
    orientation in this family, so :meth:`shape_in` never transposes.
    """

    experts: str = "fused"
    mtp_experts: str = "per_expert"
    mtp: bool = True

    @property
    def family(self) -> Family:  # type: ignore[override]
        return FAMILY

    def model_keys(self) -> list[str]:
        """The keys transformers loads (everything but ``mtp.*``)."""
        return [k for k in self.hf_keys() if not k.startswith(MTP)]

    def mtp_keys(self) -> list[str]:
        return [k for k in self.tensors if k.startswith(MTP)]

    def shape_in(self, name: str, experts_layout: str | None = None) -> tuple[int, ...]:
        """The stored shape of ``name`` (one orientation in this family, whatever ``experts_layout``)."""
        return self.tensors[name].shape


def _check_layout(what: str, layout: str) -> str:
    if layout not in EXPERT_LAYOUTS:
        raise UsageError(f"unknown {what} layout '{layout}': use one of {', '.join(EXPERT_LAYOUTS)}")
    return layout


def _layer_shapes(info: Qwen35Info, prefix: str, kind: str, experts: str) -> dict[str, tuple[int, ...]]:
    """One decoder layer's tensors in transformers' registration order (attention, MLP, norms)."""
    h, hd = info.hidden, info.head_dim
    s: dict[str, tuple[int, ...]] = {}
    if kind == "linear_attention":
        a = f"{prefix}linear_attn."
        conv = 2 * info.key_dim + info.value_dim
        s[f"{a}dt_bias"] = (info.linear_value_heads,)
        s[f"{a}A_log"] = (info.linear_value_heads,)
        s[f"{a}conv1d.weight"] = (conv, 1, info.conv_kernel)
        s[f"{a}norm.weight"] = (info.linear_value_head_dim,)
        s[f"{a}out_proj.weight"] = (h, info.value_dim)
        s[f"{a}in_proj_qkv.weight"] = (conv, h)
        s[f"{a}in_proj_z.weight"] = (info.value_dim, h)
        s[f"{a}in_proj_b.weight"] = (info.linear_value_heads, h)
        s[f"{a}in_proj_a.weight"] = (info.linear_value_heads, h)
    else:
        a = f"{prefix}self_attn."
        s[f"{a}q_proj.weight"] = (2 * info.heads * hd, h)  # per head [query; gate]
        s[f"{a}k_proj.weight"] = (info.kv_heads * hd, h)
        s[f"{a}v_proj.weight"] = (info.kv_heads * hd, h)
        s[f"{a}o_proj.weight"] = (h, info.heads * hd)
        s[f"{a}q_norm.weight"] = (hd,)
        s[f"{a}k_norm.weight"] = (hd,)
    m = f"{prefix}mlp."
    if info.is_moe:
        n, i, sh = info.experts, info.moe_intermediate, info.shared_intermediate
        s[f"{m}gate.weight"] = (n, h)
        if experts == "fused":
            s[f"{m}experts.gate_up_proj"] = (n, 2 * i, h)
            s[f"{m}experts.down_proj"] = (n, h, i)
        else:
            for e in range(n):
                s[f"{m}experts.{e}.gate_proj.weight"] = (i, h)
                s[f"{m}experts.{e}.up_proj.weight"] = (i, h)
                s[f"{m}experts.{e}.down_proj.weight"] = (h, i)
        s[f"{m}shared_expert.gate_proj.weight"] = (sh, h)
        s[f"{m}shared_expert.up_proj.weight"] = (sh, h)
        s[f"{m}shared_expert.down_proj.weight"] = (h, sh)
        s[f"{m}shared_expert_gate.weight"] = (1, h)
    else:
        s[f"{m}gate_proj.weight"] = (info.intermediate, h)
        s[f"{m}up_proj.weight"] = (info.intermediate, h)
        s[f"{m}down_proj.weight"] = (h, info.intermediate)
    s[f"{prefix}input_layernorm.weight"] = (h,)
    s[f"{prefix}post_attention_layernorm.weight"] = (h,)
    return s


def skeleton_shapes(info: Qwen35Info, experts: str = "fused", mtp_experts: str = "per_expert",
                    mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Every canonical key and shape: vision tower, language model, ``lm_head`` (transformers'
    registration order), then ``mtp.*`` (``fc``, layers, ``norm``, the two pre-fc norms)."""
    raw = info.raw
    vision = {**_VISION_DEFAULTS, **(raw.get("vision_config") or {})}
    v = lambda k: _field(vision, {}, k, "vision_config")  # noqa: E731
    hv, iv = info.vision_hidden, info.vision_intermediate
    merged = hv * v("spatial_merge_size") ** 2
    s: dict[str, tuple[int, ...]] = {}
    s[f"{VIS}patch_embed.proj.weight"] = (hv, v("in_channels"), v("temporal_patch_size"), v("patch_size"),
                                          v("patch_size"))
    s[f"{VIS}patch_embed.proj.bias"] = (hv,)
    s[f"{VIS}pos_embed.weight"] = (v("num_position_embeddings"), hv)
    for j in range(info.vision_depth):
        b = f"{VIS}blocks.{j}."
        for name, shape in (("norm1.weight", (hv,)), ("norm1.bias", (hv,)), ("norm2.weight", (hv,)),
                            ("norm2.bias", (hv,)), ("attn.qkv.weight", (3 * hv, hv)), ("attn.qkv.bias", (3 * hv,)),
                            ("attn.proj.weight", (hv, hv)), ("attn.proj.bias", (hv,)),
                            ("mlp.linear_fc1.weight", (iv, hv)), ("mlp.linear_fc1.bias", (iv,)),
                            ("mlp.linear_fc2.weight", (hv, iv)), ("mlp.linear_fc2.bias", (hv,))):
            s[b + name] = shape
    out = v("out_hidden_size")
    s[f"{VIS}merger.norm.weight"] = (hv,)  # normed before the 2x2 shuffle
    s[f"{VIS}merger.norm.bias"] = (hv,)
    s[f"{VIS}merger.linear_fc1.weight"] = (merged, merged)
    s[f"{VIS}merger.linear_fc1.bias"] = (merged,)
    s[f"{VIS}merger.linear_fc2.weight"] = (out, merged)
    s[f"{VIS}merger.linear_fc2.bias"] = (out,)
    s[EMBED] = (info.vocab, info.hidden)
    for i, kind in enumerate(info.layer_types):
        s.update(_layer_shapes(info, f"{LM}layers.{i}.", kind, experts))
    s[f"{LM}norm.weight"] = (info.hidden,)
    s[LM_HEAD] = (info.vocab, info.hidden)
    if mtp and info.mtp_layers:
        s[f"{MTP}fc.weight"] = (info.hidden, 2 * info.hidden)  # input: cat[normed embedding, normed hidden]
        for k in range(info.mtp_layers):
            s.update(_layer_shapes(info, f"{MTP}layers.{k}.", "full_attention", mtp_experts))
        s[f"{MTP}norm.weight"] = (info.hidden,)
        s[f"{MTP}pre_fc_norm_hidden.weight"] = (info.hidden,)
        s[f"{MTP}pre_fc_norm_embedding.weight"] = (info.hidden,)
    return s


def build_skeleton(config: str | Path | dict | Qwen35Info, *, experts: str = "fused",
                   mtp_experts: str = "per_expert", mtp: bool = True) -> Skeleton:
    """Every canonical key, shape and dtype, from the config alone (pure Python, no transformers).

    Defaults describe a released Qwen3.5 MoE checkpoint (fused decoder experts, per-expert MTP experts);
    pass the layouts :func:`detect_expert_layouts` finds for any other folder.
    """
    info = config if isinstance(config, Qwen35Info) else load_config(config)
    _check_layout("experts", experts)
    _check_layout("MTP experts", mtp_experts)
    shapes = skeleton_shapes(info, experts, mtp_experts, mtp)
    dtype = info.dtype or BFLOAT16
    return Skeleton(info=info, tensors={n: TensorSpec(sh, dtype) for n, sh in shapes.items()},
                    runtime_experts="transformers5", experts=experts, mtp_experts=mtp_experts, mtp=mtp)


_PER_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def detect_expert_layouts(names: Iterable[str]) -> tuple[str, str, bool]:
    """(decoder experts layout, MTP experts layout, holds mtp.*) of a set of stored names.

    A layout seen in neither place defaults to ``fused`` for the decoder and ``per_expert`` for the MTP
    layer (released Qwen3.5); a mix inside one of the two is refused.
    """
    found: dict[bool, set[str]] = {False: set(), True: set()}
    has_mtp = False
    for n in names:
        is_mtp = n.startswith(MTP)
        has_mtp |= is_mtp
        if n.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            found[is_mtp].add("fused")
        elif _PER_EXPERT.search(n):
            found[is_mtp].add("per_expert")
    for is_mtp, kinds in found.items():
        if len(kinds) > 1:
            raise UserError(f"the checkpoint stores {'MTP' if is_mtp else 'decoder'} experts both fused "
                            "(experts.gate_up_proj) and per expert (experts.N.gate_proj): one layout per checkpoint")
    main = next(iter(found[False]), "fused")
    return main, next(iter(found[True]), "per_expert"), has_mtp


# -------------------------------------------------------------------------------------------- roles
ROLES = ("embedding", "output", "experts", "mtp", "vision", "zero_centered_norm", "other")


def is_expert(name: str) -> bool:
    """True for the fused 3-D routed expert tensors (decoder or MTP)."""
    return name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))


def tensor_role(name: str) -> str:
    """The role of a canonical tensor: embedding, output (lm_head), experts (fused routed experts), mtp
    (the MTP head: transformers ignores it), vision, zero_centered_norm (GDN output norm: its Megatron
    value is HF - 1) or other."""
    if name == EMBED:
        return "embedding"
    if name == LM_HEAD:
        return "output"
    if name.startswith(MTP):
        return "mtp"
    if is_expert(name):
        return "experts"
    if name.startswith(VIS):
        return "vision"
    if name.endswith(".linear_attn.norm.weight"):
        return "zero_centered_norm"
    return "other"


# ------------------------------------------------------------------------------------- Megatron table
@dataclass(frozen=True)
class Param35(Param):
    """A :class:`~vlconvert.models.qwen3vl_megatron.Param` with the two rules Qwen3.5 adds.

    ``split == "blocks"``: ``rows`` is the concatenation of row blocks of sizes ``blocks`` (in order);
    TP rank r holds [chunk r of block 0; chunk r of block 1; ...] (``halves`` is the two-block case).
    ``value_op == "minus_one"``: Megatron value = HF value - 1 (HF -> Megatron), + 1 back.
    """

    blocks: tuple[int, ...] = ()
    value_op: str | None = None


Seg = tuple[Src | None, int, int]


def _whole(src: Src, shape: tuple[int, ...], name: str, split: str = "none", **kw: Any) -> Param35:
    return Param35(name, shape, ((src, 0, shape[0]),), split, **kw)


def source_shape(skeleton: Skeleton, src: Src) -> tuple[int, ...]:
    """Shape of a source matrix; ``Src(name, e)`` is expert e of a fused tensor, already [out, in]."""
    shape = skeleton.tensors[src.hf].shape
    return shape if src.expert is None else shape[1:]


def gated_qkv_row_map(heads: int, groups: int, head_dim: int) -> ops.RowMap:
    """Rows of Megatron's gated ``linear_qkv`` as slices of HF q_proj / k_proj / v_proj (tags q, k, v).

    HF q_proj holds per head [query (hd rows); gate (hd rows)]. Megatron, per query group g of r heads:
    [query of the r heads; gate of the r heads; k head g; v head g].
    """
    if heads % groups:
        raise UserError(f"{heads} attention heads are not a multiple of {groups} query groups")
    r = heads // groups
    out: ops.RowMap = []
    for g in range(groups):
        hs = range(g * r, (g + 1) * r)
        out += [("q", 2 * h * head_dim, (2 * h + 1) * head_dim) for h in hs]
        out += [("q", (2 * h + 1) * head_dim, (2 * h + 2) * head_dim) for h in hs]
        out += [("k", g * head_dim, (g + 1) * head_dim), ("v", g * head_dim, (g + 1) * head_dim)]
    return out


def gdn_in_proj_blocks(info: Qwen35Info) -> tuple[int, ...]:
    """Row blocks of Megatron's GDN ``in_proj``: q, k, v, z, b (beta), a (alpha)."""
    kd, vd, nv = info.key_dim, info.value_dim, info.linear_value_heads
    return (kd, kd, vd, vd, nv, nv)


def check_tp(info: Qwen35Info, tp: int) -> None:
    """Refuse a TP size that does not divide the heads each split needs (one line naming the field)."""
    for what, n in (("attention heads", info.heads), ("vision attention heads", info.vision_heads),
                    ("linear-attention key heads", info.linear_key_heads),
                    ("linear-attention value heads", info.linear_value_heads)):
        if n % tp:
            raise UserError(f"--tp {tp} must divide the {n} {what}")
    if info.kv_heads % tp and tp % info.kv_heads:
        raise UserError(f"--tp {tp} must be a multiple or a divisor of the {info.kv_heads} KV groups")


def megatron_params(skeleton: Skeleton, *, spec: str = "te", experts: str = "grouped",
                    padded_vocab: int | None = None) -> list[Param35]:
    """Every Megatron parameter in state-dict order, globally numbered, with its recipe.

    Decoder layers use ``{layer}``; experts ``{expert}``. MTP parameters (``language_model.mtp.layers.K.``)
    have ``stage="last"`` and no layer; their routed experts carry ``expert`` and are EP-placed like the
    decoder's. Without ``mtp.*`` in the skeleton there are no MTP parameters.
    """
    if spec not in SPECS:
        raise UsageError(f"unknown --spec '{spec}': use one of {', '.join(SPECS)}")
    if experts not in EXPERT_STYLES:
        raise UsageError(f"unknown --experts '{experts}': use one of {', '.join(EXPERT_STYLES)}")
    info = skeleton.info
    out: list[Param35] = _vision_params(skeleton, spec)
    vocab, hidden = info.vocab, info.hidden
    vp = padded_vocab or vocab
    pad = ((None, vocab, vp),) if vp > vocab else ()
    out.append(Param35(f"{MLM}embedding.word_embeddings.weight", (vp, hidden), ((Src(EMBED), 0, vocab),) + pad,
                       "rows", stage="first"))
    for layer, kind in enumerate(info.layer_types):
        out += _layer_params(skeleton, f"{LM}layers.{layer}.", f"{MLM}decoder.layers.{{layer}}.", kind, spec,
                             experts, {"stage": "layer", "layer": layer})
    norm = f"{LM}norm.weight"
    out.append(_whole(Src(norm), skeleton.tensors[norm].shape, f"{MLM}decoder.final_layernorm.weight", stage="last"))
    head = EMBED if info.tied else LM_HEAD
    out.append(Param35(f"{MLM}output_layer.weight", (vp, hidden), ((Src(head), 0, vocab),) + pad, "rows",
                       stage="last"))
    if skeleton.mtp and info.mtp_layers:
        out += _mtp_params(skeleton, spec, experts)
    return out


def _vision_params(skeleton: Skeleton, spec: str) -> list[Param35]:
    """The ViT as Qwen3-VL's (Megatron-Bridge maps both alike), without deepstack mergers."""
    info, sh = skeleton.info, (lambda n: skeleton.tensors[n].shape)
    out = [_whole(Src(VIS + n), sh(VIS + n), MVIS + n)
           for n in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed.weight")]
    heads = info.vision_heads
    for b in range(info.vision_depth):
        hf, mg = f"{VIS}blocks.{b}.", f"{MVIS}decoder.layers.{b}."
        norm1 = f"{mg}self_attention.linear_qkv.layer_norm_" if spec == "te" else f"{mg}input_layernorm."
        norm2 = f"{mg}mlp.linear_fc1.layer_norm_" if spec == "te" else f"{mg}pre_mlp_layernorm."
        for part in ("weight", "bias"):
            out.append(_whole(Src(f"{hf}norm1.{part}"), sh(f"{hf}norm1.{part}"), f"{norm1}{part}"))
            qkv = f"{hf}attn.qkv.{part}"
            rows = tuple((Src(qkv), a, z) for _, a, z in ops.vision_qkv_row_map(heads, info.vision_hidden // heads))
            out.append(Param35(f"{mg}self_attention.linear_qkv.{part}", sh(qkv), rows, "rows"))
        out.append(_whole(Src(f"{hf}attn.proj.weight"), sh(f"{hf}attn.proj.weight"),
                          f"{mg}self_attention.linear_proj.weight", "cols"))
        out.append(_whole(Src(f"{hf}attn.proj.bias"), sh(f"{hf}attn.proj.bias"),
                          f"{mg}self_attention.linear_proj.bias"))
        for part in ("weight", "bias"):
            out.append(_whole(Src(f"{hf}norm2.{part}"), sh(f"{hf}norm2.{part}"), f"{norm2}{part}"))
        out += _plain_mlp(f"{hf}mlp.", f"{mg}mlp.", sh)
    hf, mg = f"{VIS}merger.", f"{MVIS}merger."
    for part in ("weight", "bias"):
        out.append(_whole(Src(f"{hf}norm.{part}"), sh(f"{hf}norm.{part}"), f"{mg}patch_norm.{part}"))
    out += _plain_mlp(hf, mg, sh)
    return out


def _plain_mlp(hf: str, mg: str, sh) -> list[Param35]:
    """Two linears with biases: fc1 column parallel, fc2 row parallel (its bias replicated)."""
    return [_whole(Src(f"{hf}linear_fc1.weight"), sh(f"{hf}linear_fc1.weight"), f"{mg}linear_fc1.weight", "rows"),
            _whole(Src(f"{hf}linear_fc1.bias"), sh(f"{hf}linear_fc1.bias"), f"{mg}linear_fc1.bias", "rows"),
            _whole(Src(f"{hf}linear_fc2.weight"), sh(f"{hf}linear_fc2.weight"), f"{mg}linear_fc2.weight", "cols"),
            _whole(Src(f"{hf}linear_fc2.bias"), sh(f"{hf}linear_fc2.bias"), f"{mg}linear_fc2.bias")]


def _gated_mlp(gate: str, up: str, down: str, mg: str, sh, **kw: Any) -> list[Param35]:
    """SwiGLU MLP: fc1 = [gate; up] split as halves, fc2 row parallel."""
    inter, hidden = sh(gate)
    return [Param35(f"{mg}linear_fc1.weight", (2 * inter, hidden), ((Src(gate), 0, inter), (Src(up), 0, inter)),
                    "halves", **kw),
            _whole(Src(down), sh(down), f"{mg}linear_fc2.weight", "cols", **kw)]


def _layer_params(skeleton: Skeleton, hf: str, mg: str, kind: str, spec: str, experts: str,
                  kw: dict[str, Any]) -> list[Param35]:
    """One decoder (or MTP) layer: GDN or gated attention, then dense MLP or MoE with shared expert."""
    info, sh = skeleton.info, (lambda n: skeleton.tensors[n].shape)
    out: list[Param35] = []
    if kind == "linear_attention":
        a, m = f"{hf}linear_attn.", f"{mg}self_attention."
        norm1 = f"{m}in_proj.layer_norm_weight" if spec == "te" else f"{mg}input_layernorm.weight"
        out.append(_whole(Src(f"{hf}input_layernorm.weight"), (info.hidden,), norm1, **kw))
        kd, vd, nv = info.key_dim, info.value_dim, info.linear_value_heads
        qkv, z = Src(f"{a}in_proj_qkv.weight"), Src(f"{a}in_proj_z.weight")
        bb, aa = Src(f"{a}in_proj_b.weight"), Src(f"{a}in_proj_a.weight")
        rows = ((qkv, 0, 2 * kd + vd), (z, 0, vd), (bb, 0, nv), (aa, 0, nv))
        out.append(Param35(f"{m}in_proj.weight", (2 * kd + 2 * vd + 2 * nv, info.hidden), rows, "blocks",
                           blocks=gdn_in_proj_blocks(info), **kw))
        conv = f"{a}conv1d.weight"
        out.append(_whole(Src(conv), sh(conv), f"{m}conv1d.weight", "blocks", blocks=(kd, kd, vd), **kw))
        out.append(_whole(Src(f"{a}A_log"), (nv,), f"{m}A_log", "rows", **kw))
        out.append(_whole(Src(f"{a}dt_bias"), (nv,), f"{m}dt_bias", "rows", **kw))
        out.append(_whole(Src(f"{a}norm.weight"), sh(f"{a}norm.weight"), f"{m}out_norm.weight",
                          value_op="minus_one", **kw))
        out.append(_whole(Src(f"{a}out_proj.weight"), sh(f"{a}out_proj.weight"), f"{m}out_proj.weight", "cols",
                          **kw))
    else:
        a, m = f"{hf}self_attn.", f"{mg}self_attention."
        norm1 = f"{m}linear_qkv.layer_norm_weight" if spec == "te" else f"{mg}input_layernorm.weight"
        out.append(_whole(Src(f"{hf}input_layernorm.weight"), (info.hidden,), norm1, **kw))
        tags = {t: Src(f"{a}{t}_proj.weight") for t in "qkv"}
        rows = tuple((tags[t], s, e) for t, s, e in gated_qkv_row_map(info.heads, info.kv_heads, info.head_dim))
        out.append(Param35(f"{m}linear_qkv.weight", (ops.total_rows(rows), info.hidden), rows, "rows", **kw))
        out.append(_whole(Src(f"{a}q_norm.weight"), sh(f"{a}q_norm.weight"), f"{m}q_layernorm.weight", **kw))
        out.append(_whole(Src(f"{a}k_norm.weight"), sh(f"{a}k_norm.weight"), f"{m}k_layernorm.weight", **kw))
        out.append(_whole(Src(f"{a}o_proj.weight"), sh(f"{a}o_proj.weight"), f"{m}linear_proj.weight", "cols", **kw))
    post, hm, mm = f"{hf}post_attention_layernorm.weight", f"{hf}mlp.", f"{mg}mlp."
    if not info.is_moe:
        norm2 = f"{mm}linear_fc1.layer_norm_weight" if spec == "te" else f"{mg}pre_mlp_layernorm.weight"
        out.append(_whole(Src(post), (info.hidden,), norm2, **kw))
        return out + _gated_mlp(f"{hm}gate_proj.weight", f"{hm}up_proj.weight", f"{hm}down_proj.weight", mm, sh, **kw)
    out.append(_whole(Src(post), (info.hidden,), f"{mg}pre_mlp_layernorm.weight", **kw))
    out.append(_whole(Src(f"{hm}gate.weight"), sh(f"{hm}gate.weight"), f"{mm}router.weight", **kw))
    if experts == "grouped":
        fc1, fc2 = f"{mm}experts.linear_fc1.weight{{expert}}", f"{mm}experts.linear_fc2.weight{{expert}}"
    else:
        fc1 = f"{mm}experts.local_experts.{{expert}}.linear_fc1.weight"
        fc2 = f"{mm}experts.local_experts.{{expert}}.linear_fc2.weight"
    i, h = info.moe_intermediate, info.hidden
    fused = f"{hm}experts.gate_up_proj" in skeleton.tensors
    for e in range(info.experts):
        if fused:
            gu, down = Src(f"{hm}experts.gate_up_proj", e), Src(f"{hm}experts.down_proj", e)
            rows = ((gu, 0, i), (gu, i, 2 * i))
        else:
            p = f"{hm}experts.{e}."
            down = Src(f"{p}down_proj.weight")
            rows = ((Src(f"{p}gate_proj.weight"), 0, i), (Src(f"{p}up_proj.weight"), 0, i))
        out.append(Param35(fc1, (2 * i, h), rows, "halves", group="etp", expert=e, **kw))
        out.append(Param35(fc2, (h, i), ((down, 0, h),), "cols", group="etp", expert=e, **kw))
    s = f"{hm}shared_expert."
    out += _gated_mlp(f"{s}gate_proj.weight", f"{s}up_proj.weight", f"{s}down_proj.weight",
                      f"{mm}shared_experts.", sh, **kw)
    out.append(_whole(Src(f"{hm}shared_expert_gate.weight"), (1, h), f"{mm}shared_experts.gate_weight", **kw))
    return out


def _mtp_params(skeleton: Skeleton, spec: str, experts: str) -> list[Param35]:
    """The MTP head: one Megatron ``MultiTokenPredictionLayer`` per HF ``mtp.layers.K``."""
    info = skeleton.info
    if info.mtp_layers != 1:
        raise UserError(f"mtp_num_hidden_layers={info.mtp_layers}: HF Qwen3.5 shares one mtp.fc/mtp.norm across "
                        "MTP layers while Megatron gives each its own; only 1 (every released model) converts")
    mg, kw = f"{MLM}mtp.layers.0.", {"stage": "last"}
    h = info.hidden
    out = [_whole(Src(f"{MTP}pre_fc_norm_embedding.weight"), (h,), f"{mg}enorm.weight", **kw),
           _whole(Src(f"{MTP}pre_fc_norm_hidden.weight"), (h,), f"{mg}hnorm.weight", **kw),
           _whole(Src(f"{MTP}fc.weight"), (h, 2 * h), f"{mg}eh_proj.weight", "rows", **kw)]
    out += _layer_params(skeleton, f"{MTP}layers.0.", f"{mg}mtp_model_layer.", "full_attention", spec, experts, kw)
    out.append(_whole(Src(f"{MTP}norm.weight"), (h,), f"{mg}final_layernorm.weight", **kw))
    return out


# --------------------------------------------------------------------------------- splits and ops
def split_param(p: Param, size: int, rank: int) -> tuple[int, tuple[Seg, ...], tuple[int, ...]]:
    """(axis, segments, shape) of TP (or ETP) rank ``rank`` of ``size`` for ``p``: the shared rules
    (none, rows, halves, cols) plus ``blocks``. Axis 0: concatenation of row segments; axis 1: columns
    ``a:b`` of the single source."""
    rows = list(p.rows)
    what = p.name.format(layer="L", expert="E")
    try:
        if p.split == "none" or (size == 1 and p.split != "cols"):
            return 0, tuple(rows), p.shape
        if p.split in ("rows", "halves", "blocks"):
            blocks = getattr(p, "blocks", ()) if p.split == "blocks" else ()
            blocks = blocks or ((p.shape[0],) if p.split == "rows" else (p.shape[0] // 2,) * 2)
            segs: ops.RowMap = []
            start = 0
            for n in blocks:
                a, b = ops.chunk_range(n, size, rank, what)
                segs += ops.slice_row_map(rows, start + a, start + b)
                start += n
            return 0, tuple(ops.merge_row_map(segs)), (ops.total_rows(segs), *p.shape[1:])
        if p.split == "cols":
            a, b = ops.chunk_range(p.shape[1], size, rank, what)
            return 1, ((rows[0][0], a, b),), (p.shape[0], b - a)
    except UserError as exc:
        raise UserError(f"cannot split {what}: {exc}") from exc
    raise AssertionError(p.split)


def to_megatron_value(p: Param, tensor: torch.Tensor) -> torch.Tensor:
    """Apply ``p``'s value op going HF -> Megatron (``minus_one``: computed in fp32, cast back)."""
    if getattr(p, "value_op", None) == "minus_one":
        return (tensor.float() - 1).to(tensor.dtype)
    return tensor


def to_hf_value(p: Param, tensor: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_megatron_value` (``minus_one``: + 1)."""
    if getattr(p, "value_op", None) == "minus_one":
        return (tensor.float() + 1).to(tensor.dtype)
    return tensor


def to_megatron_value_bytes(p: Param, rows: ByteRows) -> ByteRows | None:
    """:func:`to_megatron_value` on rows held as bytes (:func:`rowbytes.add`: the same fp32 arithmetic and
    rounding); None where torch must compute it (a NaN, an unknown op)."""
    return _value_bytes(p, rows, -1.0)


def to_hf_value_bytes(p: Param, rows: ByteRows) -> ByteRows | None:
    """:func:`to_hf_value` on rows held as bytes, as :func:`to_megatron_value_bytes`."""
    return _value_bytes(p, rows, 1.0)


def _value_bytes(p: Param, rows: ByteRows, offset: float) -> ByteRows | None:
    op = getattr(p, "value_op", None)
    if op is None:
        return rows
    return rowbytes.add(rows, offset) if op == "minus_one" else None


def minus_one_is_exact(tensor: torch.Tensor) -> bool:
    """True when HF -> Megatron -> HF of a ``minus_one`` tensor gives back the same bits in its dtype.

    Exact for every gain in [0.5, 2) (Sterbenz) and most above; a bf16 gain below 0.5 may lose its low bits.
    """
    back = (((tensor.float() - 1).to(tensor.dtype)).float() + 1).to(tensor.dtype)
    return torch.equal(back.view(torch.int16) if tensor.dtype == torch.bfloat16 else back,
                       tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor)


def interleave_gated_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF gated q_proj ([heads*2*hd, H]: per head [query; gate]), k, v -> Megatron ``linear_qkv``."""
    hd = k.shape[0] // groups
    heads = q.shape[0] // (2 * hd)
    qh = q.reshape(heads, 2, hd, *q.shape[1:])
    query = qh[:, 0].reshape(groups, -1, *q.shape[1:])
    gate = qh[:, 1].reshape(groups, -1, *q.shape[1:])
    return torch.cat([query, gate, k.reshape(groups, hd, *k.shape[1:]), v.reshape(groups, hd, *v.shape[1:])],
                     dim=1).reshape(-1, *q.shape[1:])


def fuse_gdn_in_proj(qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor, key_dim: int,
                     tp: int = 1) -> torch.Tensor:
    """HF in_proj_qkv/z/b/a -> the full Megatron ``in_proj`` at TP ``tp``: per rank [q_r; k_r; v_r; z_r; b_r; a_r]."""
    q, k, v = torch.split(qkv, [key_dim, key_dim, qkv.shape[0] - 2 * key_dim])
    parts = [t.chunk(tp) for t in (q, k, v, z, b, a)]
    return torch.cat([p[r] for r in range(tp) for p in parts])


# --------------------------------------------------------------------------------------------- family
_LM_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")


class Qwen35Family(Family):
    """Qwen3.5-VL dense and MoE (and Qwen3.6): hybrid GDN / gated-attention layers, shared experts, an MTP head.

    Family-specific hooks beyond :class:`~vlconvert.models.family.Family` (the neutral machinery does not call
    them yet): :meth:`skeleton_for` (the skeleton of a checkpoint from its stored names), :meth:`source_shape`
    (fused experts are already ``[out, in]``), :meth:`split` (adds ``blocks``), :meth:`to_megatron_value` /
    :meth:`to_hf_value` (the ``minus_one`` value op).
    """

    name = "qwen3_5"
    model_types = tuple(FAMILIES)
    architectures = tuple(FAMILIES.values())
    megatron_prefixes = MegatronPrefixes(language=MLM, vision=MVIS)
    embed = EMBED
    output = LM_HEAD
    expert_storage = "fused"  # the released decoder experts; see skeleton_for for other checkpoints
    stored_forms = True
    plan_from_table = True
    signature = ".linear_attn."  # Gated DeltaNet layers: no other family has them
    hf_vision_prefix = VIS
    vision_tensor_parallel = True
    layer_pattern = _LM_LAYER

    def load_config(self, raw: dict) -> ModelInfo:
        return load_config(raw)

    def skeleton_shapes(self, info: ModelInfo, runtime_experts: str) -> dict[str, tuple[int, ...]]:
        """Released layout (fused decoder experts, per-expert MTP experts, mtp.* included); one orientation."""
        return skeleton_shapes(_info(info))

    def build_skeleton(self, info: ModelInfo) -> Skeleton:
        return build_skeleton(_info(info))

    def skeleton_for(self, info: ModelInfo, names: Iterable[str]) -> Skeleton:
        """The skeleton of a checkpoint holding ``names``: its expert layouts, with ``mtp.*`` only if held."""
        experts, mtp_experts, has_mtp = detect_expert_layouts(names)
        return build_skeleton(_info(info), experts=experts, mtp_experts=mtp_experts, mtp=has_mtp)

    def is_routed_expert(self, name: str) -> bool:
        return is_expert(name) or _PER_EXPERT.search(name) is not None

    def runtime_tensors(self, skeleton: BaseSkeleton) -> list[RuntimeTensor] | None:
        """transformers 5 holds the decoder's routed experts fused (``experts.gate_up_proj`` [E, 2I, H],
        ``experts.down_proj`` [E, H, I]) whatever form they are stored in; ``mtp.*`` is not in its state dict
        (kept under its own names beside it)."""
        sk = _skeleton(skeleton)
        if not sk.info.is_moe or sk.experts != "per_expert":
            return None
        from vlconvert.models.qwen3_text import fused_expert_runtime

        return fused_expert_runtime(sk, lambda n: _PER_EXPERT.search(n) is not None and not n.startswith(MTP))

    def is_stacked_expert(self, name: str) -> bool:
        return is_expert(name)  # read one expert at a time by the Megatron table, never transposed

    def is_mtp(self, name: str) -> bool:
        return name.startswith(MTP)

    def is_vision(self, name: str) -> bool:
        return name.startswith(VIS)

    def roles(self, skeleton: BaseSkeleton) -> Roles:
        roles = super().roles(skeleton)
        if skeleton.info.is_moe and isinstance(skeleton, Skeleton):
            roles = replace(roles, expert_storage=skeleton.experts)
        return roles

    def megatron_params(self, skeleton: BaseSkeleton, *, spec: str = "te", experts: str = "grouped",
                        padded_vocab: int | None = None) -> list[Param]:
        return list(megatron_params(_skeleton(skeleton), spec=spec, experts=experts, padded_vocab=padded_vocab))

    def check_tensor_parallel(self, info: ModelInfo, tp: int) -> None:
        check_tp(_info(info), tp)

    def source_shape(self, skeleton: BaseSkeleton, src: Src) -> tuple[int, ...]:
        return source_shape(_skeleton(skeleton), src)

    def split(self, p: Param, size: int, rank: int) -> tuple[int, tuple[Seg, ...], tuple[int, ...]]:
        return split_param(p, size, rank)

    def to_megatron_value(self, p: Param, tensor: torch.Tensor) -> torch.Tensor:
        return to_megatron_value(p, tensor)

    def to_hf_value(self, p: Param, tensor: torch.Tensor) -> torch.Tensor:
        return to_hf_value(p, tensor)

    def to_megatron_value_bytes(self, p: Param, rows: ByteRows) -> ByteRows | None:
        return to_megatron_value_bytes(p, rows)

    def to_hf_value_bytes(self, p: Param, rows: ByteRows) -> ByteRows | None:
        return to_hf_value_bytes(p, rows)

    def bridge_model_config(self, info: ModelInfo, **sizes: Any) -> dict:
        return bridge_model_config(_info(info), **sizes)

    def megatron_lm_args(self, info: ModelInfo, **sizes: Any) -> dict:
        return megatron_lm_args(_info(info), **sizes)


# ------------------------------------------------------------------------------- framework records
# transformers 5.12's Qwen3_5TextConfig / Qwen3_5MoeTextConfig class defaults of the fields Megatron-Bridge 0.6.2
# reads (the version Bridge runs with), and Bridge's provider / HF vision config classes
_BRIDGE_COMMON: dict[str, Any] = {
    "vocab_size": 248320, "num_attention_heads": 16, "head_dim": 256, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06, "initializer_range": 0.02, "attention_dropout": 0.0, "tie_word_embeddings": False,
    "attention_bias": False, "partial_rotary_factor": 0.25, "hidden_act": "silu",
    "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"},
    "bos_token_id": None, "eos_token_id": None, "linear_num_value_heads": 32, "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
}
BRIDGE_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_5": {**_BRIDGE_COMMON, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
                "num_key_value_heads": 4},
    "qwen3_5_moe": {**_BRIDGE_COMMON, "hidden_size": 2048, "num_hidden_layers": 40, "num_key_value_heads": 2,
                    "num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
                    "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 512},
}
BRIDGE_PROVIDERS = {"qwen3_5": "megatron.bridge.models.qwen_vl.qwen35_vl_provider.Qwen35VLModelProvider",
                    "qwen3_5_moe": "megatron.bridge.models.qwen_vl.qwen35_vl_provider.Qwen35VLMoEModelProvider"}
VISION_CONFIGS = {"qwen3_5": "transformers.models.qwen3_5.configuration_qwen3_5.Qwen3_5VisionConfig",
                  "qwen3_5_moe": "transformers.models.qwen3_5_moe.configuration_qwen3_5_moe.Qwen3_5MoeVisionConfig"}


def bridge_model_config(info: Qwen35Info, *, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                        make_vocab_size_divisible_by: int = 128, hf_model_id: str | None = None,
                        consumer: str | None = None, **_: Any) -> dict:
    """Bridge 0.6.2's ``Qwen35VLModelProvider`` / ``Qwen35VLMoEModelProvider`` as its Qwen3.5-VL bridges derive
    them: the language model's mapped fields (``mtp_num_hidden_layers`` -> ``mtp_num_layers``), Qwen3-Next's
    hybrid fields (``linear_attention_freq`` from ``layer_types``: 1 = Gated DeltaNet, 0 = attention), the GDN
    sizes, RoPE share and mRoPE sections, MoE and shared-expert settings, the top-level tie flag and token ids and
    the HF vision config in the model's dtype. ``head_dim``, ``hf_text_config`` and ``audio_token_id``, which the
    bridges set on the provider but which are not its fields (Bridge's own save leaves them out), are not written."""
    bc.check_consumer(info.family, consumer)
    raw = info.raw
    text = dict(raw.get("text_config") or {})
    view = bc.hf_view(text, BRIDGE_TEXT_DEFAULTS[info.family])
    dtype = bc.section_dtype(text, raw) or FLOAT32
    parameters = bc.rope(view)
    model: dict[str, Any] = {"_target_": BRIDGE_PROVIDERS[info.family],
                             **bc.provider_kwargs(view, dtype, divisible_by=make_vocab_size_divisible_by)}
    model.update(normalization="RMSNorm", gated_linear_unit=True, add_qkv_bias=bool(view.get("attention_bias")),
                 add_bias_linear=False, qk_layernorm=True, hidden_dropout=0.0, layernorm_zero_centered_gamma=True,
                 attention_output_gate=True, experimental_attention_variant="gated_delta_net",
                 linear_attention_freq=[int(t == "linear_attention") for t in info.layer_types],
                 linear_num_value_heads=view["linear_num_value_heads"],
                 rotary_percent=parameters.get("partial_rotary_factor", 0.25),
                 linear_conv_kernel_dim=view["linear_conv_kernel_dim"], linear_key_head_dim=view["linear_key_head_dim"],
                 linear_value_head_dim=view["linear_value_head_dim"],
                 linear_num_key_heads=view["linear_num_key_heads"])
    if model.get("mtp_num_layers"):
        model["mtp_loss_scaling_factor"] = 0.1
    if info.is_moe:
        model.update(moe_ffn_hidden_size=view["moe_intermediate_size"], num_moe_experts=view["num_experts"],
                     moe_router_topk=view["num_experts_per_tok"],
                     moe_shared_expert_intermediate_size=view["shared_expert_intermediate_size"],
                     moe_shared_expert_gate=True, moe_grouped_gemm=True,
                     moe_router_load_balancing_type="global_aux_loss", moe_router_pre_softmax=False,
                     moe_token_dispatcher_type="alltoall", moe_permute_fusion=True)
    vision = dict(raw.get("vision_config") or {})
    model.update(share_embeddings_and_output_weights=bool(raw.get("tie_word_embeddings", False)),
                 position_embedding_type="mrope",
                 vision_config=bc.hf_config_ref(VISION_CONFIGS[info.family], vision, dtype),
                 bos_token_id=view.get("bos_token_id"), eos_token_id=view.get("eos_token_id"),
                 vision_start_token_id=raw.get("vision_start_token_id", 248053),
                 vision_end_token_id=raw.get("vision_end_token_id", 248054),
                 image_token_id=raw.get("image_token_id", 248056), video_token_id=raw.get("video_token_id", 248057),
                 mrope_section=list(parameters.get("mrope_section", [11, 11, 10])))
    return {**model, **bc.parallel_fields(tp=tp, pp=pp, ep=ep, etp=etp, hf_model_id=hf_model_id)}


def megatron_lm_args(info: Qwen35Info, **sizes: Any) -> dict:
    """Megatron-LM's ``args`` for the language model: the GPT fields
    (:func:`vlconvert.models.gpt_table.megatron_lm_args`) plus megatron-core 0.19's Gated DeltaNet /
    gated-attention fields under their ``TransformerConfig`` names (Megatron-LM's parser derives its flags from
    them; Bridge's Megatron-LM reader copies them by name): ``experimental_attention_variant``,
    ``linear_attention_freq`` (1 = GDN layer, 0 = attention), the GDN sizes, ``attention_output_gate``,
    zero-centred norms (``apply_layernorm_1p``), the RoPE share (``rotary_percent``), the MTP depth, the shared
    expert."""
    from vlconvert.models.gpt_table import megatron_lm_args as gpt_args

    text = dict(info.raw.get("text_config") or {})
    args = gpt_args(info, text, qk_norm=True, qkv_bias=False, **sizes)
    args.update(experimental_attention_variant="gated_delta_net",
                linear_attention_freq=[int(t == "linear_attention") for t in info.layer_types],
                linear_conv_kernel_dim=info.conv_kernel, linear_key_head_dim=info.linear_key_head_dim,
                linear_value_head_dim=info.linear_value_head_dim, linear_num_key_heads=info.linear_key_heads,
                linear_num_value_heads=info.linear_value_heads, attention_output_gate=True, apply_layernorm_1p=True,
                layernorm_zero_centered_gamma=True,
                rotary_percent=bc.rope(text).get("partial_rotary_factor", 0.25),
                mtp_num_layers=info.mtp_layers or None)
    if info.is_moe:
        args.update(moe_shared_expert_intermediate_size=info.shared_intermediate, moe_shared_expert_gate=True)
    return args


def _info(info: ModelInfo) -> Qwen35Info:
    return info if isinstance(info, Qwen35Info) else load_config(info.raw)


def _skeleton(skeleton: BaseSkeleton) -> Skeleton:
    """A Qwen3.5 skeleton for any skeleton of this family (a neutral one gets the expert layouts its names say)."""
    if isinstance(skeleton, Skeleton):
        return skeleton
    return FAMILY.skeleton_for(skeleton.info, skeleton.tensors)


FAMILY = Qwen35Family()
