"""Family-neutral model facts: :class:`ModelInfo` (read from config.json), :class:`Skeleton` (every canonical
tensor, shape and dtype), config reading and the orientation of fused 3-D expert tensors.

A family module (see :mod:`vlconvert.models.family`) fills these in; nothing here names a family or a tensor.

Fused expert orientation (families whose released checkpoints hold 3-D ``[E, ...]`` expert tensors):

* ``released`` (transformers 4.57 and the hub files): ``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]
* ``transformers5`` (transformers 5 run time and its ``save_pretrained``): [E, 2I, H], [E, H, I]
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlconvert.dtypes import DType, element_size
from vlconvert.errors import UsageError, UserError
from vlconvert.lazy import torch

if TYPE_CHECKING:
    from vlconvert.models.family import Family

EXPERT_LAYOUTS = ("released", "transformers5")


@dataclass(frozen=True)
class ModelInfo:
    """The facts about a model that converters need, read from its config.json.

    ``family`` is the config's ``model_type`` (the registry maps it to its :class:`~vlconvert.models.family.Family`).
    Text-only families leave the vision fields at 0 / ``()``; facts only one family needs stay in ``raw``.
    """

    family: str  # the config's model_type, e.g. "qwen3_vl", "qwen3_moe", "qwen2_5_vl"
    tied: bool
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    experts: int  # 0 for dense
    experts_per_token: int
    moe_intermediate: int
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    deepstack: tuple[int, ...]
    dtype: DType | None
    raw: dict = field(repr=False, compare=False, hash=False, default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.experts > 0


def read_config_json(path: str | Path) -> dict:
    """Read a config.json (or the config.json inside a folder) as a dict, with a clear error."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UsageError(f"config '{path}' does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise UserError(f"config '{path}' is not valid JSON") from exc
    except OSError as exc:
        raise UserError(f"cannot read config '{path}': {exc.strerror}") from exc
    if not isinstance(raw, dict):
        raise UserError(f"config '{path}' holds a {type(raw).__name__}, not a JSON object")
    return raw


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one parameter as the installed transformers model holds it."""

    shape: tuple[int, ...]
    dtype: DType

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * element_size(self.dtype)


@dataclass
class Skeleton:
    """Every canonical key, shape and dtype a model expects (fused experts in the installed transformers'
    run-time orientation).

    ``tensors`` includes the output layer also for tied models (it is in the model's state dict);
    :meth:`hf_keys` gives the keys a Hugging Face folder holds (no output layer when tied).
    """

    info: ModelInfo
    tensors: dict[str, TensorSpec]
    runtime_experts: str  # orientation of the installed transformers: "released" or "transformers5"

    @functools.cached_property
    def family(self) -> Family:
        """The model family (from the registry, by ``info.family``)."""
        from vlconvert.models.registry import family_named

        return family_named(self.info.family)

    def hf_keys(self) -> list[str]:
        output = self.family.output
        return [k for k in self.tensors if not (self.info.tied and k == output)]

    def shape_in(self, name: str, experts_layout: str) -> tuple[int, ...]:
        """The shape of ``name`` on disk when fused experts are stored in ``experts_layout``."""
        shape = self.tensors[name].shape
        if experts_layout != self.runtime_experts and self.family.is_expert(name):
            return (shape[0], shape[2], shape[1])
        return shape


@dataclass(frozen=True)
class RuntimeTensor:
    """A tensor of the transformers model's state dict (what FSDP2 saves with ``dcp.save``) where its name or
    form differs from the canonical tensors: ``rows`` are canonical (name, start, stop) row ranges that make its
    rows; ``stacked``: a 3-D ``[E, R, C]`` stack of matrices (fused experts) whose rows are counted with the
    leading axis flattened (expert ``e`` is rows ``e*R:(e+1)*R``)."""

    name: str
    shape: tuple[int, ...]
    rows: tuple[tuple[str, int, int], ...]
    stacked: bool = False

    @property
    def flat_shape(self) -> tuple[int, ...]:
        """The shape its ``rows`` describe (a stack's first two dims flattened)."""
        if not self.stacked:
            return self.shape
        return (self.shape[0] * self.shape[1], *self.shape[2:])

    def locate(self, offset: int) -> tuple[tuple[int, ...], int]:
        """(leading index, row) of row ``offset`` of :attr:`flat_shape`."""
        if not self.stacked:
            return (), offset
        return (offset // self.shape[1],), offset % self.shape[1]


def renamed(skeleton: Skeleton, names: dict[str, str]) -> list[RuntimeTensor]:
    """Run-time tensors that are canonical ones under other names (``names``: canonical -> run-time)."""
    out = []
    family = skeleton.family
    for name in skeleton.tensors:
        shape = skeleton.shape_in(name, "released")
        held = family.embed if skeleton.info.tied and name == family.output else name  # tied: the embedding
        out.append(RuntimeTensor(names.get(name, name), tuple(shape), ((held, 0, shape[0] if shape else 1),)))
    return out


def config_int(section: dict, defaults: dict, key: str) -> int:
    """An integer field of a config section (or its class default); bools and non-integers are refused."""
    value = section.get(key, defaults.get(key))
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"config field '{key}' must be an integer, got {value!r}")
    return value


def _major_version(version: str) -> int | None:
    match = re.match(r"\s*v?(\d+)", version)
    return int(match.group(1)) if match else None


@functools.lru_cache(maxsize=1)
def runtime_experts_layout() -> str:
    """Which fused-expert orientation the installed transformers holds in memory, from its version (no import).

    transformers 5 holds ``gate_up_proj`` [E, 2I, H]; 4.x holds the released [E, H, 2I]. Without
    transformers installed, the layout of the version vlconvert requires (5.x) is assumed.
    """
    try:
        major = _major_version(importlib.metadata.version("transformers"))
    except importlib.metadata.PackageNotFoundError:
        return "transformers5"
    return "released" if major is not None and major < 5 else "transformers5"


def expert_layout_of(name: str, shape: tuple[int, ...], skeleton: Skeleton, hint: str | None = None) -> str:
    """Decide the orientation of a stored fused expert tensor from its shape against the skeleton.

    A square tensor (2I == H for gate_up, I == H for down) cannot be told apart: then ``hint``
    (a declared layout) decides, else the released layout is assumed.
    """
    runtime = skeleton.tensors[name].shape
    flipped = (runtime[0], runtime[2], runtime[1])
    if runtime == flipped:
        return hint or "released"
    if tuple(shape) == runtime:
        return skeleton.runtime_experts
    if tuple(shape) == flipped:
        return "released" if skeleton.runtime_experts == "transformers5" else "transformers5"
    raise UserError(f"'{name}' has shape {list(shape)}, the config expects {list(runtime)} or {list(flipped)}")


def convert_expert(tensor: torch.Tensor, src_layout: str, dst_layout: str) -> torch.Tensor:
    """Change the orientation of a fused expert tensor (a transpose of its last two dims)."""
    return tensor if src_layout == dst_layout else tensor.transpose(1, 2)


def linear_shapes(shapes: dict[str, tuple[int, ...]], name: str, n_out: int, n_in: int, bias: bool) -> None:
    """Add ``name.weight`` [n_out, n_in] (and ``name.bias`` [n_out]) to ``shapes``."""
    shapes[f"{name}.weight"] = (n_out, n_in)
    if bias:
        shapes[f"{name}.bias"] = (n_out,)


def layer_norm_shapes(shapes: dict[str, tuple[int, ...]], name: str, dim: int) -> None:
    """Add a LayerNorm's ``weight`` and ``bias`` [dim] to ``shapes``."""
    shapes[f"{name}.weight"] = (dim,)
    shapes[f"{name}.bias"] = (dim,)


def as_dict(value: Any, where: str) -> dict:
    """A config section as a dict (None -> {}), or one line naming it."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"the config's {where} is a {type(value).__name__}, not an object")
    return value
