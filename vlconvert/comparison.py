"""``vlconvert verify A B``: compare two checkpoints of any layouts tensor by tensor, streaming.

Both sides are opened as :class:`~vlconvert.sources.Source` (HF names, released
expert orientation), so an HF folder, a DCP and Megatron rank folders at any TP/PP/EP compare directly.
One tensor pair is in memory at a time; the difference is computed in row blocks so that a 3 GB expert
tensor does not need another 6 GB of float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlconvert import rowbytes, sources
from vlconvert.dtypes import DType, dtype_name, element_size
from vlconvert.errors import UserError
from vlconvert.layouts.filebytes import FileSpan, read_bytes
from vlconvert.lazy import torch
from vlconvert.locate import resolve_source
from vlconvert.models.base import Skeleton
from vlconvert.models.megatron_table import Src
from vlconvert.plan import rows_per_block
from vlconvert.publish import open_input
from vlconvert.rowbytes import ByteRows
from vlconvert.sources import Source

_BLOCK_ELEMENTS = 16 * 2**20  # elements per difference block (128 MiB of float64)


def open_source(path: str | Path, config: str | Path | dict | None = None, assets_dir: str | Path | None = None,
                skeleton: Skeleton | None = None, experts_layout: str | None = None) -> Source:
    """Open any checkpoint folder as a :class:`~vlconvert.sources.Source` (layout detected from its files)."""
    path = resolve_source(path)  # a folder, or a model id in the local Hugging Face cache
    return sources.open_source(path, config=config, assets_dir=assets_dir, skeleton=skeleton,
                               experts_layout=experts_layout)


def _all_names(src: Source) -> list[str]:
    """The model tensors a side holds, and the tensors it holds that the model does not have."""
    return list(src.names()) + list(src.extra_names())


@dataclass
class TensorResult:
    """The comparison of one canonical tensor."""

    name: str
    status: str  # equal | within_tolerance | mismatch | shape_mismatch | missing_in_a | missing_in_b
    max_abs_diff: float | None = None
    shape_a: list[int] | None = None
    shape_b: list[int] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("equal", "within_tolerance")


@dataclass
class VerifyReport:
    """Every tensor's result and the totals; ``ok`` is False on any mismatch, missing or extra tensor."""

    a: str
    b: str
    layout_a: str
    layout_b: str
    tolerance: float
    tensors: list[TensorResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tensors)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.status] = out.get(t.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "layout_a": self.layout_a, "layout_b": self.layout_b,
                "tolerance": self.tolerance, "ok": self.ok, "counts": self.counts(),
                "max_abs_diff": max((t.max_abs_diff for t in self.tensors if t.max_abs_diff is not None),
                                    default=None),
                "tensors": [asdict(t) for t in self.tensors]}


def bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.numel() == 0:
        return True
    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8))


def max_abs_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest |x - y| in float64, in row blocks; NaN in both at one place counts as equal, in one as inf."""
    if x.numel() == 0:
        return 0.0
    xf, yf = x.reshape(-1), y.reshape(-1)
    worst = 0.0
    for start in range(0, xf.numel(), _BLOCK_ELEMENTS):
        a = xf[start:start + _BLOCK_ELEMENTS].to(torch.float64)
        b = yf[start:start + _BLOCK_ELEMENTS].to(torch.float64)
        diff = (a - b).abs()
        both_nan = torch.isnan(a) & torch.isnan(b)
        same_inf = torch.isinf(a) & (a == b)
        diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
        diff = torch.nan_to_num(diff, nan=math.inf)
        worst = max(worst, float(diff.max()))
    return worst


def compare_tensors(name: str, x: torch.Tensor, y: torch.Tensor, tolerance: float = 0.0) -> TensorResult:
    """Compare one pair: equal (bitwise for one dtype, exact values across dtypes), within tolerance, or not."""
    result = TensorResult(name, "equal", 0.0, list(x.shape), list(y.shape), dtype_name(x.dtype), dtype_name(y.dtype))
    if tuple(x.shape) != tuple(y.shape):
        result.status, result.max_abs_diff = "shape_mismatch", None
        return result
    if x.dtype == y.dtype and bitwise_equal(x, y):
        return result
    diff = max_abs_diff(x, y)
    result.max_abs_diff = diff
    if diff == 0.0 and x.dtype != y.dtype:
        result.status = "equal"
    elif tolerance > 0 and diff <= tolerance:
        result.status = "within_tolerance"
    else:
        result.status = "mismatch"
    return result


def verify_sources(a: Source, b: Source, tolerance: float = 0.0,
                   on_tensor: Callable[[TensorResult, int], None] | None = None,
                   names: list[str] | None = None) -> list[TensorResult]:
    """Compare two open sources over the union of their names, one tensor pair at a time.

    ``on_tensor(result, nbytes_of_a)`` is called after each tensor (for progress bars).
    """
    names_a, names_b = set(_all_names(a)), set(_all_names(b))
    results = []
    for name in names or sorted(names_a | names_b):
        if name not in names_b:
            shape, dtype = a.spec(name)
            r = TensorResult(name, "missing_in_b", None, list(shape), None, dtype_name(dtype), None)
            nbytes = 0
        elif name not in names_a:
            shape, dtype = b.spec(name)
            r = TensorResult(name, "missing_in_a", None, None, list(shape), None, dtype_name(dtype))
            nbytes = 0
        else:
            shape_a, dtype_a = a.spec(name)
            shape_b, dtype_b = b.spec(name)
            if tuple(shape_a) != tuple(shape_b):
                r = TensorResult(name, "shape_mismatch", None, list(shape_a), list(shape_b),
                                 dtype_name(dtype_a), dtype_name(dtype_b))
                nbytes = 0
            elif dtype_a == dtype_b and _bytes_equal(a, b, name, tuple(shape_a), dtype_a):
                r = TensorResult(name, "equal", 0.0, list(shape_a), list(shape_b), dtype_name(dtype_a),
                                 dtype_name(dtype_b))
                nbytes = math.prod(shape_a) * element_size(dtype_a)
            else:
                x = a.read(name)
                y = b.read(name)
                r = compare_tensors(name, x, y, tolerance)
                nbytes = x.numel() * x.element_size()
                del x, y
        results.append(r)
        if on_tensor is not None:
            on_tensor(r, nbytes)
    return results


def stored_bytes_equal(a: Source, b: Source, name: str, shape: tuple[int, ...]) -> bool:
    """True when both sides store every row of ``name`` verbatim in their files (:meth:`Source.row_span`)
    and those bytes are equal: then the tensors are bitwise equal, known without reading them as tensors
    (no torch). False when a side must be read (assembled, merged, dequantized) or the bytes differ: the
    tensor comparison then says how. Fused expert tensors always take that path: a side may store them
    transposed, with the same shape when the matrices are square."""
    spans = _stored_spans(a, b, name, shape)
    return spans is not None and _spans_equal(*spans)


def _bytes_equal(a: Source, b: Source, name: str, shape: tuple[int, ...], dtype: DType) -> bool:
    """Whether ``name`` is bitwise equal on both sides, known from bytes alone: the stored bytes where both sides
    store every row verbatim (a difference there is final: each tensor is read once more, as a tensor, to
    measure it), else the bytes both sides put together (:func:`assembled_bytes_equal`). False also when
    bytes cannot tell."""
    spans = _stored_spans(a, b, name, shape)
    if spans is not None:
        return _spans_equal(*spans)
    return assembled_bytes_equal(a, b, name, shape, dtype)


def _stored_spans(a: Source, b: Source, name: str, shape: tuple[int, ...]
                  ) -> tuple[list[FileSpan], list[FileSpan]] | None:
    """The file spans holding every row of ``name`` on each side, or None if a side stores a row otherwise. Fused
    experts: None (a side may store them transposed, with the same shape when the matrices are square)."""
    if not shape or any(s.skeleton is None or s.skeleton.family.is_expert(name) for s in (a, b)):
        return None
    spans_a, spans_b = _row_spans(a, name, shape), _row_spans(b, name, shape)
    return None if spans_a is None or spans_b is None else (spans_a, spans_b)


def _spans_equal(spans_a: list[FileSpan], spans_b: list[FileSpan]) -> bool:
    """Whether two lists of spans hold the same bytes, compared piece by piece (stops at the first difference)."""
    left, right = _SpanBytes(spans_a), _SpanBytes(spans_b)
    try:
        while True:
            piece = left.read(_BYTE_PIECE)
            if piece != right.read(_BYTE_PIECE):
                return False
            if not piece:
                return True
    finally:
        left.close()
        right.close()


_BYTE_PIECE = 8 * 2**20


def assembled_bytes_equal(a: Source, b: Source, name: str, shape: tuple[int, ...], dtype: DType) -> bool:
    """True when both sides can put ``name`` together as bytes without torch (:meth:`Source.row_bytes`; a fused
    expert tensor one expert at a time in Megatron's ``[out, in]`` orientation, :meth:`Source.expert_bytes`) and
    those bytes are equal. False when a side needs arithmetic to produce it, or a piece differs (the tensor
    comparison then says how)."""
    if not shape or any(s.skeleton is None for s in (a, b)):
        return False
    if a.skeleton.family.is_expert(name):
        for e in range(shape[0]):
            x, y = a.expert_bytes(name, e, "transformers5"), b.expert_bytes(name, e, "transformers5")
            if x is None or y is None or x.shape != y.shape or not _same_bytes(x, y):
                return False
        return True
    step = rows_per_block(shape, dtype, _BYTE_PIECE)
    for row in range(0, shape[0], step):
        end = min(shape[0], row + step)
        x = a.row_bytes(Src(name), row, end)
        y = b.row_bytes(Src(name), row, end) if x is not None else None
        if x is None or y is None or not _same_bytes(x, y):
            return False
    return True


def _same_bytes(x: ByteRows, y: ByteRows) -> bool:
    return x.nbytes == y.nbytes and bool((rowbytes.raw(x) == rowbytes.raw(y)).all())


def _row_spans(src: Source, name: str, shape: tuple[int, ...]) -> list[FileSpan] | None:
    """The file spans that hold rows ``0:shape[0]`` of ``name`` in order, or None if a row is not stored."""
    spans, row = [], 0
    while row < shape[0]:
        span = src.row_span(Src(name), row, shape[0])
        if span is None or not span.shape or span.shape[0] <= 0 or tuple(span.shape[1:]) != shape[1:]:
            return None
        spans.append(span)
        row += span.shape[0]
    return spans


class _SpanBytes:
    """The bytes of a list of file spans, read in order."""

    def __init__(self, spans: list[FileSpan]):
        self.spans, self.index, self.pos, self.file = spans, 0, 0, None

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end)."""
        out = bytearray()
        while len(out) < n and self.index < len(self.spans):
            span = self.spans[self.index]
            if self.file is None or self.file.name != str(span.path):
                self.close()
                self.file = open_input(span.path)
            data = read_bytes(self.file, span.offset + self.pos, min(n - len(out), span.nbytes - self.pos),
                              f"'{span.path}' is truncated: ended while reading tensor data")
            out += data
            self.pos += len(data)
            if self.pos == span.nbytes:
                self.index, self.pos = self.index + 1, 0
        return bytes(out)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def source_bytes(src: Source) -> int:
    """Canonical bytes of every tensor of ``src`` (metadata only)."""
    total = 0
    for name in _all_names(src):
        shape, dtype = src.spec(name)
        total += math.prod(shape) * element_size(dtype)
    return total


def open_pair(a: str | Path, b: str | Path, config: str | Path | None = None,
              assets_dir: str | Path | None = None) -> tuple[Source, Source]:
    """Open both sides; without ``config``/``assets_dir`` a side lacking config.json borrows the other's.
    Two sides whose configs describe different models are refused here, before any tensor is compared."""
    assets_a = assets_b = assets_dir
    if config is None and assets_dir is None:
        own = [Path(p) / "config.json" for p in (a, b)]
        shared = next((c for c in own if c.is_file()), None)
        cfg_a = None if own[0].is_file() else shared
        cfg_b = None if own[1].is_file() else shared
        # a Hugging Face side is the other side's original folder: a family that stores some tensors in
        # several forms (Qwen3.5's experts fused or one per expert) is then read in the same form on both sides
        hf = [_hf_folder(p) for p in (a, b)]
        if hf[0] is not None and hf[1] is None:
            assets_b = hf[0]
        elif hf[1] is not None and hf[0] is None:
            assets_a = hf[1]
    else:
        cfg_a = cfg_b = config
    src_a = open_source(a, config=cfg_a, assets_dir=assets_a)
    try:
        src_b = open_source(b, config=cfg_b, assets_dir=assets_b)
    except BaseException:
        _close(src_a)
        raise
    differ = model_differences(src_a, src_b)
    if differ:
        _close(src_a)
        _close(src_b)
        raise UserError(f"'{a}' and '{b}' are different models ({'; '.join(differ)}): nothing to compare tensor "
                        "by tensor")
    return src_a, src_b


def _hf_folder(path: str | Path) -> Path | None:
    """``path`` (a folder or a cached model id) if it is a Hugging Face folder of weights, else None."""
    try:
        folder = Path(resolve_source(path))
    except UserError:
        return None  # opening it says what is wrong
    index = folder / "model.safetensors.index.json"
    return folder if folder.is_dir() and (any(folder.glob("*.safetensors")) or index.is_file()) else None


_MODEL_FACTS = (("family", "model type"), ("experts", "model"), ("hidden", "hidden size"),
                ("layers", "decoder layers"), ("heads", "attention heads"), ("vision_hidden", "vision width"),
                ("vision_depth", "vision depth"))


def model_differences(a: Source, b: Source) -> list[str]:
    """How the configs of two sides differ, A's value first: ``['model MoE (8 experts) vs dense', 'hidden size
    64 vs 128']``; empty for the same model (whatever the layouts, dtypes or vocabulary padding)."""
    info_a, info_b = a.skeleton.info, b.skeleton.info

    def shown(field: str, value: object) -> str:
        if field == "experts":
            return f"MoE ({value} experts)" if value else "dense"
        return str(value)

    return [f"{label} {shown(f, getattr(info_a, f))} vs {shown(f, getattr(info_b, f))}"
            for f, label in _MODEL_FACTS if getattr(info_a, f) != getattr(info_b, f)]


def _close(src: Source) -> None:
    close = getattr(src, "close", None)
    if close:
        close()


def verify(a: str | Path, b: str | Path, tolerance: float = 0.0, config: str | Path | None = None,
           assets_dir: str | Path | None = None,
           on_tensor: Callable[[TensorResult, int], None] | None = None) -> VerifyReport:
    """Compare checkpoints ``a`` and ``b`` (any layouts); ``config``/``assets_dir`` for layouts without one."""
    src_a, src_b = open_pair(a, b, config, assets_dir)
    try:
        report = VerifyReport(str(a), str(b), src_a.layout, src_b.layout, tolerance)
        report.tensors = verify_sources(src_a, src_b, tolerance, on_tensor)
        return report
    finally:
        for src in (src_a, src_b):
            _close(src)
