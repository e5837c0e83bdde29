"""Hugging Face safetensors folders as a :class:`~vlconvert.sources.base.Source`."""

from __future__ import annotations

from pathlib import Path

from vlconvert import buffers
from vlconvert.dtypes import DType
from vlconvert.errors import UserError
from vlconvert.layouts.filebytes import FileSpan
from vlconvert.layouts.hf import HFCheckpoint
from vlconvert.lazy import torch
from vlconvert.models.base import Skeleton, expert_layout_of, read_config_json
from vlconvert.models.megatron_table import Src
from vlconvert.models.registry import any_is_expert, family_named, guess_family, load_config
from vlconvert.rowbytes import ByteRows
from vlconvert.sources.base import Source


def _skeleton_of(config: str | Path | dict, names: object) -> Skeleton:
    """The skeleton of the checkpoint holding ``names`` (a family with several stored forms picks its own)."""
    info = load_config(config)
    return family_named(info.family).skeleton_for(info, names)


# ---------------------------------------------------------------------------------------------- HF
class HFSource(Source):
    """A Hugging Face safetensors folder. Its names are canonical; experts may be stored either way
    (transformers 5 ``save_pretrained`` writes [E, 2I, H] / [E, H, I])."""

    layout = "hf"

    def __init__(self, folder: str | Path, config: str | Path | dict | None = None,
                 skeleton: Skeleton | None = None, experts_layout: str | None = None):
        self.checkpoint = HFCheckpoint(folder)
        self.folder = self.checkpoint.folder
        if skeleton is None:
            if config is None and (self.folder / "config.json").is_file():
                config = self.folder / "config.json"
            skeleton = _skeleton_of(config, self.checkpoint.tensors) if config is not None else None
        self.skeleton = skeleton
        self.hint = experts_layout
        if experts_layout is None and config is not None and not isinstance(config, dict):
            raw = read_config_json(config if Path(config).is_file() else Path(config) / "config.json")
            self.hint = "transformers5" if str(raw.get("transformers_version", "")).startswith("5") else "released"
        self.notes: list[str] = []
        self._layouts: dict[str, str] = {}
        self._expert_cache: tuple[Src, torch.Tensor] | None = None
        files = {f: i for i, f in enumerate(self.checkpoint.shards)}
        self._where = {n: (files[t.file], t.start) for n, t in self.checkpoint.tensors.items()}

    def names(self) -> list[str]:
        held = self.checkpoint.tensors
        if self.skeleton is None:
            return sorted(held)
        return [n for n in self.skeleton.tensors if n in held]

    def extra_names(self) -> list[str]:
        if self.skeleton is None:
            return []
        return [n for n in self.checkpoint.tensors if n not in self.skeleton.tensors]

    def location(self, name: str) -> tuple[int, int]:
        return self._where[name]

    def stored_layout(self, name: str) -> str | None:
        """'released' or 'transformers5' for an expert tensor as stored on disk; None for others."""
        expert = self.skeleton.family.is_expert(name) if self.skeleton is not None else any_is_expert(name)
        if not expert:
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
        family = guess_family(self.checkpoint.tensors)
        embed = self.checkpoint.tensors.get(family.embed) if family is not None else None
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

    def spec(self, name: str) -> tuple[tuple[int, ...], DType]:
        info = self.checkpoint.tensors[name]
        shape = info.shape
        if self.stored_layout(name) == "transformers5":
            shape = (shape[0], shape[2], shape[1])
        return tuple(shape), info.dtype

    def nbytes(self, name: str) -> int:
        return self.checkpoint.tensors[name].nbytes

    def expert(self, name: str, expert: int, layout: str) -> torch.Tensor:
        if self.stored_layout(name) == layout:
            return self.checkpoint.read_rows(name, expert, expert + 1)[0]
        return super().expert(name, expert, layout)

    def expert_span(self, name: str, expert: int, layout: str) -> FileSpan | None:
        if self.stored_layout(name) != layout:
            return None
        span = self.checkpoint.span(name, expert, expert + 1)
        return span.reshape(span.shape[1:])

    def row_span(self, src: Src, start: int, stop: int) -> FileSpan | None:
        if src.expert is not None:
            if self.stored_layout(src.hf) != "transformers5":
                return None
            return self.expert_span(src.hf, src.expert, "transformers5").rows(start, stop)
        if not self.checkpoint.tensors[src.hf].shape:
            return None
        return self.checkpoint.span(src.hf, start, stop)

    def row_bytes(self, src: Src, start: int, stop: int) -> ByteRows | None:
        if src.expert is None:
            return self.checkpoint.read_row_bytes(src.hf, start, stop)
        if self.stored_layout(src.hf) == "released":  # stored [in, out]
            return self._turned_expert_rows(src, start, stop)
        return super().row_bytes(src, start, stop)  # transformers5: the stored rows

    def expert_bytes(self, name: str, expert: int, layout: str) -> ByteRows | None:
        if self.stored_layout(name) == layout:
            return self._stored_expert_bytes(name, expert)
        return super().expert_bytes(name, expert, layout)

    def _stored_expert_bytes(self, name: str, expert: int) -> ByteRows | None:
        block = self.checkpoint.read_row_bytes(name, expert, expert + 1)
        return block.reshape(block.shape[1:])

    def _expert(self, src: Src) -> torch.Tensor:
        if self._expert_cache is not None and self._expert_cache[0] == src:
            return self._expert_cache[1]
        block = self.checkpoint.read_rows(src.hf, src.expert, src.expert + 1)[0]
        # released stores [in, out] per expert; Megatron's orientation is [out, in]
        matrix = buffers.transposed(block) if self.stored_layout(src.hf) == "released" else block
        self._expert_cache = (src, matrix)
        return matrix

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        if src.expert is not None:
            return self._expert(src)[start:stop]
        info = self.checkpoint.tensors[src.hf]
        if not info.shape:
            return self.checkpoint.read(src.hf)
        return self.checkpoint.read_rows(src.hf, start, stop)

    def read(self, name: str) -> torch.Tensor:
        tensor = self.checkpoint.read(name)
        if self.stored_layout(name) == "transformers5":
            tensor = tensor.transpose(1, 2).contiguous()
        return tensor

    def close(self) -> None:
        self.checkpoint.close()
        super().close()


