"""A Hugging Face folder seen as a :class:`~vlconvert.layouts.canonical.CanonicalSource`.

On-disk HF names already are the canonical names; the only thing to undo is the expert orientation:
folders written by transformers 5 ``save_pretrained`` may hold ``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I], while canonical is the released [E, H, 2I] / [E, I, H]. The orientation of
each stored expert tensor is decided from its shape against the config's skeleton (or, without a
config, against the hidden size read from the embedding's shape).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlconvert.errors import UserError
from vlconvert.layouts.hf import HFCheckpoint
from vlconvert.models.qwen3vl import EMBED, Skeleton, build_skeleton, convert_expert, expert_layout_of, is_expert


class HFCanonical:
    """Canonical, lazy view of a Hugging Face safetensors folder (headers at open, data on ``read``)."""

    layout = "hf"

    def __init__(self, folder: str | Path, config: str | Path | dict | None = None,
                 experts_layout: str | None = None, skeleton: Skeleton | None = None):
        """``config``: a config.json (default: the folder's own, if any); ``experts_layout``: a hint
        for expert tensors whose orientation cannot be told from their shape (square dims)."""
        self.checkpoint = HFCheckpoint(folder)
        self.folder = self.checkpoint.folder
        if skeleton is None:
            if config is None and (self.folder / "config.json").is_file():
                config = self.folder / "config.json"
            skeleton = build_skeleton(config) if config is not None else None
        self.skeleton = skeleton
        self.hint = experts_layout
        self._layouts: dict[str, str] = {}

    def names(self) -> list[str]:
        """Every tensor the folder holds (its own names are canonical)."""
        return sorted(self.checkpoint.tensors)

    def stored_layout(self, name: str) -> str | None:
        """'released' or 'transformers5' for an expert tensor as stored on disk; None for others."""
        if not is_expert(name):
            return None
        if name not in self._layouts:
            self._layouts[name] = self._decide(name)
        return self._layouts[name]

    def _decide(self, name: str) -> str:
        shape = self.checkpoint.tensors[name].shape
        if len(shape) != 3:
            raise UserError(f"'{self.folder}': expert tensor '{name}' has shape {list(shape)}, expected 3 dims")
        if self.skeleton is not None and name in self.skeleton.tensors:
            return expert_layout_of(name, shape, self.skeleton, self.hint)
        embed = self.checkpoint.tensors.get(EMBED)
        if embed is None:
            if self.hint:
                return self.hint
            raise UserError(f"'{self.folder}': cannot tell the orientation of '{name}' without a config "
                            "or an embedding: pass --config")
        hidden = embed.shape[1]
        h_axis = 1 if name.endswith("gate_up_proj") else 2  # where H sits in the released layout
        other = 3 - h_axis
        if shape[h_axis] == hidden and shape[other] != hidden:
            return "released"
        if shape[other] == hidden and shape[h_axis] != hidden:
            return "transformers5"
        return self.hint or "released"

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Canonical shape (released expert orientation) and stored dtype, from the header."""
        info = self.checkpoint.tensors[name]
        shape = info.shape
        if self.stored_layout(name) == "transformers5":
            shape = (shape[0], shape[2], shape[1])
        return shape, info.dtype

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor in canonical orientation."""
        tensor = self.checkpoint.read(name)
        layout = self.stored_layout(name)
        if layout is not None:
            tensor = convert_expert(tensor, layout, "released").contiguous()
        return tensor

    def nbytes(self, name: str) -> int:
        """Stored bytes of ``name``."""
        return self.checkpoint.tensors[name].nbytes

    def close(self) -> None:
        self.checkpoint.close()
