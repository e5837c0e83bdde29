"""One module per model family, found through one registry keyed by config.json (:mod:`vlconvert.models.registry`).

- :mod:`vlconvert.models.family`: the :class:`Family` interface (what a family module provides);
- :mod:`vlconvert.models.base`: family-neutral :class:`ModelInfo`, :class:`Skeleton`, config reading;
- :mod:`vlconvert.models.megatron_table`: family-neutral Megatron rank plans and split rules;
- :mod:`vlconvert.models.gpt_table`: the Qwen-style GPT language model's Megatron rows, shared by families;
- one module per family: ``qwen3vl`` (+ ``qwen3vl_megatron``), ``qwen3_text`` (Qwen3, Qwen3-MoE), ``qwen2_5vl``.
"""

from vlconvert.models.base import ModelInfo, Skeleton
from vlconvert.models.family import Family, MegatronPrefixes, Roles
from vlconvert.models.registry import FAMILIES, build_skeleton, family_named, family_of, load_config

__all__ = ["FAMILIES", "Family", "MegatronPrefixes", "ModelInfo", "Roles", "Skeleton", "build_skeleton",
           "family_named", "family_of", "load_config"]
