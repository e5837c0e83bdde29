"""The :class:`Family` interface: what one model-family module provides to every layer above ``models/``.

A family module (``vlconvert/models/<family>.py``) defines one subclass of :class:`Family` and one instance of
it, which :mod:`vlconvert.models.registry` lists. It provides, from ``config.json`` alone and without
importing transformers:

* **detection**: ``model_types`` and ``architectures`` it handles (the registry matches ``model_type`` first);
* **config**: :meth:`Family.load_config` (the raw dict -> :class:`~vlconvert.models.base.ModelInfo`, one-line
  :class:`~vlconvert.errors.UserError` on a bad field);
* **skeleton**: :meth:`Family.skeleton_shapes`, every canonical tensor (the names released checkpoints use
  on disk, i.e. what transformers' ``save_pretrained`` writes) and its shape, in the model's registration
  order; :meth:`Family.build_skeleton` wraps it with dtypes;
* **roles**: ``embed`` / ``output`` names, :meth:`Family.is_expert` (fused 3-D expert tensors whose
  orientation differs between transformers 4 and 5), :meth:`Family.roles` (tied?, experts and how they are
  stored, MTP tensors, vision tensors), :meth:`Family.canonical_name` (other spellings of a canonical name,
  e.g. transformers 5 run-time names -> released names);
* **Megatron**: ``megatron_prefixes`` (language model / vision tower prefixes of the Megatron model),
  :meth:`Family.megatron_params` (the HF <-> Megatron parameter table with split rules, as
  :class:`~vlconvert.models.megatron_table.Param` rows), :meth:`Family.layer_of` and :meth:`Family.stage_of`
  (pipeline placement of canonical tensors), :meth:`Family.check_tensor_parallel`.

Everything returned is plain data; the machinery that uses it (rank plans, splits, pipeline balance) lives in
:mod:`vlconvert.models.megatron_table` and is family-neutral.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vlconvert.dtypes import BFLOAT16
from vlconvert.errors import UserError
from vlconvert.lazy import torch
from vlconvert.models.base import ModelInfo, RuntimeTensor, Skeleton, TensorSpec, runtime_experts_layout
from vlconvert.rowbytes import ByteRows

if TYPE_CHECKING:
    from vlconvert.models.megatron_table import Param

SPECS = ("te", "local")
EXPERT_STYLES = ("grouped", "sequential")
# how a family's released checkpoints store MoE experts
EXPERT_STORAGE = ("none", "fused", "per_expert")


@dataclass(frozen=True)
class MegatronPrefixes:
    """Where the parts of the model sit in the Megatron model's state dict.

    ``language``: prefix of the GPT language model (``language_model.`` in Megatron-Bridge's VL models, ``""``
    for Megatron-LM's GPTModel). ``vision``: prefix of the vision tower (``vision_model.`` for a Megatron-Core
    ViT, ``visual.`` where Megatron-Bridge keeps the HF module itself), ``None`` for a text model.
    """

    language: str
    vision: str | None = None


@dataclass(frozen=True)
class Roles:
    """What each canonical tensor of one model is for (names are canonical HF names)."""

    embed: str  # input embedding [V, H]
    output: str  # output layer [V, H]; in the skeleton also when tied
    tied: bool  # output layer = embedding (not stored in HF folders)
    expert_storage: str  # one of EXPERT_STORAGE
    experts: tuple[str, ...]  # every routed-expert tensor (fused 3-D or per-expert 2-D)
    mtp: tuple[str, ...]  # multi-token-prediction tensors (released checkpoints may carry them)
    vision: tuple[str, ...]  # the vision tower and its merger


class Family:
    """One model family: config -> skeleton, tensor roles, HF <-> Megatron table. Subclass per family module.

    Class attributes every family sets: ``name`` (registry key), ``model_types``, ``architectures``,
    ``megatron_prefixes``, ``embed``, ``output``; ``expert_storage`` and ``vision_tensor_parallel`` where they
    differ from the defaults. Methods without a default raise NotImplementedError.
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    architectures: ClassVar[tuple[str, ...]]
    megatron_prefixes: ClassVar[MegatronPrefixes]
    embed: ClassVar[str]
    output: ClassVar[str] = "lm_head.weight"
    expert_storage: ClassVar[str] = "none"
    vision_tensor_parallel: ClassVar[bool] = False  # the Megatron vision tower is TP-split (heads must divide)
    layer_pattern: ClassVar[re.Pattern[str]]  # group 1: the decoder layer number of a canonical name
    hf_vision_prefix: ClassVar[str | None] = None  # canonical prefix of the vision tower (None: a text model)
    known_sizes: ClassVar[dict[str, dict]] = {}  # released sizes: name -> the ModelInfo fields telling them apart
    transposed_experts: ClassVar[bool] = False  # fused experts' orientation differs between transformers 4 and 5
    signature: ClassVar[str | None] = None  # a name fragment only this family's tensors have (folders without config)
    stored_forms: ClassVar[bool] = False  # checkpoints store some tensors in several forms (skeleton_for picks)
    plan_from_table: ClassVar[bool] = False  # `plan` counts rank bytes from the Megatron table, not split rules
    qk_norm: ClassVar[bool] = True  # the attention has q/k norms (Megatron's qk_layernorm)
    qkv_bias: ClassVar[bool] = False  # the attention's q/k/v projections have biases (Megatron's add_qkv_bias)

    def __repr__(self) -> str:
        return f"<Family {self.name}>"

    # -------------------------------------------------------------------------------------- config
    def load_config(self, raw: dict) -> ModelInfo:
        """The config.json dict -> :class:`ModelInfo` (one-line UserError for a missing or bad field)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ skeleton
    def skeleton_shapes(self, info: ModelInfo, runtime_experts: str) -> dict[str, tuple[int, ...]]:
        """Every canonical tensor name and its shape, in registration order (fused experts in
        ``runtime_experts`` orientation)."""
        raise NotImplementedError

    def build_skeleton(self, info: ModelInfo) -> Skeleton:
        """Every canonical key, shape and dtype of the model (pure Python: no model is built)."""
        runtime = runtime_experts_layout()
        try:
            shapes = self.skeleton_shapes(info, runtime)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"cannot read a {info.family} model's shapes from this config: {exc}") from exc
        dtype = info.dtype or BFLOAT16
        return Skeleton(info=info, tensors={n: TensorSpec(s, dtype) for n, s in shapes.items()},
                        runtime_experts=runtime)

    # --------------------------------------------------------------------------------------- roles
    def is_expert(self, name: str) -> bool:
        """True for fused 3-D expert tensors (their orientation differs between transformers 4 and 5)."""
        return False

    def is_routed_expert(self, name: str) -> bool:
        """True for any routed-expert tensor (fused or per-expert)."""
        return self.is_expert(name)

    def is_mtp(self, name: str) -> bool:
        """True for multi-token-prediction tensors."""
        return False

    def is_vision(self, name: str) -> bool:
        """True for the vision tower and its merger."""
        return False

    def roles(self, skeleton: Skeleton) -> Roles:
        """The role of each canonical tensor of ``skeleton``."""
        names = list(skeleton.tensors)
        return Roles(embed=self.embed, output=self.output, tied=skeleton.info.tied,
                     expert_storage=self.expert_storage if skeleton.info.is_moe else "none",
                     experts=tuple(n for n in names if self.is_routed_expert(n)),
                     mtp=tuple(n for n in names if self.is_mtp(n)),
                     vision=tuple(n for n in names if self.is_vision(n)))

    @property
    def vision_patch(self) -> str | None:
        """The vision tower's patch embedding (its rows: the vision width), or None for a text model."""
        return None if self.hf_vision_prefix is None else f"{self.hf_vision_prefix}patch_embed.proj.weight"

    def model_type_for(self, is_moe: bool) -> str:
        """The config ``model_type`` of this family's dense or MoE variant."""
        return self.model_types[-1] if is_moe and len(self.model_types) > 1 else self.model_types[0]

    def text_config(self, raw: dict) -> dict:
        """The language model's section of a config dict (``text_config``, else the top level)."""
        text = raw.get("text_config")
        return text if isinstance(text, dict) and text else raw

    def runtime_tensors(self, skeleton: Skeleton) -> list[RuntimeTensor] | None:
        """The installed transformers model's state dict where it differs from the canonical tensors (run-time
        names, experts fused at load): what ``dcp.save`` of the model writes and ``dcp.load`` asks for. None
        when the canonical names are the run-time ones."""
        return None

    def canonical_name(self, name: str) -> str:
        """The canonical name for another spelling of it (e.g. a transformers 5 run-time name); else ``name``."""
        return name

    # ------------------------------------------------------------------------------------ megatron
    def megatron_params(self, skeleton: Skeleton, *, spec: str = "te", experts: str = "grouped",
                        padded_vocab: int | None = None) -> list[Param]:
        """Every Megatron parameter in state-dict order, globally numbered, with the HF rows it is made of
        and its split rule."""
        raise NotImplementedError

    def to_megatron_value(self, p: object, tensor: torch.Tensor) -> torch.Tensor:
        """Apply ``p.value_op`` (a :class:`~vlconvert.models.megatron_table.Param` or ``RankTensor``) going
        HF -> Megatron; the families without value ops return ``tensor``."""
        return tensor

    def to_hf_value(self, p: object, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_megatron_value`."""
        return tensor

    def to_megatron_value_bytes(self, p: object, rows: ByteRows) -> ByteRows | None:
        """:meth:`to_megatron_value` on rows held as bytes (no torch), the same bytes; None where the family has no
        byte form of ``p``'s value op (the caller then computes it with torch)."""
        return rows if getattr(p, "value_op", None) is None else None

    def to_hf_value_bytes(self, p: object, rows: ByteRows) -> ByteRows | None:
        """:meth:`to_hf_value` on rows held as bytes, as :meth:`to_megatron_value_bytes`."""
        return rows if getattr(p, "value_op", None) is None else None

    def source_shape(self, skeleton: Skeleton, src: object) -> tuple[int, ...]:
        """Shape of a source matrix (``Src``): a whole tensor, or one expert of a fused one as ``[out, in]``."""
        shape = skeleton.shape_in(src.hf, "released")  # type: ignore[attr-defined]
        if src.expert is None:  # type: ignore[attr-defined]
            return shape
        return (shape[2], shape[1])  # released [E, H, 2I] -> [2I, H]; [E, I, H] -> [H, I]

    def is_stacked_expert(self, name: str) -> bool:
        """True for a fused 3-D expert tensor that the Megatron table reads one expert at a time."""
        return self.is_expert(name)

    def skeleton_for(self, info: ModelInfo, names: object) -> Skeleton:
        """The skeleton of a checkpoint holding ``names`` (families with several stored forms pick theirs)."""
        return self.build_skeleton(info)

    def layer_of(self, name: str) -> int | None:
        """The decoder layer of a canonical name, or None."""
        m = self.layer_pattern.match(name)
        return int(m.group(1)) if m else None

    def stage_of(self, name: str) -> str:
        """Pipeline placement of a canonical tensor: ``first`` (vision tower, embedding), ``layer`` or
        ``last`` (final norm, output layer, MTP)."""
        if self.layer_of(name) is not None:
            return "layer"
        if name == self.embed or self.is_vision(name):
            return "first"
        return "last"

    def measured_runtime_experts_layout(self) -> str:
        """Fused-expert orientation of the installed transformers, measured on a tiny meta-device model."""
        raise NotImplementedError

    # ------------------------------------------------------------------------- framework records
    def bridge_model_config(self, info: ModelInfo, **sizes: object) -> dict:
        """The ``model:`` section of a Megatron-Bridge ``run_config.yaml`` (one-line error where not known)."""
        raise UserError(f"writing Megatron-Bridge's run_config.yaml for {info.family} is not supported: "
                        "use --for mbridge or --for megatron-lm")

    def megatron_lm_args(self, info: ModelInfo, **sizes: object) -> dict:
        """Megatron-LM's ``args`` fields for the language model (``pretrain_gpt.py`` flags)."""
        from vlconvert.models.gpt_table import megatron_lm_args

        return megatron_lm_args(info, self.text_config(info.raw), qk_norm=self.qk_norm, qkv_bias=self.qkv_bias,
                                **sizes)

    def check_tensor_parallel(self, info: ModelInfo, tp: int) -> None:
        """Refuse a TP size the model's heads do not allow (one line)."""
        if info.heads % tp:
            raise UserError(f"--tp {tp} must divide the {info.heads} attention heads")
        if info.kv_heads % tp and tp % info.kv_heads:
            raise UserError(f"--tp {tp} must be a multiple or a divisor of the {info.kv_heads} KV groups")
        if self.vision_tensor_parallel and info.vision_heads % tp:
            raise UserError(f"--tp {tp} must divide the {info.vision_heads} vision attention heads "
                            "(the ViT is TP-sharded like the language model)")
