"""The :class:`Source` interface every reader implements, and what they share."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

from vlconvert import buffers, rowbytes
from vlconvert.dtypes import DType, element_size
from vlconvert.errors import UserError
from vlconvert.layouts.filebytes import FileSpan
from vlconvert.layouts.hf import parse_size, plan_shards
from vlconvert.lazy import torch
from vlconvert.models.base import ModelInfo, Skeleton
from vlconvert.models.megatron_table import Src, source_shape
from vlconvert.models.registry import any_is_expert, family_named, load_config
from vlconvert.publish import note_input, open_input
from vlconvert.rowbytes import ByteRows

DEFAULT_GROUP_BYTES = parse_size("5GB")  # how non-HF sources are grouped, as an HF writer would shard them


def read_spans(span_at: Callable[[int], FileSpan | None], start: int, stop: int) -> ByteRows | None:
    """Rows ``start:stop`` read from the file spans holding them in turn (``span_at(row)``: the span from ``row``,
    which may end early, where a chunk ends), or None if a row lies in no span."""
    parts: list[ByteRows] = []
    r = start
    while r < stop:
        span = span_at(r)
        if span is None or not span.shape or span.shape[0] <= 0:
            return None
        with open_input(span.path) as f:
            parts.append(rowbytes.read(f, span.offset, span.shape, span.dtype,
                                       f"'{span.path}' is truncated: ended while reading tensor data"))
        r += span.shape[0]
    return rowbytes.concat_rows(parts) if parts else None


def preview(keys: list[str]) -> str:
    """``'a' and 3 more``."""
    return f"'{keys[0]}'" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")


class Source:
    """A checkpoint seen as canonical tensors (see the module docstring). Subclasses fill in the rest."""

    layout = ""
    dtype_from_config = False  # --dtype auto writes the config's dtype (training jobs keep fp32 master weights)
    folder: Path
    skeleton: Skeleton | None
    notes: list[str]

    def names(self) -> list[str]:
        """Canonical names of every model tensor held (skeleton order when a skeleton is known)."""
        raise NotImplementedError

    def extra_names(self) -> list[str]:
        """Tensors held that the model does not have (their own names)."""
        return []

    def spec(self, name: str) -> tuple[tuple[int, ...], DType]:
        """Canonical shape and stored dtype of ``name``, from metadata only."""
        raise NotImplementedError

    def dtype(self, src: Src) -> DType:
        """Stored dtype of a source matrix."""
        return self.spec(src.hf)[1]

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a source matrix (an expert in Megatron's [out, in] orientation)."""
        raise NotImplementedError

    def row_span(self, src: Src, start: int, stop: int) -> FileSpan | None:
        """Where :meth:`rows` ``start:stop`` lie verbatim in a file, for a writer to copy them file to
        file: the span may stop before ``stop`` (rows ``start:start+len``, where one file piece ends);
        None when row ``start`` must be read (assembled, transposed, dequantized or merged)."""
        return None

    def row_bytes(self, src: Src, start: int, stop: int) -> ByteRows | None:
        """Rows ``start:stop`` of a source matrix as bytes in its stored dtype, put together without torch (gathered
        from several places, or an expert turned to ``[out, in]``), or None when that needs arithmetic or the
        reader has no byte path (the caller then uses :meth:`rows`). Here: the rows read from the
        :meth:`row_span` pieces that hold them (a DCP tensor cut in row chunks), None if a row has none."""
        return read_spans(lambda r: self.row_span(src, r, stop), start, stop)

    _turned: tuple[Src, ByteRows] | None = None  # the last expert turned to [out, in] by _turned_expert_rows

    def _stored_expert_bytes(self, name: str, expert: int) -> ByteRows | None:
        """Expert ``expert`` of fused tensor ``name`` as the reader stores it (one matrix), as bytes; None where the
        reader cannot (then nothing is turned as bytes)."""
        return None

    def _turned_expert_rows(self, src: Src, start: int, stop: int) -> ByteRows | None:
        """Rows ``start:stop`` of expert ``src`` in Megatron's ``[out, in]``, turned as bytes from the ``[in, out]``
        matrix the reader stores. The turned matrix is kept until another expert is asked for: a writer asks for
        one expert's rows block after block."""
        if self._turned is None or self._turned[0] != src:
            self._turned = None  # one matrix held at a time
            stored = self._stored_expert_bytes(src.hf, src.expert)
            if stored is None:
                return None
            self._turned = (src, rowbytes.transposed(stored))
        return self._turned[1].rows(start, stop)

    def expert_bytes(self, name: str, expert: int, layout: str) -> ByteRows | None:
        """:meth:`expert` as bytes in the stored dtype without torch, or None (see :meth:`row_bytes`)."""
        src = Src(name, expert)
        matrix = self.row_bytes(src, 0, self.matrix_shape(src)[0])
        if matrix is None or layout == "transformers5":
            return matrix
        return rowbytes.transposed(matrix)

    def expert_span(self, name: str, expert: int, layout: str) -> FileSpan | None:
        """Where :meth:`expert` lies verbatim in a file (shape: the matrix), or None."""
        if layout != "transformers5":  # Megatron's [out, in]: the rows of the source matrix
            return None
        src = Src(name, expert)
        rows = self.matrix_shape(src)[0]
        span = self.row_span(src, 0, rows)
        return span if span is not None and span.shape[0] == rows else None

    def matrix_shape(self, src: Src) -> tuple[int, ...]:
        """Shape of a source matrix (a whole tensor, or one expert as [out, in])."""
        shape = self.spec(src.hf)[0]
        return shape if src.expert is None else (shape[2], shape[1])

    def expert(self, name: str, expert: int, layout: str) -> torch.Tensor:
        """Expert ``expert`` of fused tensor ``name`` as a contiguous matrix in ``layout``: ``released``
        ([in, out]: [H, 2I] or [I, H]) or ``transformers5`` (Megatron's [out, in]). Readers that store
        the requested orientation return the stored bytes without transposing."""
        src = Src(name, expert)
        matrix = self.rows(src, 0, self.matrix_shape(src)[0])
        return buffers.contiguous(matrix if layout == "transformers5" else matrix.t())

    def read_expert(self, name: str, expert: int) -> torch.Tensor:
        """Expert ``expert`` of ``name`` in the released orientation ([H, 2I] or [I, H])."""
        src = Src(name, expert)
        return buffers.transposed(self.rows(src, 0, self.matrix_shape(src)[0]))

    def read(self, name: str) -> torch.Tensor:
        """The whole canonical tensor ``name``."""
        shape = self.spec(name)[0]
        if self.skeleton.family.is_expert(name) if self.skeleton is not None else any_is_expert(name):
            return torch.stack([self.read_expert(name, e) for e in range(shape[0])])
        return self.rows(Src(name), 0, shape[0]) if shape else self.rows(Src(name), 0, 1)

    def nbytes(self, name: str) -> int:
        """Stored bytes of ``name``."""
        shape, dtype = self.spec(name)
        n = 1
        for d in shape:
            n *= d
        return n * element_size(dtype)

    def location(self, name: str) -> tuple[int, int]:
        """(group, position) of ``name`` in the best order to read it; writers that keep the source's
        grouping (DCP data files) use the group. Non-HF sources group as an HF writer would shard."""
        if not hasattr(self, "_locations"):
            names = self.skeleton.hf_keys() if self.skeleton is not None else self.names()
            held = set(self.names())
            ordered = [n for n in names if n in held]
            from vlconvert.layouts.hf import PlannedTensor

            planned = [PlannedTensor(n, self.spec(n)[1], tuple(self.spec(n)[0])) for n in ordered]
            self._locations = {t.name: (g, i) for g, shard in enumerate(plan_shards(planned, DEFAULT_GROUP_BYTES))
                               for i, t in enumerate(shard)}
        return self._locations[name]

    input_log = None  # what the readers opened (vlconvert.publish.InputLog), set by open_source

    def close(self) -> None:
        """Release open files; what the readers opened stops counting as an input of later runs."""
        if self.input_log is not None:
            self.input_log.close()


def skeleton_for(folder: Path, config: str | Path | dict | None, assets_dir: str | Path | None,
                 names: Iterable[str] | None = None) -> Skeleton | None:
    """The skeleton of a checkpoint from its config (``config``, else the assets' or the folder's config.json).
    A family storing some tensors in several forms takes the form of the original Hugging Face folder
    ``assets_dir`` (what a conversion back writes), else of ``names`` (the tensors held)."""
    if config is None and assets_dir is not None and (Path(assets_dir) / "config.json").is_file():
        config = Path(assets_dir) / "config.json"
    if config is None and (folder / "config.json").is_file():
        config = folder / "config.json"
    if isinstance(config, (str, Path)):
        note_input(config)
    if config is None:
        return None
    info = load_config(config)
    return skeleton_of(info, names, assets_dir)


def skeleton_of(info: ModelInfo, names: Iterable[str] | None, assets_dir: str | Path | None) -> Skeleton:
    """``info``'s skeleton; for a family with several stored forms, the form the HF folder ``assets_dir`` holds,
    else the form of ``names``."""
    family = family_named(info.family)
    if not family.stored_forms:
        return family.build_skeleton(info)
    if assets_dir is not None and any(Path(assets_dir).glob("*.safetensors")):
        from vlconvert.layouts.hf import HFCheckpoint

        checkpoint = HFCheckpoint(assets_dir)
        try:
            names = list(checkpoint.tensors)
        finally:
            checkpoint.close()
    return family.skeleton_for(info, names) if names is not None else family.build_skeleton(info)


def check_config_sizes(info, held: dict[str, int], config: str, weights: str | Path) -> None:
    """Refuse, in one line naming the config and the checkpoint, a config whose sizes differ from what the
    tensors present hold (``held``: "decoder layers", "experts", "hidden size", "vision blocks" counted from
    the checkpoint's metadata), before anything is planned per layer or per expert: within the fixed
    bounds of the config reader, 4000 layers of 16000 experts would still be 64 million plan entries."""
    fields = {"decoder layers": ("text_config.num_hidden_layers", info.layers),
              "experts": ("text_config.num_experts", info.experts),
              "hidden size": ("text_config.hidden_size", info.hidden),
              "vision blocks": ("vision_config.depth", info.vision_depth)}
    for what, count in held.items():
        field, value = fields[what]
        if count != value:
            raise UserError(f"the config ({config}) says {field} = {value}, but the tensors in '{weights}' have "
                            f"{what} {count}: it is not these weights' config; give theirs with --assets-dir or "
                            "--config")


class RankMappedSource(Source):
    """A source whose matrices are assembled from Megatron tensors (legacy rank files, torch_dist):
    ``self._dtypes`` maps each source matrix to its stored dtype."""

    _dtypes: dict[Src, DType]

    def spec(self, name: str) -> tuple[tuple[int, ...], DType]:
        src = Src(name, 0) if self.skeleton.family.is_stacked_expert(name) else Src(name)
        return self.skeleton.shape_in(name, "released"), self._dtypes[src]

    def dtype(self, src: Src) -> DType:
        return self._dtypes[src]

    def matrix_shape(self, src: Src) -> tuple[int, ...]:
        return source_shape(self.skeleton, src)

    def stacked(self, src: Src) -> bool:
        """True for a whole fused expert tensor the family stores as its Megatron matrices (``[out, in]``, never
        transposed): its rows are experts, each assembled from the Megatron tensors holding it."""
        family = self.skeleton.family
        return src.expert is None and family.is_stacked_expert(src.hf) and not family.is_expert(src.hf)

    def stacked_rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        """Experts ``start:stop`` of a :meth:`stacked` tensor."""
        rows = self.matrix_shape(Src(src.hf, start))[0]
        return torch.stack([self.rows(Src(src.hf, e), 0, rows) for e in range(start, stop)])

    def _as_rows(self, src: Src, span: FileSpan | None) -> FileSpan | None:
        """A rank tensor's rows seen as rows of source matrix ``src`` (None stays None)."""
        if span is None:
            return None
        shape = (span.shape[0], *self.matrix_shape(src)[1:])
        return span.reshape(shape) if math.prod(shape) == math.prod(span.shape) else None
