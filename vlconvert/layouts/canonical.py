"""One read interface over every layout, in canonical naming, for ``verify``, ``inspect`` and converters.

Canonical naming = the Hugging Face on-disk names (``model.language_model.*``, ``model.visual.*``,
``lm_head.weight`` only when untied) with MoE experts in the **released** orientation
(``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]). Each layout provides a class with this
shape (``HFCanonical``, ``DCPCanonical``, ``MegatronCheckpoint``); ``vlconvert.verify.open_source``
picks the right one for a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class CanonicalSource(Protocol):
    """A checkpoint seen as canonical tensors, read one at a time."""

    layout: str  # "hf", "dcp" or "megatron"

    def names(self) -> list[str]:
        """Canonical names of every tensor the checkpoint holds."""
        ...

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Canonical shape and stored dtype of ``name``, from metadata only."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` in canonical orientation."""
        ...


def detect_layout(path: Path) -> str:
    """'hf', 'dcp' or 'megatron' from the files a folder holds (metadata only)."""
    path = Path(path)
    if (path / ".metadata").is_file() or any(path.glob("*.distcp")):
        return "dcp"
    if (path / "latest_checkpointed_iteration.txt").is_file() or any(path.glob("mp_rank_*")) \
            or (path / "release").is_dir() or any(path.glob("iter_*")):
        return "megatron"
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return "hf"
    return "unknown"
