"""Run ms-swift 4.6.0's Megatron model code (mcore-bridge 1.6.5) on a CPU-only torch without Transformer Engine
(test-only).

What is replaced, and nothing else:
- While ``mcore_bridge`` is imported, and only then: bare ``transformer_engine`` and ``transformer_engine.pytorch``
  modules in ``sys.modules`` (mcore-bridge imports them at module level in files Qwen3-VL does not use; its
  import-time patcher then logs "Failed to patch apply_rotary_pos_emb/_SplitAlongDim"), and placeholder classes,
  which raise if built, for the ``TE*`` names of ``megatron.core.extensions.transformer_engine`` that are not
  classes without TE (``None`` or a ``MagicMock``: ``TELinear``, ``TEGroupedLinear``,
  ``TELayerNormColumnParallelLinear``, ...). mcore-bridge imports these by name, sets attributes on them and uses
  them in ``isinstance``. Both are put back afterwards, so megatron-core itself still sees no TE: the
  megatron-core modules that mcore-bridge imports are imported before (``_MCORE_FIRST``, and megatron-core's TE
  version is cached as 0.0.0); any other megatron module first imported in between raises.
- ``ModelLoader.get_transformer_layer_spec`` calls ``get_gpt_decoder_block_spec(use_transformer_engine=True)``
  (a hard-coded TE spec); here the same megatron-core call gets ``use_transformer_engine=False`` (the local spec;
  megatron-core maps the local norms to TE names on save, so the keys are the TE spec's). mcore-bridge's own
  changes to that spec (its TransformerLayer, TopKRouter, Qwen3-VL block) still apply.
- ``GPTBridge`` (the HF import) addresses TE parameters by name: the fused norms
  ``self_attention.linear_qkv.layer_norm_weight``/``mlp.linear_fc1.layer_norm_weight`` and the grouped experts
  ``mlp.experts.linear_fc{1,2}.weight<i>``. ``_set_state_dict`` and ``_set_mlp_state`` get the local modules'
  same parameters under those names: the norms through the layer's own ``sharded_state_dict_keys_map``
  (megatron-core's local<->TE map), the experts from ``SequentialMLP.local_experts[i]``. No tensor is copied
  or changed; the bridge's own code reads, splits, transposes and writes them.
- ``HuggingFaceVit.__init__``'s ``self.to(device='cuda')`` is skipped: the vision tower stays on the CPU.
- :func:`model_config` turns off the fused CUDA/TE kernels in the ``ModelConfig`` (as ``bridge_env.cpu_settings``;
  ``moe_grouped_gemm=False``, i.e. SequentialMLP, which writes the same keys), and uses the allgather token
  dispatcher (the alltoall one creates a CUDA stream), hence ``variable_seq_lengths=False``.
- ``torch.cuda.synchronize``/``current_device``/``get_rng_state``, the CUDA RNG tracker, and the forked writer
  processes of ``dist_checkpointing.save`` (no CUDA here), as in ``bridge_env.py``. ms-swift's
  ``megatron_lm_utils`` module (:func:`install_swift`) sees a ``torch`` whose ``tensor``/``zeros``/``empty`` build
  ``device='cuda'`` tensors on the CPU (its tracker read all-reduces a CUDA tensor).
Everything else (ModelConfig, hf_to_mcore_config, get_mcore_model, GPTBridge.load_weights, ms-swift's
load_mcore_checkpoint/save_mcore_checkpoint, megatron-core) is the installed code.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

_MCORE_FIRST = (
    "megatron.core.models.gpt.gpt_layer_specs", "megatron.core.extensions.kitchen",
    "megatron.core.inference.contexts.attention_context.triton.tensor_ops",
    "megatron.core.models.gpt.experimental_attention_variant_module_specs", "megatron.core.models.huggingface.module",
    "megatron.core.models.hybrid.hybrid_model", "megatron.core.models.hybrid.hybrid_layer_specs",
    "megatron.core.ssm.gated_delta_net", "megatron.core.ssm.mlp_layer",
    "megatron.core.transformer.experimental_attention_variant.absorbed_mla",
    "megatron.core.transformer.experimental_attention_variant.dsa",
)


def _placeholder(name: str) -> type:
    def init(self, *a, **k):
        raise RuntimeError(f"{name} needs Transformer Engine (stand-in class)")

    return type(name, (), {"__init__": init})


def _cuda_stubs() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
    from helpers import cpu_save_patches

    cpu_save_patches()


class _CpuTorch(types.ModuleType):
    """``torch`` for one module: ``tensor``/``zeros``/``empty`` with ``device='cuda'`` build CPU tensors."""

    def __init__(self) -> None:
        import torch

        super().__init__("torch")
        self._torch = torch

    def __getattr__(self, name):
        attr = getattr(self._torch, name)
        if name not in ("tensor", "zeros", "empty"):
            return attr

        def cpu(*a, **k):
            if str(k.get("device", "")).startswith("cuda"):
                k["device"] = "cpu"
            return attr(*a, **k)

        return cpu


def install() -> None:
    """Install the stand-ins and import mcore_bridge; call before anything else imports mcore_bridge."""
    import megatron.core.extensions.transformer_engine as mte
    import peft  # noqa: F401  (peft probes for transformer_engine with find_spec: import it first)
    import peft.tuners.lora  # noqa: F401
    from megatron.core.utils import get_te_version

    get_te_version()  # cached as 0.0.0 (no TE) before the stand-in module exists
    for name in _MCORE_FIRST:  # megatron-core modules mcore-bridge imports: let them see that TE is absent
        importlib.import_module(name)
    _cuda_stubs()
    before = set(sys.modules)
    saved = {n: v for n, v in vars(mte).items() if n.startswith("TE") and not isinstance(v, type)}
    for n in saved:
        setattr(mte, n, _placeholder(n))
    te = types.ModuleType("transformer_engine")
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    sys.modules.update({"transformer_engine": te, "transformer_engine.pytorch": te.pytorch})
    try:
        import mcore_bridge
        import mcore_bridge.bridge  # noqa: F401
        import mcore_bridge.config  # noqa: F401
        import mcore_bridge.model  # noqa: F401
        import mcore_bridge.tuners  # noqa: F401
        from mcore_bridge.model import register
        from mcore_bridge.model.mm_gpts import utils as mm_utils

        mcore_bridge.get_mcore_model  # noqa: B018  (resolve the lazy module while the stand-ins are in place)
    finally:
        del sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"]
        for n, v in saved.items():
            setattr(mte, n, v)
    new = sorted(m for m in set(sys.modules) - before if m.startswith("megatron"))
    if new:  # these would have seen the stand-in transformer_engine: import them in _MCORE_FIRST
        raise RuntimeError(f"megatron modules first imported under the transformer_engine stand-in: {new}")

    te_spec = register.get_gpt_decoder_block_spec

    def local_spec(config, use_transformer_engine=True, **kw):
        return te_spec(config, use_transformer_engine=False, **kw)

    register.get_gpt_decoder_block_spec = local_spec

    to = mm_utils.HuggingFaceVit.to

    def vit_to(self, *a, **k):
        if k.get("device") == "cuda":
            return self
        return to(self, *a, **k)

    mm_utils.HuggingFaceVit.to = vit_to
    _bridge_addressing()


def _bridge_addressing() -> None:
    """GPTBridge's TE parameter names for the local modules' same parameters (see the module docstring)."""
    from mcore_bridge.bridge import gpt_bridge
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    bridge = gpt_bridge.GPTBridge
    set_state_dict, set_mlp_state = bridge._set_state_dict, bridge._set_mlp_state

    def _set_state_dict(self, mg_module, mg_key, *a, **k):
        if isinstance(mg_module, TransformerLayer):
            for local, te in mg_module.submodules_config.sharded_state_dict_keys_map.items():
                if mg_key.startswith(te):
                    mg_key = local + mg_key[len(te):]
        return set_state_dict(self, mg_module, mg_key, *a, **k)

    def _grouped(experts: SequentialMLP) -> types.SimpleNamespace:
        view = {}
        for fc in ("linear_fc1", "linear_fc2"):
            view[fc] = types.SimpleNamespace(**{f"{p}{i}": getattr(getattr(e, fc), p)
                                                for i, e in enumerate(experts.local_experts)
                                                for p in ("weight", "bias") if getattr(getattr(e, fc), p, None)
                                                is not None})
        return types.SimpleNamespace(**view)

    def _set_mlp_state(self, mg_mlp, *a, **k):
        if isinstance(mg_mlp, SequentialMLP):
            mg_mlp = _grouped(mg_mlp)
        return set_mlp_state(self, mg_mlp, *a, **k)

    bridge._set_state_dict, bridge._set_mlp_state = _set_state_dict, _set_mlp_state


def install_swift() -> None:
    """Let ms-swift's ``megatron_lm_utils`` run on the CPU: its module-level ``torch`` only (see the module docstring).
    Importing it runs ms-swift's own ``init_megatron_env`` patches, as ``megatron sft/export`` do."""
    from swift.megatron.utils import megatron_lm_utils

    megatron_lm_utils.torch = _CpuTorch()


def model_config(fixture: str, tp: int = 1, ep: int = 1):
    """mcore-bridge's ``ModelConfig`` for an HF folder as its README builds it (``hf_to_mcore_config``), bf16,
    with the CUDA/TE kernels turned off."""
    import torch
    from mcore_bridge import ModelConfig, hf_to_mcore_config
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(fixture)
    return ModelConfig(params_dtype=torch.bfloat16, bf16=True, tensor_model_parallel_size=tp,
                       expert_model_parallel_size=ep, use_cpu_initialization=True, moe_grouped_gemm=False,
                       gradient_accumulation_fusion=False, moe_permute_fusion=False, bias_activation_fusion=False,
                       masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
                       apply_rope_fusion=False, moe_token_dispatcher_type="allgather",
                       variable_seq_lengths=False, **hf_to_mcore_config(hf_config))


def init_dist(rank: int = 0, world: int = 1, port: int = 29711, tp: int = 1, ep: int = 1) -> None:
    """gloo process group and megatron-core model-parallel groups on the CPU (``tests/helpers.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
    from helpers import init_gloo

    init_gloo(rank, world, port, tp, ep)
