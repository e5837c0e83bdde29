"""Every output layout as one writer (one module per format, the mirror of :mod:`vlconvert.sources`).

:func:`target_named` is the one registry the engine asks: ``hf`` (:mod:`.hf`), ``dcp`` (:mod:`.dcp`), ``megatron``
(:mod:`.megatron`), ``torch_dist`` (:mod:`.torch_dist`). A new layout is one module with one
:class:`~vlconvert.targets.base.Target` instance named ``TARGET``, listed in :data:`TARGETS`.
"""

from __future__ import annotations

from vlconvert.errors import UserError
from vlconvert.targets.base import Target
from vlconvert.targets.dcp import TARGET as DCP
from vlconvert.targets.hf import TARGET as HF
from vlconvert.targets.megatron import TARGET as MEGATRON
from vlconvert.targets.torch_dist import TARGET as TORCH_DIST

TARGETS: dict[str, Target] = {t.name: t for t in (HF, DCP, MEGATRON, TORCH_DIST)}

__all__ = ["TARGETS", "Target", "target_named", "targets_taking"]


def target_named(name: str) -> Target:
    """The target writing layout ``name`` (one line naming the layouts otherwise)."""
    if name not in TARGETS:
        raise UserError(f"unknown target '{name}': use {', '.join(TARGETS)}")
    return TARGETS[name]


def targets_taking(option: str) -> list[str]:
    """The layouts a Conversion option shapes (in registry order)."""
    return [name for name, target in TARGETS.items() if option in target.options]
