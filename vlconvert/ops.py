"""Pure tensor transforms for Megatron layouts: no names, no files.

Two kinds of functions live here:

* **row maps** (``qkv_row_map``, ``vision_qkv_row_map``, ``chunk_rows``...): which source rows make up each
  row range of a fused Megatron tensor. The planner uses them to read only the rows a rank needs.
* **tensor ops** (``interleave_qkv``, ``split_qkv``, ``tp_split_gate_up``...): the same rules applied to
  whole tensors. Tests use them as an independent statement of the rules, and they are handy for scripts.

Conventions: a 2-D weight is ``[out, in]`` (``F.linear``); a bias is 1-D. ``G`` is the number of query
groups (= HF ``num_key_value_heads``), ``hd`` the head dim.
"""

from __future__ import annotations

import math

from vlconvert import buffers
from vlconvert.errors import UsageError, UserError
from vlconvert.lazy import torch

# A row map is a list of (source, start, stop): rows start..stop-1 of ``source`` (a small int or str tag).
RowMap = list[tuple[object, int, int]]


# ------------------------------------------------------------------------------------------- row maps
def qkv_row_map(heads: int, groups: int, head_dim: int) -> RowMap:
    """Rows of Megatron's fused ``linear_qkv`` as slices of HF q/k/v (tags 'q', 'k', 'v').

    Per query group g: ``q`` heads g*r..(g+1)*r-1, then ``k`` head g, then ``v`` head g (r = heads/groups).
    """
    if heads % groups:
        raise UserError(f"{heads} attention heads are not a multiple of {groups} query groups")
    r = heads // groups
    out: RowMap = []
    for g in range(groups):
        out += [("q", g * r * head_dim, (g + 1) * r * head_dim), ("k", g * head_dim, (g + 1) * head_dim),
                ("v", g * head_dim, (g + 1) * head_dim)]
    return out


def vision_qkv_row_map(heads: int, head_dim: int) -> RowMap:
    """Rows of the ViT's Megatron ``linear_qkv`` as slices of HF's ``[q_all; k_all; v_all]`` (tag 'qkv').

    Megatron interleaves per head: ``[q_h0, k_h0, v_h0, q_h1, ...]``.
    """
    out: RowMap = []
    for h in range(heads):
        for part in range(3):
            start = part * heads * head_dim + h * head_dim
            out.append(("qkv", start, start + head_dim))
    return out


def total_rows(row_map: RowMap) -> int:
    """Number of rows a row map describes."""
    return sum(stop - start for _, start, stop in row_map)


def slice_row_map(row_map: RowMap, start: int, stop: int) -> RowMap:
    """The part of ``row_map`` covering output rows ``start..stop-1`` (splitting entries where needed)."""
    out: RowMap = []
    pos = 0
    for src, a, b in row_map:
        n = b - a
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            out.append((src, a + lo - pos, a + hi - pos))
        pos += n
        if pos >= stop:
            break
    return out if len(out) < 2 else merge_row_map(out)


def merge_row_map(row_map: RowMap) -> RowMap:
    """Join neighbouring entries that continue the same source."""
    out: RowMap = []
    for src, a, b in row_map:
        if out and out[-1][0] == src and out[-1][2] == a:
            out[-1] = (src, out[-1][1], b)
        else:
            out.append((src, a, b))
    return out


def chunk_range(size: int, parts: int, index: int, what: str = "dimension") -> tuple[int, int]:
    """Rows ``[start, stop)`` of chunk ``index`` when ``size`` is split evenly in ``parts``."""
    if size % parts:
        raise UserError(f"{what} of size {size} cannot be split evenly into {parts} parts")
    step = size // parts
    return index * step, (index + 1) * step


def gate_up_row_map(inter: int, tp: int, rank: int) -> RowMap:
    """Rows of rank ``rank``'s fused ``linear_fc1`` = [gate chunk; up chunk] (tags 'gate', 'up')."""
    a, b = chunk_range(inter, tp, rank, "MLP intermediate size")
    return [("gate", a, b), ("up", a, b)]


# ------------------------------------------------------------------------------------------ vocab
def padded_vocab_size(vocab: int, tp: int, divisible_by: int = 128, padded: int | None = None) -> int:
    """Megatron-LM's padded vocabulary: a multiple of ``divisible_by * tp`` (or ``padded`` if given)."""
    if padded is not None:
        if padded < vocab:
            raise UserError(f"--padded-vocab-size {padded} is smaller than the checkpoint's {vocab} vocabulary rows")
        if padded % tp:
            raise UserError(f"--padded-vocab-size {padded} is not divisible by --tp {tp}")
        return padded
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad dim 0 to ``rows`` rows (Megatron's padded vocabulary)."""
    if tensor.shape[0] == rows:
        return tensor
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad])


# --------------------------------------------------------------------------------------- EP and PP
def local_experts(experts: int, ep: int, ep_rank: int) -> list[int]:
    """Global expert ids held by ``ep_rank``: a contiguous block, stored locally as 0..E/EP-1."""
    if experts % ep:
        raise UserError(f"{experts} experts cannot be split evenly over --ep {ep}: use a divisor of {experts}")
    n = experts // ep
    return list(range(ep_rank * n, (ep_rank + 1) * n))


def pipeline_layers(layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Decoder layers per pipeline stage (Megatron-LM ``decoder_first/last_pipeline_num_layers``).

    An even split needs no options; an uneven one needs ``first`` and/or ``last``, and the middle stages
    must then split the rest evenly. Refusals name counts that would work.
    """
    if pp < 1:
        raise UsageError("--pp must be at least 1")
    if pp == 1:
        if first not in (None, layers) or last not in (None, layers):
            raise UsageError("--pp-first-layers/--pp-last-layers need --pp of at least 2")
        return [layers]
    if pp > layers:
        divisors = [d for d in range(1, layers + 1) if layers % d == 0 and d <= 64]
        raise UserError(f"--pp {pp} is more than the {layers} decoder layers: every stage needs at least one; "
                        f"use --pp among {divisors}")
    if first is None and last is None:
        if layers % pp == 0:
            return [layers // pp] * pp
        raise UserError(f"{layers} layers do not split evenly over --pp {pp}: "
                        f"{_suggest_uneven(layers, pp)}")
    middle_stages = pp - (first is not None) - (last is not None)
    rest = layers - (first or 0) - (last or 0)
    if rest < 0 or (first is not None and first < 0) or (last is not None and last < 0):
        raise UserError(f"--pp-first-layers/--pp-last-layers add up to more than the {layers} layers")
    if middle_stages == 0:
        if rest != 0:
            raise UserError(f"with --pp {pp}, --pp-first-layers + --pp-last-layers must equal {layers}")
        return [first, last]  # type: ignore[list-item]
    if rest % middle_stages or rest // middle_stages == 0:
        raise UserError(f"after --pp-first-layers/--pp-last-layers, {rest} layers do not split evenly over the "
                        f"other {middle_stages} stages: {_suggest_uneven(layers, pp)}")
    each = rest // middle_stages
    stages = [each] * middle_stages
    if first is not None:
        stages.insert(0, first)
    if last is not None:
        stages.append(last)
    return stages


def _suggest_uneven(layers: int, pp: int) -> str:
    """Counts near an even split that would work, as command-line options."""
    options: list[str] = []
    even = layers / pp
    for k in sorted(range(1, layers), key=lambda k: abs(k - even)):
        if (layers - k) % (pp - 1) == 0 and (layers - k) // (pp - 1) > 0:
            options.append(f"--pp-first-layers {k}")
            options.append(f"--pp-last-layers {k}")
            break
    if pp > 2:
        for both in sorted(range(1, layers // 2), key=lambda k: abs(k - even)):
            if (layers - 2 * both) % (pp - 2) == 0 and (layers - 2 * both) // (pp - 2) > 0:
                options.append(f"--pp-first-layers {both} --pp-last-layers {both}")
                break
    divisors = [d for d in range(1, layers + 1) if layers % d == 0 and d <= 64]
    if not options:
        return f"no --pp-first-layers/--pp-last-layers count works; use --pp among {divisors}"
    return f"pass {' or '.join(repr(o) for o in options)} (or use --pp among {divisors})"


# ------------------------------------------------------------------------------------- tensor ops
def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q/k/v (weights [n*hd, H] or biases [n*hd]) -> Megatron's per-group interleaved ``linear_qkv``."""
    rest = q.shape[1:]
    qg = q.reshape(groups, -1, *rest)
    kg = k.reshape(groups, -1, *rest)
    vg = v.reshape(groups, -1, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_qkv`: Megatron ``linear_qkv`` -> HF (q, k, v)."""
    r = heads // groups
    rest = qkv.shape[1:]
    blocks = qkv.reshape(groups, (r + 2) * head_dim, *rest)
    q, k, v = torch.split(blocks, [r * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def interleave_vision_qkv(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """HF ViT ``attn.qkv`` ([q_all; k_all; v_all]) -> Megatron per-head ``[q_h, k_h, v_h]`` rows."""
    rest = qkv.shape[1:]
    return qkv.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def split_vision_qkv(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`interleave_vision_qkv`."""
    rest = qkv.shape[1:]
    return qkv.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def column_split(tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Column-parallel split (dim 0) into ``tp`` equal parts."""
    chunk_range(tensor.shape[0], tp, 0, "column-parallel dim")
    return list(torch.chunk(tensor, tp, dim=0))


def row_split(tensor: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Row-parallel split (dim 1 of a weight) into ``tp`` equal parts."""
    chunk_range(tensor.shape[1], tp, 0, "row-parallel dim")
    return list(torch.chunk(tensor, tp, dim=1))


def column_merge(parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`column_split`."""
    return torch.cat(parts, dim=0)


def row_merge(parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`row_split`."""
    return torch.cat(parts, dim=1)


def tp_split_gate_up(gate: torch.Tensor, up: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Per TP rank: ``cat(gate.chunk(tp)[i], up.chunk(tp)[i])`` (gate and up split separately)."""
    return [torch.cat([g, u]) for g, u in zip(column_split(gate, tp), column_split(up, tp), strict=True)]


def tp_merge_gate_up(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`tp_split_gate_up`: the full (gate, up)."""
    halves = [torch.chunk(p, 2, dim=0) for p in parts]
    return torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])


def expert_fc1_from_released(gate_up_e: torch.Tensor) -> torch.Tensor:
    """One expert of the released ``gate_up_proj`` ([H, 2I]) -> Megatron ``linear_fc1`` [2I, H] ([gate; up])."""
    return buffers.transposed(gate_up_e)


def expert_fc2_from_released(down_e: torch.Tensor) -> torch.Tensor:
    """One expert of the released ``down_proj`` ([I, H]) -> Megatron ``linear_fc2`` [H, I]."""
    return buffers.transposed(down_e)
