"""Run Megatron-Bridge 0.6.2 on a CPU-only torch without Transformer Engine (test-only).

What is replaced, and nothing else:
- ``megatron.bridge.peft.lora_layers`` (imports TE unconditionally) by a module whose three classes
  (LinearAdapter, LoRALinear, LoRATopKRouter) raise if built; no LoRA is used by these tests. Bridge 0.3.1
  (the one for megatron-core 0.16) imports TE in ``megatron.bridge.peft.lora`` too: stubbed the same way
  there (LoRA, VLMLoRA, LoRAMerge), and only for that version.
- ``gpt_provider.transformer_engine_layer_spec`` (what a ``GPTModelProvider``'s default layer spec calls) by
  Bridge's own ``local_layer_spec`` (megatron-core's local modules).
- The TE module classes Bridge's Qwen3-VL model and provider pick (``get_vit_layer_with_transformer_engine_spec``,
  ``TENorm``/``TEColumnParallelLinear``/``TERowParallelLinear`` for the patch mergers and
  ``get_gpt_layer_with_transformer_engine_spec`` for the language model) by megatron-core's local
  equivalents: the language model's keys are the TE spec's (megatron-core maps the local norms to TE
  names on save); the local ViT spec keeps ``input_layernorm``/``pre_mlp_layernorm`` (hence ``--spec local``).
- ``GPTModelProvider.finalize`` first turns off the fused CUDA/TE kernels the provider asks for
  (:func:`cpu_settings`), since a provider read back from ``run_config.yaml`` asks for them.
- ``torch.cuda.synchronize``/``current_device``/``get_rng_state``, the CUDA RNG tracker, and the forked
  writer processes of ``dist_checkpointing.save`` (no CUDA here): ``tests/helpers.py`` ``cpu_save_patches``.
Everything else (AutoBridge, providers, weight mappings, checkpoint loaders, megatron-core) is the
installed code.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path


class _NoLoRA:
    def __init__(self, *a, **k):
        raise RuntimeError("LoRA layers need Transformer Engine (stand-in module)")


def install() -> None:
    """Install the stand-ins; call before importing megatron.bridge."""
    stub = types.ModuleType("megatron.bridge.peft.lora_layers")
    for name in ("LinearAdapter", "LoRALinear", "LoRATopKRouter", "TEFusedLoRALinear"):
        setattr(stub, name, type(name, (_NoLoRA,), {}))
    sys.modules["megatron.bridge.peft.lora_layers"] = stub
    import importlib.util

    lora = Path(importlib.util.find_spec("megatron.bridge").origin).parent / "peft" / "lora.py"  # not imported
    if lora.is_file() and "import transformer_engine" in lora.read_text():  # Bridge < 0.6 (0.3.1: mcore 0.16)
        stub = types.ModuleType("megatron.bridge.peft.lora")
        for name in ("LoRA", "VLMLoRA", "LoRAMerge", "CanonicalLoRA"):
            setattr(stub, name, type(name, (_NoLoRA,), {}))
        sys.modules["megatron.bridge.peft.lora"] = stub

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
    from helpers import cpu_save_patches

    cpu_save_patches()

    from megatron.bridge.models.qwen_vl import qwen3_vl_provider
    from megatron.bridge.models.qwen_vl.modelling_qwen3_vl import model as qmodel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def lm_spec(num_experts=None, moe_grouped_gemm=False, qk_layernorm=False, fp8=False, **kw):
        return get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_layernorm,
                                        normalization="RMSNorm")

    qwen3_vl_provider.get_gpt_layer_with_transformer_engine_spec = lm_spec
    from megatron.bridge.models import gpt_provider
    from megatron.bridge.models.gpt_provider import GPTModelProvider

    # a GPTModelProvider read back from run_config.yaml (Qwen3, Qwen3-MoE, Qwen2.5-VL) keeps its default spec,
    # which asks for TE modules: its TE layer spec is Bridge's own local one here
    gpt_provider.transformer_engine_layer_spec = gpt_provider.local_layer_spec

    finalize = GPTModelProvider.finalize

    def cpu_finalize(self):  # a provider read back from run_config.yaml asks for TE's fused kernels
        cpu_settings(self)
        return finalize(self)

    GPTModelProvider.finalize = cpu_finalize
    qmodel.get_vit_layer_with_transformer_engine_spec = get_vit_layer_with_local_spec
    qmodel.TENorm = WrappedTorchNorm
    qmodel.TEColumnParallelLinear = ColumnParallelLinear
    qmodel.TERowParallelLinear = RowParallelLinear


def init_dist(rank: int = 0, world: int = 1, port: int = 29511, tp: int = 1, ep: int = 1) -> None:
    """gloo process group and megatron-core model-parallel groups on the CPU (``tests/helpers.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
    from helpers import init_gloo

    init_gloo(rank, world, port, tp, ep)


def cpu_settings(cfg) -> None:
    """Turn off the fused CUDA/TE kernels a provider or TransformerConfig asks for (CPU build here)."""
    for name, value in (("gradient_accumulation_fusion", False), ("moe_permute_fusion", False),
                        ("moe_grouped_gemm", False), ("bias_activation_fusion", False),
                        ("masked_softmax_fusion", False), ("persist_layer_norm", False),
                        ("bias_dropout_fusion", False), ("apply_rope_fusion", False),
                        ("moe_token_dispatcher_type", "allgather"), ("use_cpu_initialization", True),
                        ("sequence_parallel", False)):  # torch's LayerNorm has no sequence-parallel path
        if hasattr(cfg, name):
            setattr(cfg, name, value)
