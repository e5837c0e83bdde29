"""Qwen3-VL (dense) and Qwen3-VL-MoE: config reading, the meta-device skeleton, expert orientation.

Key names are the transformers module names, which are also the names on disk in released
checkpoints (``model.language_model.*``, ``model.visual.*``, ``lm_head.weight``). The only on-disk
difference between transformers versions is the orientation of the fused MoE experts:

* released (transformers 4.57 and the hub files): ``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]
* transformers 5 run time and its ``save_pretrained``: ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]

In both, the gate is the first half of the 2I axis.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlconvert.dtypes import element_size, parse_dtype
from vlconvert.errors import UserError

EXPERT_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
LM_HEAD = "lm_head.weight"
EMBED = "model.language_model.embed_tokens.weight"
EXPERT_LAYOUTS = ("released", "transformers5")
FAMILIES = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}


@dataclass(frozen=True)
class ModelInfo:
    """The facts about a model that converters need, read from its config.json."""

    family: str  # "qwen3_vl" or "qwen3_vl_moe"
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
    dtype: torch.dtype | None
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
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"config '{path}' does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config '{path}' is not valid JSON") from exc


def load_config(path_or_dict: str | Path | dict) -> ModelInfo:
    """Read a Qwen3-VL / Qwen3-VL-MoE config.json (4.57 or 5.x style) into :class:`ModelInfo`."""
    raw = path_or_dict if isinstance(path_or_dict, dict) else read_config_json(path_or_dict)
    family = raw.get("model_type")
    if family is None:
        raise UserError("the config has no model_type: is it a Qwen3-VL config.json?")
    if family not in FAMILIES:
        raise UserError(f"model_type '{family}' is not supported: vlconvert handles {', '.join(FAMILIES)}")
    text = raw.get("text_config") or {}
    vision = raw.get("vision_config") or {}
    try:
        experts = int(text.get("num_experts", text.get("num_local_experts", 0)) or 0) if family == "qwen3_vl_moe" else 0
        dtype_text = raw.get("dtype") or raw.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
        return ModelInfo(
            family=family,
            tied=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            hidden=int(text["hidden_size"]), layers=int(text["num_hidden_layers"]),
            heads=int(text["num_attention_heads"]), kv_heads=int(text["num_key_value_heads"]),
            head_dim=int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]),
            vocab=int(text["vocab_size"]), intermediate=int(text.get("intermediate_size", 0)),
            experts=experts, experts_per_token=int(text.get("num_experts_per_tok", 0) or 0),
            moe_intermediate=int(text.get("moe_intermediate_size", 0) or 0),
            vision_depth=int(vision["depth"]), vision_hidden=int(vision["hidden_size"]),
            vision_heads=int(vision["num_heads"]), vision_intermediate=int(vision["intermediate_size"]),
            deepstack=tuple(vision.get("deepstack_visual_indexes", ())),
            dtype=parse_dtype(dtype_text) if isinstance(dtype_text, str) else None,
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"config is missing or has a bad value for {exc}") from exc


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one parameter as the installed transformers model holds it."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * element_size(self.dtype)


@dataclass
class Skeleton:
    """Every key, shape and dtype a model expects, in the installed transformers' run-time layout.

    ``tensors`` includes ``lm_head.weight`` also for tied models (it is in the model's state dict);
    :meth:`hf_keys` gives the keys a Hugging Face folder holds (no ``lm_head.weight`` when tied).
    """

    info: ModelInfo
    tensors: dict[str, TensorSpec]
    runtime_experts: str  # orientation of the installed transformers: "released" or "transformers5"

    def hf_keys(self) -> list[str]:
        return [k for k in self.tensors if not (self.info.tied and k == LM_HEAD)]

    def shape_in(self, name: str, experts_layout: str) -> tuple[int, ...]:
        """The shape of ``name`` on disk when experts are stored in ``experts_layout``."""
        shape = self.tensors[name].shape
        if is_expert(name) and experts_layout != self.runtime_experts:
            return (shape[0], shape[2], shape[1])
        return shape


def is_expert(name: str) -> bool:
    """True for the fused 3-D MoE expert tensors."""
    return name.endswith(EXPERT_SUFFIXES)


def _meta_model(raw: dict):
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.for_model(**copy.deepcopy(raw))
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(cfg)


def build_skeleton(config: str | Path | dict | ModelInfo) -> Skeleton:
    """Build the model on the meta device from its config alone: names, shapes, dtypes, no weight memory."""
    info = config if isinstance(config, ModelInfo) else load_config(config)
    try:
        model = _meta_model(info.raw)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad config
        raise UserError(f"transformers cannot build a {info.family} model from this config: {exc}") from exc
    dtype = info.dtype or torch.bfloat16
    tensors = {name: TensorSpec(tuple(t.shape), dtype) for name, t in model.state_dict().items()}
    return Skeleton(info=info, tensors=tensors, runtime_experts=runtime_experts_layout())


@functools.lru_cache(maxsize=1)
def runtime_experts_layout() -> str:
    """Which expert orientation the installed transformers holds in memory (found by building one)."""
    raw = {"model_type": "qwen3_vl_moe", "tie_word_embeddings": False,
           "text_config": {"hidden_size": 8, "intermediate_size": 8, "moe_intermediate_size": 2,
                           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                           "head_dim": 4, "vocab_size": 16, "num_experts": 2, "num_experts_per_tok": 1,
                           "rope_scaling": {"mrope_section": [1, 0, 1], "rope_type": "default",
                                            "mrope_interleaved": True}},
           "vision_config": {"depth": 1, "hidden_size": 8, "intermediate_size": 8, "num_heads": 2,
                             "out_hidden_size": 8, "num_position_embeddings": 4,
                             "deepstack_visual_indexes": []}}
    shape = _meta_model(raw).state_dict()["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape
    return "transformers5" if tuple(shape) == (2, 4, 8) else "released"


def expert_layout_of(name: str, shape: tuple[int, ...], skeleton: Skeleton, hint: str | None = None) -> str:
    """Decide the orientation of a stored expert tensor from its shape against the skeleton.

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
