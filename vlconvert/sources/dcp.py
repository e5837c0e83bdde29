"""PyTorch DCP folders (vlconvert's, FSDP2 training jobs') as a :class:`~vlconvert.sources.base.Source`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlconvert import buffers
from vlconvert.dtypes import DType
from vlconvert.errors import UsageError, UserError
from vlconvert.layouts.dcp import DCPReader
from vlconvert.layouts.filebytes import FileSpan
from vlconvert.lazy import torch
from vlconvert.models.base import Skeleton, expert_layout_of
from vlconvert.models.megatron_table import Src
from vlconvert.rowbytes import ByteRows
from vlconvert.sources.base import Source, read_spans, skeleton_for

WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module", "module"})
NON_MODEL_ROOTS = frozenset({"optimizer", "optim", "optimizers", "lr_scheduler", "scheduler", "dataloader",
                             "train_state", "extra_state", "rng_state", "rng", "args", "step"})


# --------------------------------------------------------------------------------------------- DCP
@dataclass
class DCPKeyMap:
    """How the keys of a DCP map onto a model's Hugging Face keys."""

    prefix: str
    mapped: dict[str, str] = field(default_factory=dict)  # HF key -> DCP key
    unexpected: list[str] = field(default_factory=list)
    dropped_non_model: int = 0
    dropped_non_tensor: int = 0


def strip_wrappers(key: str) -> str:
    """Remove wrapper components (``_orig_mod``, ``_checkpoint_wrapped_module``, ...) from a key."""
    return ".".join(p for p in key.split(".") if p not in WRAPPER_PARTS)


def map_dcp_keys(reader: DCPReader, known: set[str], prefix: str | None = None) -> DCPKeyMap:
    """Match DCP tensor keys to ``known`` HF keys: drop non-model state, strip wrappers, find the prefix."""
    candidates: dict[str, str] = {}
    dropped = 0
    for key in reader.tensors:
        clean = strip_wrappers(key)
        if clean.split(".", 1)[0] in NON_MODEL_ROOTS:
            dropped += 1
            continue
        candidates[clean] = key
    if prefix is None:
        votes: Counter[str] = Counter()
        for clean in candidates:
            parts = clean.split(".")
            for i in range(len(parts)):
                if ".".join(parts[i:]) in known:
                    votes[".".join(parts[:i]) + ("." if i else "")] += 1
                    break
        prefix = votes.most_common(1)[0][0] if votes else ""
    result = DCPKeyMap(prefix=prefix, dropped_non_model=dropped, dropped_non_tensor=len(reader.non_tensors))
    for clean, key in candidates.items():
        name = clean[len(prefix):] if clean.startswith(prefix) else None
        if name in known and name not in result.mapped:
            result.mapped[name] = key
        else:
            result.unexpected.append(key)
    return result


def stored_expert_layout(name: str, shape: tuple[int, ...], skeleton: Skeleton
                         ) -> tuple[str, tuple[int, ...] | None]:
    """Orientation of an expert tensor as a DCP stores it, and the 3-D shape to view it as when it is a
    2-D ``(E*in, out)`` view (MindSpeed-MM); square tensors are taken in the run-time layout."""
    if len(shape) == 3:
        return expert_layout_of(name, shape, skeleton, skeleton.runtime_experts), None
    other = "released" if skeleton.runtime_experts != "released" else "transformers5"
    for layout in (skeleton.runtime_experts, other):
        shape3 = skeleton.shape_in(name, layout)
        if tuple(shape) == (shape3[0] * shape3[1], shape3[2]):
            return layout, shape3
    raise UserError(f"'{name}' is stored with shape {list(shape)}, the config expects "
                    f"{list(skeleton.shape_in(name, skeleton.runtime_experts))} (either expert orientation)")


class DCPSource(Source):
    """A DCP folder (vlconvert's, or an FSDP2 training job's at any number of ranks).

    Optimizer and other non-model state is dropped (counted), wrapper components (``_orig_mod.``,
    ``_checkpoint_wrapped_module.``) are stripped and the key prefix is detected (``--prefix`` forces
    one). Row ranges read only the rows of the chunks they overlap, whatever the chunking.
    """

    layout = "dcp"
    dtype_from_config = True

    def __init__(self, folder: str | Path, config: str | Path | dict | None = None,
                 skeleton: Skeleton | None = None, assets_dir: str | Path | None = None,
                 prefix: str | None = None):
        self.folder = Path(folder)
        self.reader = DCPReader(self.folder)
        if skeleton is None:
            skeleton = skeleton_for(self.folder, config, assets_dir, [strip_wrappers(k) for k in self.reader.tensors])
        if skeleton is None:
            raise UsageError(f"'{folder}' is a DCP without config.json: pass --assets-dir (or --config)")
        self.skeleton = skeleton
        self.keys = map_dcp_keys(self.reader, set(skeleton.tensors), prefix)
        self.notes: list[str] = []
        output = skeleton.family.output
        self.tied_lm_head_dropped = skeleton.info.tied and output in self.keys.mapped
        self._mapped = {n: k for n, k in self.keys.mapped.items() if not (skeleton.info.tied and n == output)}
        self._experts: dict[str, tuple[str, tuple[int, ...] | None]] = {}
        # canonical name -> (DCP key, leading index, first row) where the DCP holds the model's run-time tensors
        self._runtime: dict[str, tuple[str, tuple[int, ...], int]] = {}
        runtime = skeleton.family.runtime_tensors(skeleton)
        if runtime is not None:
            keys = map_dcp_keys(self.reader, {t.name for t in runtime}, prefix)
            if len(keys.mapped) > len(self.keys.mapped):  # a transformers model's state dict (dcp.save)
                self._use_runtime(keys, runtime)

    def _use_runtime(self, keys: DCPKeyMap, runtime: list) -> None:
        """Read the canonical tensors out of the run-time ones (renamed, or experts fused by transformers)."""
        sk = self.skeleton
        output = sk.family.output
        self.keys = keys
        self.tied_lm_head_dropped = sk.info.tied and output in keys.mapped
        for rt in runtime:
            if rt.name not in keys.mapped or sk.info.tied and rt.name == output:
                continue
            offset = 0
            for name, start, stop in rt.rows:
                index, row = rt.locate(offset)
                self._runtime[name] = (keys.mapped[rt.name], index, row - start)
                offset += stop - start
        self._mapped = {n: where[0] for n, where in self._runtime.items()}
        self.notes.append("run-time names of the transformers model (its dcp.save) read back to the released ones")

    def names(self) -> list[str]:
        return [n for n in self.skeleton.tensors if n in self._mapped]

    def extra_names(self) -> list[str]:
        return list(self.keys.unexpected)

    def key(self, name: str) -> str:
        """The DCP key holding canonical tensor ``name`` (an unmapped key stands for itself)."""
        if name in self._mapped:
            return self._mapped[name]
        if name in self.reader.tensors:
            return name
        raise KeyError(name)

    def expert_layout(self, name: str) -> tuple[str, tuple[int, ...] | None]:
        """(stored orientation, 3-D view of a 2-D stored tensor or None) of an expert tensor."""
        if name not in self._experts:
            self._experts[name] = stored_expert_layout(name, self.reader.tensors[self.key(name)].shape,
                                                       self.skeleton)
        return self._experts[name]

    def spec(self, name: str) -> tuple[tuple[int, ...], DType]:
        entry = self.reader.tensors[self.key(name)]
        if name in self._runtime:
            return self.skeleton.shape_in(name, "released"), entry.dtype
        if name not in self._mapped:  # a tensor the model does not have
            return tuple(entry.shape), entry.dtype
        if self.skeleton.family.is_expert(name):
            return self.skeleton.shape_in(name, "released"), entry.dtype
        if entry.shape != self.skeleton.tensors[name].shape:
            raise UserError(f"'{entry.key}' has shape {list(entry.shape)} but config.json implies "
                            f"{list(self.skeleton.tensors[name].shape)}")
        return tuple(entry.shape), entry.dtype

    def nbytes(self, name: str) -> int:
        if name in self._runtime:
            return super().nbytes(name)
        return self.reader.tensors[self.key(name)].nbytes

    def _stored_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows of a stored tensor, reading only the rows of the chunks they overlap."""
        if not self.reader.tensors[key].shape:
            return self.reader.read(key)
        return self.reader.read_rows(key, start, stop)

    def read(self, name: str) -> torch.Tensor:
        if name not in self._mapped:
            return self.reader.read(self.key(name))
        return super().read(name)

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        if src.hf in self._runtime:
            key, index, first = self._runtime[src.hf]
            if not self.skeleton.tensors[src.hf].shape:
                return self.reader.read(key)
            return self.reader.read_rows(key, first + start, first + stop, index)
        key = self.key(src.hf)
        if src.expert is None:
            return self._stored_rows(key, start, stop)
        layout, view = self.expert_layout(src.hf)
        e = src.expert
        if view is None:
            block = self._stored_rows(key, e, e + 1)[0]
        else:  # MindSpeed's 2-D (E*in, out) view
            block = self._stored_rows(key, e * view[1], (e + 1) * view[1])
        matrix = block.t() if layout == "released" else block
        return buffers.contiguous(matrix[start:stop])

    def row_span(self, src: Src, start: int, stop: int) -> FileSpan | None:
        if src.hf in self._runtime:
            key, index, first = self._runtime[src.hf]
            if not self.skeleton.tensors[src.hf].shape:
                return None
            return self.reader.span(key, first + start, first + stop, index)
        key = self.key(src.hf)
        if not self.reader.tensors[key].shape:
            return None
        if src.expert is None:
            return self.reader.span(key, start, stop)
        layout, view = self.expert_layout(src.hf)
        if layout != "transformers5":  # stored [in, out]: Megatron's rows are columns here
            return None
        if view is None:
            return self.reader.span(key, start, stop, (src.expert,))
        first = src.expert * view[1]
        return self.reader.span(key, first + start, first + stop)

    def expert_span(self, name: str, expert: int, layout: str) -> FileSpan | None:
        stored, view = self.expert_layout(name)
        if stored != layout:
            return None
        key = self.key(name)
        if view is None:
            span = self.reader.span(key, expert, expert + 1)
            return None if span is None else span.reshape(span.shape[1:])
        return self.reader.span(key, expert * view[1], (expert + 1) * view[1])

    def row_bytes(self, src: Src, start: int, stop: int) -> ByteRows | None:
        if src.expert is not None and src.hf not in self._runtime and self.expert_layout(src.hf)[0] == "released":
            return self._turned_expert_rows(src, start, stop)  # stored [in, out]
        return super().row_bytes(src, start, stop)

    def expert_bytes(self, name: str, expert: int, layout: str) -> ByteRows | None:
        if self.expert_layout(name)[0] == layout:
            return self._stored_expert_bytes(name, expert)
        return super().expert_bytes(name, expert, layout)

    def _stored_expert_bytes(self, name: str, expert: int) -> ByteRows | None:
        """Expert ``expert`` of ``name`` as stored (a matrix), read from the chunks holding it; None if one does not."""
        key, view = self.key(name), self.expert_layout(name)[1]
        first, last = (expert, expert + 1) if view is None else (expert * view[1], (expert + 1) * view[1])
        block = read_spans(lambda r: self.reader.span(key, r, last), first, last)
        if block is None or view is not None:  # MindSpeed's 2-D view: the rows are the matrix
            return block
        return block.reshape(block.shape[1:])  # [1, in, out] -> [in, out]

    def expert(self, name: str, expert: int, layout: str) -> torch.Tensor:
        stored, view = self.expert_layout(name)
        if stored != layout:
            return super().expert(name, expert, layout)
        if view is None:
            return self._stored_rows(self.key(name), expert, expert + 1)[0]
        return self._stored_rows(self.key(name), expert * view[1], (expert + 1) * view[1])

    def close(self) -> None:
        self.reader.close()
        super().close()


