"""``vlconvert doctor``: known environment traps for Qwen3-VL conversion and training, and what to do.

Each check is a pure function of :class:`EnvFacts` (collected from the running environment by
:func:`collect_facts`, or built by hand in tests), so every verdict is testable without the hardware.
A finding with status ``fail`` is blocking and makes the command exit non-zero.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlconvert.errors import UsageError, UserError
from vlconvert.lazy import torch

CONV3D_ISSUE = "https://github.com/pytorch/pytorch/issues/166122"


@dataclass
class Finding:
    """One check's verdict: ``ok``, ``info``, ``warn`` or ``fail`` (blocking)."""

    name: str
    status: str
    message: str
    fix: str = ""
    applies_to: list[str] = field(default_factory=list)  # model types a model-specific check concerns (else all)


@dataclass
class EnvFacts:
    """What the checks look at."""

    torch_version: str
    torch_cuda: str | None  # CUDA version torch was built with (None: CPU build)
    cuda_available: bool
    cudnn_version: int | None  # e.g. 91002 for 9.10.2
    transformers_version: str | None
    runtime_experts: str | None  # "released" / "transformers5" / None when transformers is missing
    moe_conversion_mapping: bool | None  # transformers has the qwen3_vl_moe expert transpose on load
    env: dict[str, str] = field(default_factory=dict)


def _version_tuple(text: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", text.split("+")[0])
    return tuple(int(n) for n in nums[:3])


def collect_facts(measure: bool = False) -> EnvFacts:
    """Read the facts from the running environment. A transformers in the range vlconvert supports (5.4 to 6,
    tested) is described from its version (:func:`supported_transformers`) unless ``measure``; any other is
    imported and measured (a tiny meta model built for the expert layout: seconds)."""
    supported = None if measure else supported_transformers()
    cudnn = None
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001 - a broken CUDA install raises anything
        cudnn = None
    if supported is not None:  # no import: vlconvert's own conversions decide the layout from the version too
        return EnvFacts(torch_version=torch.__version__, torch_cuda=torch.version.cuda,
                        cuda_available=torch.cuda.is_available(), cudnn_version=cudnn,
                        transformers_version=supported, runtime_experts="transformers5",
                        moe_conversion_mapping=True, env=_weights_only_env())
    tf_version = runtime = mapping = None
    try:
        import transformers

        tf_version = transformers.__version__
        from vlconvert.models.registry import FAMILIES, measured_runtime_experts_layout

        runtime = measured_runtime_experts_layout()
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping

            fused = next(f for f in FAMILIES if f.transposed_experts).model_type_for(True)
            convs = get_checkpoint_conversion_mapping(fused) or []
            mapping = any("experts.gate_up_proj" in str(getattr(c, "source_patterns", "")) for c in convs)
        except ImportError:
            mapping = None if _version_tuple(tf_version) < (5,) else False
    except ImportError:
        pass
    env = {k: os.environ[k] for k in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")
           if k in os.environ}
    return EnvFacts(torch_version=torch.__version__, torch_cuda=torch.version.cuda,
                    cuda_available=torch.cuda.is_available(), cudnn_version=cudnn,
                    transformers_version=tf_version, runtime_experts=runtime, moe_conversion_mapping=mapping,
                    env=env)


def _weights_only_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")
            if k in os.environ}


def supported_transformers() -> str | None:
    """The installed transformers' version when it lies in the range vlconvert supports (>= 5.4, < 6), read
    from package metadata: those hold fused experts as ``[E, 2I, H]`` and transpose released ones on load
    (README, "Why these floors"). None otherwise (not installed, older, newer, unreadable)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("transformers")
    except PackageNotFoundError:
        return None
    return found if (5, 4) <= _version_tuple(found)[:2] < (6,) else None


def applies_to() -> dict[str, list[str]]:
    """The config ``model_type`` values each model-specific check concerns (the others concern every family):
    the Conv3d patch embedding of the vision-language families, the orientation of fused 3-D experts."""
    from vlconvert.models.registry import FAMILIES

    vision = [t for f in FAMILIES if f.hf_vision_prefix is not None for t in f.model_types]
    fused = [f.model_type_for(True) for f in FAMILIES if f.transposed_experts]
    return {"conv3d": vision, "transformers experts": fused, "square experts": fused}


def check_conv3d(facts: EnvFacts) -> Finding:
    """torch 2.9.x disables cuDNN Conv3d for cuDNN 9.8-9.14: Qwen3-VL's patch embedding gets very slow."""
    v = _version_tuple(facts.torch_version)
    linear = ("Qwen3-VL's patch embedding is a Conv3d with kernel == stride (2, 16, 16), no padding, one "
              "group: it equals a Linear over the flattened 3*2*16*16 = 1536-value patch, "
              "W2 = conv.weight.reshape(hidden, 1536), y = x @ W2.T + bias (vLLM does this; transformers: "
              "from_pretrained(..., fusion_config={'patch_embeddings': True})). The checkpoint is unchanged.")
    if v[:2] != (2, 9):
        return Finding("torch Conv3d", "ok", f"torch {facts.torch_version}: not the 2.9.x Conv3d regression")
    fix = ("upgrade torch to >= 2.10 (or 2.9.1 with cuDNN >= 9.15), or run the patch embedding as the "
           f"equivalent Linear. {linear} See {CONV3D_ISSUE}")
    if facts.torch_cuda is None:
        return Finding("torch Conv3d", "warn", f"torch {facts.torch_version} (CPU build): the cuDNN Conv3d "
                       "regression does not apply here, but a CUDA build of this version on the training "
                       "machine would hit it", fix)
    cudnn = facts.cudnn_version
    if cudnn is None:
        return Finding("torch Conv3d", "warn", f"torch {facts.torch_version} with CUDA {facts.torch_cuda}: "
                       "cuDNN version unknown; cuDNN 9.8-9.14 falls back to a much slower Conv3d kernel", fix)
    upper = 91500 if v >= (2, 9, 1) else 10**9  # 2.9.1 re-enables cuDNN >= 9.15; 2.9.0 keeps it off
    if 90800 <= cudnn < upper:
        return Finding("torch Conv3d", "fail", f"torch {facts.torch_version} with cuDNN {_cudnn_text(cudnn)}: "
                       "cuDNN Conv3d is disabled and the patch embedding runs the slow vol2col kernel "
                       "(4x and more slower; LlamaFactory refuses this combination)", fix)
    return Finding("torch Conv3d", "ok", f"torch {facts.torch_version} with cuDNN {_cudnn_text(cudnn)}: "
                   "cuDNN Conv3d is enabled")


def _cudnn_text(v: int) -> str:
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def conv3d_linear_max_diff(hidden: int = 8, seed: int = 0) -> float:
    """Run a Qwen3-VL-shaped patch Conv3d and its Linear equivalent on CPU; return the max abs difference."""
    gen = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv3d(3, hidden, kernel_size=(2, 16, 16), stride=(2, 16, 16), bias=True).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen, dtype=torch.float64))
        patches = torch.randn(5, 3 * 2 * 16 * 16, generator=gen, dtype=torch.float64)
        y_conv = conv(patches.view(-1, 3, 2, 16, 16)).view(-1, hidden)
        y_lin = torch.nn.functional.linear(patches, conv.weight.reshape(hidden, -1), conv.bias)
    return float((y_conv - y_lin).abs().max())


def check_transformers(facts: EnvFacts) -> Finding:
    """The installed transformers: Qwen3-VL support and its run-time MoE expert orientation."""
    if facts.transformers_version is None:
        return Finding("transformers", "fail", "transformers is not installed", "pip install 'transformers>=5.4,<6'")
    v = _version_tuple(facts.transformers_version)
    if v < (4, 57):
        return Finding("transformers", "fail", f"transformers {facts.transformers_version} has no Qwen3-VL",
                       "pip install 'transformers>=5.4,<6'")
    if facts.runtime_experts == "transformers5":
        orient = "holds MoE experts as gate_up_proj [E, 2I, H] / down_proj [E, H, I] (F.linear orientation)"
    else:
        orient = "holds MoE experts as released: gate_up_proj [E, H, 2I] / down_proj [E, I, H]"
    if v >= (5,) and facts.runtime_experts == "transformers5" and facts.moe_conversion_mapping is False:
        return Finding("transformers experts", "fail",
                       f"transformers {facts.transformers_version} {orient} but has no qwen3_vl_moe "
                       "load-time transpose: released MoE checkpoints load with re-initialised experts "
                       "(transformers PR #43201)", "upgrade transformers to a 5.x with PR #43956")
    return Finding("transformers experts", "ok",
                   f"transformers {facts.transformers_version} {orient}; released checkpoints "
                   + ("are transposed on load (check_dims: wrong only when 2I == H or I == H, #47031); "
                      "vlconvert converts by shape against the config either way"
                      if facts.runtime_experts == "transformers5" else "load as stored"))


def check_square_experts(config: Any) -> Finding | None:
    """A MoE config with 2I == H or I == H: transformers' check_dims cannot tell the orientation."""
    from vlconvert.models.registry import family_named, load_config

    info = load_config(config)
    if not info.is_moe or not family_named(info.family).transposed_experts:  # one orientation: nothing to tell
        return None
    square = [what for what, dims in (("2I == H (gate_up_proj)", 2 * info.moe_intermediate == info.hidden),
                                      ("I == H (down_proj)", info.moe_intermediate == info.hidden)) if dims]
    if square:
        return Finding("square experts", "warn", f"{', '.join(square)}: an expert tensor's orientation cannot be "
                       "told from its shape; transformers' check_dims silently skips the transpose (#47031)",
                       "pass --experts-layout explicitly to conversions of this model")
    return Finding("square experts", "ok", "expert dims are non-square: orientation is decided by shape")


def check_cuda_build(facts: EnvFacts) -> Finding:
    """A CUDA build of torch where none is needed (multi-GB download; conversion runs on the CPU)."""
    if facts.torch_cuda is None:
        return Finding("torch build", "ok", f"torch {facts.torch_version} CPU build")
    if not facts.cuda_available:
        return Finding("torch build", "warn", f"torch {facts.torch_version} is a CUDA {facts.torch_cuda} build but "
                       "no GPU is usable here: conversion needs only the CPU build",
                       "pip install torch==<version> --index-url https://download.pytorch.org/whl/cpu "
                       "(pin it: an unpinned 'pip install torch' pulls the multi-GB CUDA build)")
    return Finding("torch build", "ok", f"torch {facts.torch_version} with CUDA {facts.torch_cuda}")


def check_env(facts: EnvFacts) -> Finding:
    """Environment variables that make torch.load run pickled code from checkpoints."""
    if facts.env.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "").lower() in ("1", "true", "yes"):
        return Finding("weights_only", "warn", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: torch.load in other tools "
                       "will run arbitrary pickled code from checkpoints (vlconvert always loads weights_only)",
                       "unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    return Finding("weights_only", "ok", "torch.load keeps weights_only loading")


def check_disk(target: str | Path, needed: int) -> Finding:
    """Free space on the file system of ``target`` (or its nearest existing parent) for ``needed`` bytes."""
    from vlconvert.planning import existing_parent

    where = existing_parent(target)
    free = shutil.disk_usage(where).free
    from vlconvert.progress import human_bytes

    text = f"{human_bytes(free)} free in '{where}', the planned output needs {human_bytes(needed)}"
    if free < needed:
        return Finding("free disk", "fail", text, "free space or choose another --target")
    if free < needed * 1.1:
        return Finding("free disk", "warn", text + " (less than 10% to spare)")
    return Finding("free disk", "ok", text)


def run_doctor(facts: EnvFacts | None = None, target: str | Path | None = None, config: Any = None,
               to: str = "hf", **plan_options: Any) -> list[Finding]:
    """Run every check; ``target`` with ``config`` also checks free disk for the planned output."""
    facts = facts or collect_facts()
    findings = [check_conv3d(facts)]
    diff = conv3d_linear_max_diff()
    findings.append(Finding("Conv3d == Linear", "ok" if diff < 1e-9 else "fail",
                            f"patch Conv3d vs its Linear equivalent on this torch: max abs diff {diff:.1e} (float64)"))
    findings += [check_transformers(facts), check_cuda_build(facts), check_env(facts)]
    if config is not None:
        square = check_square_experts(config)
        if square is not None:
            findings.append(square)
    if target is not None:
        if config is None:
            raise UsageError("--target needs --config CONFIG.json to know the planned output size")
        from vlconvert.planning import plan_conversion

        plan = plan_conversion(config, to, **plan_options)
        findings.append(check_disk(target, plan.total_bytes))
        from vlconvert.publish import check_no_overlap

        try:  # the same rule convert applies: --config is an input, never inside or equal to the output
            check_no_overlap(target, {"--config": config if isinstance(config, (str, Path)) else None},
                             name="--target")
        except UserError as exc:
            findings.append(Finding("target", "fail", str(exc), "choose another --target"))
    concerns = {"torch Conv3d": "conv3d", "Conv3d == Linear": "conv3d", "transformers experts": "transformers experts",
                "square experts": "square experts"}
    families = applies_to()
    for f in findings:
        if f.name in concerns:
            f.applies_to = families[concerns[f.name]]
    return findings


def findings_ok(findings: list[Finding]) -> bool:
    """False when any finding is blocking."""
    return not any(f.status == "fail" for f in findings)


def findings_dict(findings: list[Finding]) -> dict[str, Any]:
    """The ``--json`` output."""
    return {"ok": findings_ok(findings), "findings": [asdict(f) for f in findings]}
