"""Block-quantized FP8 releases (Qwen3-VL-*-FP8) read as dequantized canonical tensors.

Such a folder is an ordinary Hugging Face checkpoint whose ``config.json`` has a ``quantization_config``
with ``quant_method: fp8`` and ``weight_block_size`` [br, bc]. Linear weights are stored ``float8_e4m3fn``
next to ``<name>_scale_inv`` ([ceil(R/br), ceil(C/bc)], one multiplier per block, in whatever dtype was
stored; the two may sit in different shards). :class:`FP8Source` hides the scales, reports the dequantized
dtype and dequantizes only the rows asked for (float8 -> float32, times the block's scale, cast once).
An FP8 weight is never handed out without its scales applied.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from vlconvert.dtypes import BFLOAT16, BY_NAME, FLOAT16, FLOAT32, DType, dtype_name, to_torch
from vlconvert.errors import UserError
from vlconvert.layouts.filebytes import FileSpan
from vlconvert.lazy import torch
from vlconvert.models.base import read_config_json
from vlconvert.models.megatron_table import Src
from vlconvert.rowbytes import ByteRows
from vlconvert.sources.base import Source
from vlconvert.sources.hf import HFSource

SCALE_SUFFIX = "_scale_inv"
_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FP8 = (BY_NAME["float8_e4m3fn"], BY_NAME["float8_e5m2"])


def fp8_config(config: Path | dict | None) -> dict | None:
    """The ``quantization_config`` of a config.json when it describes block FP8, else None."""
    if config is None:
        return None
    raw = config if isinstance(config, dict) else read_config_json(config)
    quant = raw.get("quantization_config")
    if isinstance(quant, dict) and str(quant.get("quant_method", "")).lower() == "fp8":
        return quant
    return None


def folder_fp8_config(folder: Path, config: str | Path | dict | None = None) -> dict | None:
    """The FP8 ``quantization_config`` of the config given for an HF folder, or of the folder's own."""
    own = folder / "config.json"
    for candidate in (config, own if own.is_file() else None):
        quant = fp8_config(candidate if isinstance(candidate, dict) or candidate is None else Path(candidate))
        if quant is not None:
            return quant
    return None


def is_fp8_folder(folder: Path, config: str | Path | dict | None = None) -> bool:
    """Whether an HF folder (or the config given for it) describes a block-FP8 checkpoint."""
    return folder_fp8_config(folder, config) is not None


class FP8Source(HFSource):
    """An HF folder of block-FP8 weights, seen as dequantized tensors (bf16, or the config's dtype)."""

    def __init__(self, folder: str | Path, config: str | Path | dict | None = None, **kwargs):
        super().__init__(folder, config=config, **kwargs)
        quant = folder_fp8_config(self.folder, config) or {}
        block = quant.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise UserError(f"'{self.folder}': quantization_config.weight_block_size is {block!r}; only block-wise "
                            "FP8 ([rows, cols]) is supported")
        self.block = (block[0], block[1])
        stored = self.skeleton.info.dtype if self.skeleton is not None else None
        self.out_dtype = stored if stored in (BFLOAT16, FLOAT16, FLOAT32) else BFLOAT16
        if self.skeleton is not None:  # the Megatron writer records the config: it is not quantized any more
            self.skeleton.info.raw.pop("quantization_config", None)  # (config.json outputs: describe_weights)
        tensors = self.checkpoint.tensors
        self.scales: dict[str, str] = {}
        for name, info in tensors.items():
            if info.dtype not in _FP8:
                continue
            scale = name + SCALE_SUFFIX
            if scale not in tensors:
                raise UserError(f"'{self.folder}': FP8 weight '{name}' has no '{scale}': refusing to read it "
                                "unscaled")
            if len(info.shape) != 2:
                raise UserError(f"'{self.folder}': FP8 tensor '{name}' has shape {list(info.shape)}; only 2-D "
                                "block-quantized weights are supported (fused 3-D FP8 experts are not)")
            want = tuple(math.ceil(d / b) for d, b in zip(info.shape, self.block, strict=True))
            if tuple(tensors[scale].shape) != want:
                raise UserError(f"'{self.folder}': '{scale}' has shape {list(tensors[scale].shape)}, blocks of "
                                f"{list(self.block)} over {list(info.shape)} need {list(want)}")
            self.scales[name] = scale
        self.per_expert = self._find_per_expert()
        self.notes.append(f"FP8 weights dequantized on read ({len(self.scales)} tensors, blocks "
                          f"{self.block[0]}x{self.block[1]}) to {dtype_name(self.out_dtype)}")

    def _find_per_expert(self) -> dict[str, dict[str, list[str]]]:
        """Fused canonical expert names -> their per-expert 2-D keys, as Qwen's FP8 MoE releases store them
        (``mlp.experts.{e}.{gate,up,down}_proj.weight``): {``...experts.gate_up_proj``: {gate: [...], up: [...]},
        ``...experts.down_proj``: {down: [...]}}."""
        found: dict[str, dict[str, dict[int, str]]] = {}
        for name in self.checkpoint.tensors:
            m = _PER_EXPERT.match(name)
            if m:
                found.setdefault(m["prefix"], {}).setdefault(m["proj"], {})[int(m["e"])] = name
        out: dict[str, dict[str, list[str]]] = {}
        for prefix, projs in found.items():
            fused = {f"{prefix}.gate_up_proj": ("gate_proj", "up_proj"), f"{prefix}.down_proj": ("down_proj",)}
            for name, parts in fused.items():
                if self.skeleton is None or name not in self.skeleton.tensors:
                    continue
                experts = self.skeleton.shape_in(name, "released")[0]
                keys = {}
                for proj in parts:
                    have = projs.get(proj, {})
                    missing = [e for e in range(experts) if e not in have]
                    if missing:
                        raise UserError(f"'{self.folder}': '{prefix}.{missing[0]}.{proj}.weight' is missing "
                                        f"({len(have)} of {experts} experts)")
                    keys[proj] = [have[e] for e in range(experts)]
                out[name] = keys
        return out

    def names(self) -> list[str]:
        held = set(super().names()) | set(self.per_expert)
        return [n for n in self.skeleton.tensors if n in held] if self.skeleton is not None else sorted(held)

    def extra_names(self) -> list[str]:
        hidden = set(self.scales.values()) | {k for parts in self.per_expert.values() for ks in parts.values()
                                              for k in ks}
        return [n for n in super().extra_names() if n not in hidden]

    def stored_layout(self, name: str) -> str | None:
        return "released" if name in self.per_expert else super().stored_layout(name)

    def location(self, name: str) -> tuple[int, int]:
        if name in self.per_expert:
            return super().location(next(iter(self.per_expert[name].values()))[0])
        return super().location(name)

    def spec(self, name: str) -> tuple[tuple[int, ...], DType]:
        if name in self.per_expert:
            first = next(iter(self.per_expert[name].values()))[0]
            return tuple(self.skeleton.shape_in(name, "released")), self.spec(first)[1]
        shape, dtype = super().spec(name)
        return shape, (self.out_dtype if name in self.scales else dtype)

    def nbytes(self, name: str) -> int:
        shape, dtype = self.spec(name)
        return math.prod(shape) * dtype.itemsize

    def expert(self, name: str, expert: int, layout: str) -> torch.Tensor:
        if name in self.per_expert:  # assembled and dequantized by _expert
            return Source.expert(self, name, expert, layout)
        return super().expert(name, expert, layout)

    def expert_span(self, name: str, expert: int, layout: str) -> FileSpan | None:
        return None if name in self.per_expert else super().expert_span(name, expert, layout)

    def row_span(self, src: Src, start: int, stop: int) -> FileSpan | None:
        if src.hf in self.scales or src.hf in self.per_expert:  # dequantized or assembled: read
            return None
        return super().row_span(src, start, stop)

    def row_bytes(self, src: Src, start: int, stop: int) -> ByteRows | None:
        if src.hf in self.scales or src.hf in self.per_expert:  # dequantized or assembled: tensors
            return None
        return super().row_bytes(src, start, stop)

    def expert_bytes(self, name: str, expert: int, layout: str) -> ByteRows | None:
        if name in self.scales or name in self.per_expert:
            return None
        return super().expert_bytes(name, expert, layout)

    def _expert(self, src: Src) -> torch.Tensor:
        """Expert ``src.expert`` as Megatron holds it ([out, in]): per-expert keys are dequantized and, for
        ``gate_up_proj``, stacked gate over up (the released ``[..., :I]`` is gate)."""
        if src.hf in self.per_expert:
            if self._expert_cache is None or self._expert_cache[0] != src:
                self._expert_cache = None
                parts = [self._matrix(keys[src.expert]) for keys in self.per_expert[src.hf].values()]
                self._expert_cache = (src, parts[0] if len(parts) == 1 else torch.cat(parts))
            return self._expert_cache[1]
        if self.checkpoint.tensors[src.hf].dtype in _FP8:  # refused at open; never read raw
            raise UserError(f"'{src.hf}' is FP8 and cannot be read unscaled")
        return super()._expert(src)

    def _matrix(self, key: str) -> torch.Tensor:
        """A whole stored 2-D tensor, dequantized when it is FP8 (float32 then)."""
        if key in self.scales:
            return self.dequantize(key, 0, self.checkpoint.tensors[key].shape[0])
        return self.checkpoint.read(key)

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        if src.expert is not None or src.hf not in self.scales:
            return super().rows(src, start, stop)
        return self.dequantize(src.hf, start, stop)

    def read(self, name: str) -> torch.Tensor:
        if name in self.per_expert:
            return Source.read(self, name).to(to_torch(self.spec(name)[1]))
        if name in self.scales:
            return self.dequantize(name, 0, self.checkpoint.tensors[name].shape[0]).to(to_torch(self.out_dtype))
        return super().read(name)

    def dequantize(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of FP8 weight ``name``: float8 -> float32 times each block's scale.

        The result stays float32 so that the writer casts once, to the planned dtype (bf16 by default:
        ``spec`` reports it; ``--dtype fp32`` gets the exact product)."""
        rows_total, cols = self.checkpoint.tensors[name].shape
        start, stop = max(0, start), min(stop, rows_total)
        br, bc = self.block
        weight = self.checkpoint.read_rows(name, start, stop).to(torch.float32)
        first, last = start // br, (stop - 1) // br + 1 if stop > start else start // br
        scale = self.checkpoint.read_rows(self.scales[name], first, last).to(torch.float32)
        scale = scale.repeat_interleave(br, dim=0)[start - first * br: stop - first * br]
        scale = scale.repeat_interleave(bc, dim=1)[:, :cols]
        return weight * scale
