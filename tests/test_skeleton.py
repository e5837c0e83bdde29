"""The pure-Python skeleton equals the one transformers builds on the meta device, key for key, in order."""

from __future__ import annotations

import copy
import importlib.metadata
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vlconvert.errors import UserError
from vlconvert.models import qwen3vl
from vlconvert.models.qwen3vl import (
    Skeleton,
    _skeleton_from_transformers,
    _skeleton_shapes,
    build_skeleton,
    is_expert,
    measured_runtime_experts_layout,
    runtime_experts_layout,
)

ROOT = Path(__file__).resolve().parents[1]
RELEASED = sorted((ROOT / "fixtures" / "configs").glob("*.json"))
TINY = sorted((ROOT / "fixtures").glob("tiny-*/config.json"))


def _rows(skeleton: Skeleton) -> list[tuple[str, tuple[int, ...], Any]]:
    return [(name, spec.shape, spec.dtype) for name, spec in skeleton.tensors.items()]


def _assert_same(pure: Skeleton, ref: Skeleton) -> None:
    assert list(pure.tensors) == list(ref.tensors)  # same keys in the same order (callers plan files by it)
    assert _rows(pure) == _rows(ref)
    assert pure.info == ref.info
    assert pure.runtime_experts == ref.runtime_experts
    assert pure.hf_keys() == ref.hf_keys()


def test_fixture_configs_are_all_there() -> None:
    assert len(RELEASED) == 6
    assert {p.parent.name for p in TINY} >= {"tiny-dense-tied", "tiny-dense-untied", "tiny-moe", "tiny-moe-tf5"}


@pytest.mark.parametrize("path", RELEASED + TINY, ids=lambda p: p.stem if p.parent.name == "configs" else p.parent.name)
def test_skeleton_equals_transformers(path: Path) -> None:
    _assert_same(build_skeleton(path), _skeleton_from_transformers(path))


def _variant(base: str, text: dict | None = None, vision: dict | None = None,
             drop_text: tuple[str, ...] = (), drop_vision: tuple[str, ...] = ()) -> dict:
    cfg = copy.deepcopy(json.loads((ROOT / "fixtures" / base / "config.json").read_text()))
    cfg["text_config"].update(text or {})
    cfg["vision_config"].update(vision or {})
    for key in drop_text:
        cfg["text_config"].pop(key)
    for key in drop_vision:
        cfg["vision_config"].pop(key)
    return cfg


VARIANTS: dict[str, Callable[[], dict]] = {
    "dense-no-head-dim": lambda: _variant("tiny-dense-untied", drop_text=("head_dim",)),  # class default 128
    "moe-no-head-dim": lambda: _variant("tiny-moe", drop_text=("head_dim",)),  # hidden // heads
    "moe-sparse-step-mlp-only": lambda: _variant("tiny-moe", text={"decoder_sparse_step": 2, "mlp_only_layers": [1],
                                                                   "num_hidden_layers": 4}),
    "dense-attention-bias": lambda: _variant("tiny-dense-tied", text={"attention_bias": True}),
    "moe-attention-bias": lambda: _variant("tiny-moe", text={"attention_bias": True}),
    "vision-defaults": lambda: _variant("tiny-dense-untied", drop_vision=(
        "out_hidden_size", "num_position_embeddings", "deepstack_visual_indexes", "patch_size",
        "temporal_patch_size", "in_channels", "spatial_merge_size")),
    "moe-both-expert-keys": lambda: _variant("tiny-moe", text={"num_local_experts": 4}),
    "moe-no-expert-count": lambda: _variant("tiny-moe", drop_text=("num_experts",)),  # class default 60
    "moe-zero-experts": lambda: _variant("tiny-moe", text={"num_experts": 0}),
    "merge-size-1-no-deepstack": lambda: _variant("tiny-dense-tied", vision={"spatial_merge_size": 1,
                                                                             "deepstack_visual_indexes": []}),
    "float32": lambda: _variant("tiny-dense-untied", text={"dtype": "float32"}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_skeleton_equals_transformers_on_config_variants(name: str) -> None:
    cfg = VARIANTS[name]()
    _assert_same(build_skeleton(cfg), _skeleton_from_transformers(cfg))


def test_bad_value_is_a_user_error_in_both() -> None:
    cfg = _variant("tiny-dense-untied", vision={"out_hidden_size": None})
    with pytest.raises(UserError):
        build_skeleton(cfg)
    with pytest.raises(UserError):
        _skeleton_from_transformers(cfg)


def test_build_skeleton_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = ("import sys; from vlconvert.models.qwen3vl import build_skeleton, runtime_experts_layout; "
            f"build_skeleton({str(RELEASED[0])!r}); runtime_experts_layout(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_runtime_layout_from_version_agrees_with_a_built_model() -> None:
    assert runtime_experts_layout() == measured_runtime_experts_layout()


@pytest.mark.parametrize(("version", "layout"), [("5.23.0", "transformers5"), ("5.0.0rc1", "transformers5"),
                                                 ("4.57.0.dev0", "released"), ("4.57.1", "released")])
def test_runtime_layout_follows_the_version(monkeypatch: pytest.MonkeyPatch, version: str, layout: str) -> None:
    monkeypatch.setattr(qwen3vl.importlib.metadata, "version", lambda name: version)
    runtime_experts_layout.cache_clear()
    try:
        assert runtime_experts_layout() == layout
    finally:
        runtime_experts_layout.cache_clear()


def test_runtime_layout_without_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(qwen3vl.importlib.metadata, "version", missing)
    runtime_experts_layout.cache_clear()
    try:
        assert runtime_experts_layout() == "transformers5"  # the version vlconvert requires
    finally:
        runtime_experts_layout.cache_clear()


def test_released_runtime_orientation_is_the_transpose() -> None:
    """transformers 4.x (not installed here): experts [E, H, 2I] / [E, I, H], the router registered first."""
    raw = json.loads((ROOT / "fixtures" / "tiny-moe" / "config.json").read_text())
    tf5, released = _skeleton_shapes(raw, "transformers5"), _skeleton_shapes(raw, "released")
    assert set(tf5) == set(released)
    for name, shape in tf5.items():
        assert released[name] == ((shape[0], shape[2], shape[1]) if is_expert(name) else shape)
    layer0 = [k for k in released if k.startswith("model.language_model.layers.0.mlp.")]
    assert layer0 == ["model.language_model.layers.0.mlp.gate.weight",
                      "model.language_model.layers.0.mlp.experts.gate_up_proj",
                      "model.language_model.layers.0.mlp.experts.down_proj"]
