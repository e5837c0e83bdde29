"""A PEFT LoRA adapter merged into any source on read (``vlconvert convert --merge-lora ADAPTER``).

:class:`LoRAMergedSource` wraps a :class:`~vlconvert.sources.base.Source` and merges each adapted tensor the
way PEFT's ``merge_and_unload`` does: ``W + scaling * (B @ A)`` (transposed for ``fan_in_fan_out`` and for
embeddings), ``scaling = lora_alpha / r`` or ``lora_alpha / sqrt(r)`` with rsLoRA, per-module ``r`` and
``alpha`` from ``rank_pattern`` / ``alpha_pattern``. The delta and the sum are computed in float32 and
the rows handed out stay float32, so the writer casts once to the output dtype. ``modules_to_save``
tensors replace the base tensors whole. Only the rows asked for are merged (rows ``a:b`` of ``B @ A``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlconvert.dtypes import DType
from vlconvert.errors import UsageError, UserError, one_line
from vlconvert.lazy import torch
from vlconvert.models.megatron_table import Src
from vlconvert.publish import note_input
from vlconvert.sources.base import Source

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LORA = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


@dataclass
class Delta:
    """One adapted tensor: ``scaling * (B @ A)``, transposed when ``transposed``."""

    a: torch.Tensor  # [r, in] float32
    b: torch.Tensor  # [out, r] float32
    scaling: float
    transposed: bool

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the (transposed) delta, in PEFT's order of operations."""
        if self.transposed:
            return (self.b @ self.a[:, start:stop]).t() * self.scaling
        return (self.b[start:stop] @ self.a) * self.scaling

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transposed else (out, inp)


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: a key matching the module name or a dotted suffix."""
    for key, value in (patterns or {}).items():
        if key == module or re.match(rf"(.*\.)?(?:{key})$", module):
            return value
    return default


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 2**20


def _is_alpha(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_config(config: dict, path: Path) -> None:
    """Refuse fields of the wrong type or value in adapter_config.json, in one line naming the field: a NaN
    or infinite ``lora_alpha`` would merge into all-NaN weights."""
    def bad(field: str, want: str) -> UserError:
        return UserError(f"'{path}': field '{field}' must be {want}, got {one_line(config[field], 60, quote=True)}")

    def strings(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    if "r" in config and not _is_rank(config["r"]):
        raise bad("r", "a positive integer (the LoRA rank)")
    if config.get("lora_alpha") is not None and not _is_alpha(config["lora_alpha"]):
        raise bad("lora_alpha", "a finite number")
    for field, check, want in (("rank_pattern", _is_rank, "positive integers"),
                               ("alpha_pattern", _is_alpha, "finite numbers")):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict) or not all(isinstance(k, str) and check(v) for k, v in patterns.items()):
            raise bad(field, f"an object mapping module names to {want}")
        for key in patterns:
            try:
                re.compile(rf"(.*\.)?(?:{key})$")
            except re.error:
                raise bad(field, "an object whose keys are module names or regular expressions") from None
    for field in ("target_modules", "modules_to_save", "layers_to_transform"):
        value = config.get(field)
        if value is None:
            continue
        if field == "target_modules" and isinstance(value, str):
            continue
        if field == "layers_to_transform" and (isinstance(value, int) and not isinstance(value, bool)
                                               or isinstance(value, list)):
            continue
        if not strings(value):
            raise bad(field, "a list of module names" + (" or a regular expression" if field == "target_modules"
                                                         else ""))
    for field in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if config.get(field) is not None and not isinstance(config[field], bool):
            raise bad(field, "true or false")
    for field in ("peft_type", "base_model_name_or_path"):
        if config.get(field) is not None and not isinstance(config[field], str):
            raise bad(field, "a string")


def _read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.exists():
        raise UsageError(f"--merge-lora '{folder}' does not exist")
    if not folder.is_dir() or not config_path.is_file():
        raise UserError(f"--merge-lora '{folder}' is not a PEFT adapter folder (no {CONFIG_NAME})")
    if not weights_path.is_file():
        found = "adapter_model.bin, which vlconvert does not unpickle" if (folder / "adapter_model.bin").is_file() \
            else "nothing"
        raise UserError(f"--merge-lora '{folder}' has no {WEIGHTS_NAME} (found {found}): save it with "
                        "safe_serialization=True")
    note_input(folder)
    try:
        config = json.loads(note_input(config_path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"'{config_path}' is not valid JSON") from exc
    if not isinstance(config, dict):
        raise UserError(f"'{config_path}' is not a JSON object")
    _check_config(config, config_path)
    from vlconvert.layouts.hf import read_header  # validates the header before any byte is read

    read_header(weights_path)
    from safetensors.torch import load_file

    return config, load_file(str(note_input(weights_path)))


class LoRAMergedSource(Source):
    """``source`` with the PEFT adapter in ``adapter`` merged into it (everything else is passed through)."""

    def __init__(self, source: Source, adapter: str | Path):
        self.inner = source
        self.layout, self.folder, self.skeleton = source.layout, source.folder, source.skeleton
        self.dtype_from_config = source.dtype_from_config
        self.notes = source.notes
        self.adapter = Path(adapter).expanduser()
        config, tensors = _read_adapter(self.adapter)
        where = f"--merge-lora '{self.adapter}'"
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise UserError(f"{where} is a {config.get('peft_type')} adapter: only LoRA adapters can be merged")
        if config.get("use_dora"):
            raise UserError(f"{where} is a DoRA adapter: only plain LoRA and rsLoRA can be merged")
        base_model = self.base_model = config.get("base_model_name_or_path") or "an unnamed base model"
        held = set(source.names())
        parts: dict[str, dict[str, torch.Tensor]] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        saved = [str(m) for m in (config.get("modules_to_save") or [])]
        for key, tensor in tensors.items():
            if not key.startswith(PREFIX):
                raise UserError(f"{where}: key '{key}' does not start with '{PREFIX}': not a PEFT adapter file")
            rest = key[len(PREFIX):]
            match = _LORA.match(rest)
            if match:
                module = match["module"]
                if ".experts" in module or self.skeleton.family.is_expert(module):
                    raise UserError(f"{where} adapts fused MoE experts ('{module}'): merging LoRA into fused "
                                    "experts is not supported; train the adapter without the experts")
                parts.setdefault(module, {})[match["part"]] = tensor
                continue
            if ".base_layer." in rest:  # the base weight PEFT saves beside an adapted embedding: ours is used
                self._canonical(rest.replace(".base_layer.", "."), held, key, where)
                continue
            if ".lora_" in rest or "lora_magnitude_vector" in rest:
                raise UserError(f"{where}: key '{key}' is not a LoRA weight vlconvert can merge "
                                "(LoRA biases and DoRA are not supported)")
            name = self._canonical(rest, held, key, where)
            if not any(name.startswith(m + ".") or f".{m}." in f".{name}" for m in saved):
                raise UserError(f"{where}: '{key}' is a whole tensor but its module is not in modules_to_save")
            base_shape = tuple(source.spec(name)[0])
            if tuple(tensor.shape) != base_shape:
                raise UserError(f"{where}: '{key}' has shape {list(tensor.shape)}, the base tensor '{name}' is "
                                f"{list(base_shape)}: the adapter was made for '{base_model}'")
            self.replaced[name] = tensor
        self.deltas: dict[str, Delta] = {}
        for module, pair in parts.items():
            self._add_delta(module, pair, config, held, where, base_model)
        if not self.deltas and not self.replaced:
            raise UserError(f"{where} holds no LoRA weights")
        self.notes = [*source.notes, f"LoRA adapter '{self.adapter.name}' merged into {len(self.deltas)} tensors"
                      + (f", {len(self.replaced)} replaced (modules_to_save)" if self.replaced else "")]

    def _canonical(self, rest: str, held: set[str], key: str, where: str) -> str:
        """The canonical name a PEFT key (prefix stripped) stands for; a clear error when there is none."""
        for name in (rest, "model." + rest):
            if name in held:
                return name
        raise UserError(f"{where}: adapter key '{key}' matches no tensor of '{self.inner.folder}' (the adapter "
                        f"was made for '{self.base_model}')")

    def _add_delta(self, module: str, pair: dict[str, torch.Tensor], config: dict, held: set[str], where: str,
                   base_model: str) -> None:
        embedding = "lora_embedding_A" in pair or "lora_embedding_B" in pair
        a = pair.get("lora_embedding_A" if embedding else "lora_A")
        b = pair.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise UserError(f"{where}: '{module}' has only one of its two LoRA matrices")
        part = "lora_embedding_A" if embedding else "lora_A"
        name = self._canonical(module + ".weight", held, f"{PREFIX}{module}.{part}", where)
        if a.dim() != 2 or b.dim() != 2:
            raise UserError(f"{where}: LoRA on '{module}' is not a linear layer (lora_A is {list(a.shape)}): only "
                            "linear and embedding layers can be merged")
        r = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", a.shape[0])))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r)))
        if a.shape[0] != r or b.shape[1] != r:
            raise UserError(f"{where}: '{module}' has rank {a.shape[0]} (lora_A {list(a.shape)}, lora_B "
                            f"{list(b.shape)}) but adapter_config.json says r={r}")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        delta = Delta(a.to(torch.float32), b.to(torch.float32), scaling,
                      embedding or bool(config.get("fan_in_fan_out")))
        base_shape = tuple(self.inner.spec(name)[0])
        if delta.shape != base_shape:
            raise UserError(f"{where}: LoRA on '{module}' makes a {list(delta.shape)} update but the base tensor is "
                            f"{list(base_shape)}: the adapter was made for '{base_model}'")
        if name in self.replaced:
            raise UserError(f"{where}: '{module}' is both adapted and in modules_to_save")
        self.deltas[name] = delta

    # ------------------------------------------------------------------------------- Source interface
    def names(self) -> list[str]:
        return self.inner.names()

    def extra_names(self) -> list[str]:
        return self.inner.extra_names()

    def spec(self, name: str) -> tuple[tuple[int, ...], DType]:
        return self.inner.spec(name)

    def matrix_shape(self, src: Src) -> tuple[int, ...]:
        return self.inner.matrix_shape(src)

    def location(self, name: str) -> tuple[int, int]:
        return self.inner.location(name)

    def nbytes(self, name: str) -> int:
        return self.inner.nbytes(name)

    def rows(self, src: Src, start: int, stop: int) -> torch.Tensor:
        """Rows of a tensor, merged (float32) when the adapter touches it."""
        if src.expert is None and src.hf in self.replaced:
            tensor = self.replaced[src.hf]
            return tensor[start:stop] if tensor.dim() else tensor
        delta = self.deltas.get(src.hf) if src.expert is None else None
        if delta is None:
            return self.inner.rows(src, start, stop)
        return self.inner.rows(src, start, stop).to(torch.float32) + delta.rows(start, stop)

    def read(self, name: str) -> torch.Tensor:
        if name in self.deltas or name in self.replaced:
            return super().read(name)
        return self.inner.read(name)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, attr: str) -> Any:
        """Anything else (``plan``, ``stored_layout``, ``rewrite_config``...) is the wrapped source's."""
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)
