"""The one registry of model families, keyed by config.json's ``model_type`` (then ``architectures``).

Adding a family: write ``vlconvert/models/<family>.py`` with one :class:`~vlconvert.models.family.Family`
instance named ``FAMILY`` and add it to :data:`FAMILIES` below.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from vlconvert.errors import UserError
from vlconvert.models.base import ModelInfo, Skeleton, read_config_json
from vlconvert.models.family import Family
from vlconvert.models.qwen2_5vl import FAMILY as QWEN2_5_VL
from vlconvert.models.qwen3_5 import FAMILY as QWEN3_5
from vlconvert.models.qwen3_text import FAMILY as QWEN3_TEXT
from vlconvert.models.qwen3vl import FAMILY as QWEN3_VL

FAMILIES: tuple[Family, ...] = (QWEN3_VL, QWEN3_TEXT, QWEN2_5_VL, QWEN3_5)


def supported_model_types() -> list[str]:
    """Every config.json ``model_type`` vlconvert converts."""
    return [t for f in FAMILIES for t in f.model_types]


def _unsupported(what: str) -> UserError:
    return UserError(f"{what} is not supported: vlconvert handles {', '.join(supported_model_types())}")


def family_named(model_type: str) -> Family:
    """The family that handles a config ``model_type`` (one-line UserError naming the supported ones)."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise _unsupported(f"model_type '{model_type}'")


def family_of(config: dict | str | Path) -> Family:
    """The family of a config.json (dict, file or folder): by ``model_type``, else by ``architectures``."""
    raw = config if isinstance(config, dict) else read_config_json(config)
    model_type = raw.get("model_type")
    if model_type is not None:
        return family_named(str(model_type))
    architectures = raw.get("architectures") or []
    if isinstance(architectures, list):
        for arch in architectures:
            for family in FAMILIES:
                if arch in family.architectures:
                    return family
        if architectures:
            raise _unsupported(f"architecture '{architectures[0]}'")
    raise UserError("the config has no model_type: is it a model's config.json? vlconvert handles "
                    f"{', '.join(supported_model_types())}")


def load_config(path_or_dict: str | Path | dict) -> ModelInfo:
    """Read any supported family's config.json (dict, file or folder) into :class:`ModelInfo`."""
    raw = path_or_dict if isinstance(path_or_dict, dict) else read_config_json(path_or_dict)
    family = family_of(raw)
    if raw.get("model_type") is None:  # detected by architectures: the family reads model_type
        raw = {**raw, "model_type": family.model_types[0]}
        for arch in raw.get("architectures") or []:
            if arch in family.architectures:
                raw["model_type"] = family.model_types[family.architectures.index(arch)]
    return family.load_config(raw)


def build_skeleton(config: str | Path | dict | ModelInfo) -> Skeleton:
    """Every canonical key, shape and dtype of any supported model, from its config alone."""
    info = config if isinstance(config, ModelInfo) else load_config(config)
    return family_named(info.family).build_skeleton(info)


# ------------------------------------------------------------------ lookups where no config is known
def any_is_expert(name: str) -> bool:
    """True when ``name`` is a fused 3-D expert tensor of some family (a folder read without its config)."""
    return any(family.is_expert(name) for family in FAMILIES)


def guess_family(names: Iterable[str]) -> Family | None:
    """The family whose embedding (and vision tower, or none) a set of canonical names holds, or None."""
    held = set(names)
    for family in FAMILIES:  # a family whose own tensors are there first (same embedding names elsewhere)
        if family.signature and family.embed in held and any(family.signature in n for n in held):
            return family
    for family in FAMILIES:
        if family.embed in held and any(family.is_vision(n) for n in held) == (family.hf_vision_prefix is not None):
            return family
    return next((family for family in FAMILIES if family.embed in held), None)


def megatron_language_prefixes() -> tuple[str, ...]:
    """Every prefix a family's Megatron language model has (``language_model.``, ``""``), longest first."""
    return tuple(sorted({family.megatron_prefixes.language for family in FAMILIES}, key=len, reverse=True))


def known_sizes() -> dict[str, dict]:
    """Every family's released sizes: name -> the :class:`ModelInfo` fields that tell them apart."""
    return {name: dims for family in FAMILIES for name, dims in family.known_sizes.items()}


def measured_runtime_experts_layout() -> str:
    """The fused-expert orientation the installed transformers holds, measured on a tiny meta-device model of the
    first family with fused experts (imports transformers' model code: seconds)."""
    family = next(f for f in FAMILIES if f.transposed_experts)
    return family.measured_runtime_experts_layout()
