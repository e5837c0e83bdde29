"""One framework check per process (Megatron-Bridge 0.6.2, megatron-core 0.19.2; see README.md here).

Usage: ``python worker.py JOB ARGS...``; prints one JSON line (``RESULT {...}``) and exits 0 when the check
holds. Each job builds what it compares with the installed libraries themselves: the reference is always
Bridge's own import of the HF fixture (``AutoBridge.load_hf_weights``), never vlconvert.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bridge_env  # noqa: E402

bridge_env.install()


def _result(**data) -> None:
    print("RESULT " + json.dumps(data), flush=True)


def _bridge(fixture: str):
    from megatron.bridge import AutoBridge

    return AutoBridge.from_hf_pretrained(fixture, torch_dtype=torch.bfloat16)


def _reference(bridge):
    """Bridge's own HF import: its provider, its model built on the CPU, its weight mapping."""
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    bridge.load_hf_weights(model)
    return model


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model[0].state_dict().items() if not k.endswith("_extra_state")}


def _compare(want: dict[str, torch.Tensor], have: dict[str, torch.Tensor]) -> list[str]:
    bad = sorted(set(want) ^ set(have))
    bad += [k for k in want if k in have and not torch.equal(want[k], have[k])]
    return bad


def bridge_load(fixture: str, dst: str) -> int:
    """``AutoBridge.load_megatron_model(DST)``: Bridge reads run_config.yaml, builds the model, loads it."""
    bridge_env.init_dist(port=int(os.environ.get("PORT", "29511")))
    bridge = _bridge(fixture)
    want = _weights(_reference(bridge))
    have = _weights(bridge.load_megatron_model(dst, wrap_with_ddp=False))
    bad = _compare(want, have)
    _result(tensors=len(want), mismatched=bad[:10])
    return 1 if bad or not want else 0


def _hf_source(fixture: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    source = {}
    for f in sorted(Path(fixture).glob("*.safetensors")):
        source.update(load_file(f))
    return source


def bridge_load_export(fixture: str, dst: str) -> int:
    """``AutoBridge.load_megatron_model(DST)`` builds the model from vlconvert's run_config.yaml alone and loads DST:
    every tensor equals Bridge's own HF import; Bridge's ``export_hf_weights`` of that model gives every HF tensor
    of the source back (Qwen3, Qwen3-MoE, Qwen2.5-VL: GPTModelProvider's default spec on the local modules)."""
    bridge_env.init_dist(port=int(os.environ.get("PORT", "29511")))
    bridge = _bridge(fixture)
    want = _weights(_reference(bridge))
    model = bridge.load_megatron_model(dst, wrap_with_ddp=False)
    have = _weights(model)
    bad = _compare(want, have)
    source = _hf_source(fixture)
    exported = {name: t.cpu() for name, t in bridge.export_hf_weights(model, show_progress=False)}
    export_bad = sorted(set(source) ^ set(exported))
    export_bad += [k for k in source if k in exported and not torch.equal(source[k], exported[k])]
    _result(provider=type(model[0].config).__name__, tensors=len(want), mismatched=bad[:10],
            exported=len(exported), export_mismatched=export_bad[:10])
    return 1 if bad or export_bad or not want else 0


def bridge_export(fixture: str, dst: str, out: str) -> int:
    """``AutoBridge.export_ckpt(DST, OUT)``: Bridge's Megatron -> HF export of vlconvert's output."""
    _bridge(fixture).export_ckpt(dst, out, show_progress=False)
    _result(exported=sorted(p.name for p in Path(out).iterdir()))
    return 0


def bridge_save(fixture: str, out: str) -> int:
    """Bridge's own ``save_megatron_model`` of its HF import (what vlconvert must read)."""
    bridge_env.init_dist(port=int(os.environ.get("PORT", "29511")))
    bridge = _bridge(fixture)
    bridge.save_megatron_model(_reference(bridge), out)
    _result(saved=sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file()))
    return 0


def _callable_name(fn) -> object:
    """A function by its qualified name (a ``functools.partial`` with its arguments): what run_config.yaml can hold."""
    import functools

    if isinstance(fn, functools.partial):
        return (_callable_name(fn.func), fn.args, sorted(fn.keywords.items()))
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def bridge_config(fixture: str, dst: str, callables: str = "skip") -> int:
    """``load_model_config`` of vlconvert's run_config.yaml equals the provider Bridge derives from HF. ``callables``:
    ``skip`` fields holding functions (as the Qwen3-VL check always did) or ``compare`` them by qualified name
    (``activation_func``, and the defaults both keep: layer spec, init methods)."""
    import dataclasses

    from megatron.bridge.training.model_load_save import load_model_config

    bridge_env.init_dist(port=int(os.environ.get("PORT", "29511")))
    want = _bridge(fixture).to_megatron_provider(load_weights=False)
    have, _ = load_model_config(dst)
    import yaml

    written = yaml.safe_load(Path(dst, "run_config.yaml").read_text())["model"]
    differ = []
    for f in dataclasses.fields(want):
        a, b = getattr(want, f.name, None), getattr(have, f.name, None)
        if hasattr(a, "to_dict"):  # an HF sub-config; a key written to run_config.yaml that Bridge's loader
            # drops (it drops norm_topk_prob from its own saves too) is not a difference of vlconvert's
            a, b = a.to_dict(), b.to_dict() if hasattr(b, "to_dict") else b
            dropped = {k for k in written.get(f.name, {}) if k not in b}
            a = {k: v for k, v in a.items() if k not in dropped}
        if f.name.startswith("_"):
            continue
        if callable(a) and callable(b):
            if callables == "skip":
                continue
            a, b = _callable_name(a), _callable_name(b)
        if f.name == "hf_model_id":  # Bridge keeps the path as given, vlconvert makes it absolute
            a, b = Path(a).resolve(), Path(b).resolve()
        if a != b:
            differ.append(f"{f.name}: bridge {a!r} vlconvert {b!r}")
    _result(provider=type(have).__name__, fields=len(dataclasses.fields(want)), differ=differ[:20])
    return 1 if differ or type(have) is not type(want) else 0


MLM_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
              "layernorm_epsilon", "normalization", "qk_layernorm", "gated_linear_unit", "add_bias_linear",
              "add_qkv_bias", "layernorm_zero_centered_gamma", "attention_output_gate",
              "experimental_attention_variant", "linear_attention_freq", "linear_conv_kernel_dim",
              "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
              "mtp_num_layers", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
              "moe_shared_expert_intermediate_size", "moe_shared_expert_gate")


def mlm_config(fixture: str, dst: str) -> int:
    """Bridge's Megatron-LM reader (``load_model_config``: the ``TransformerConfig`` Megatron-LM builds from a
    checkpoint's ``args``) against the provider Bridge's own bridge derives from HF: the language model's
    architecture fields (:data:`MLM_FIELDS`, ``activation_func`` by name, ``args.rotary_percent``)."""
    from megatron.bridge.training.model_load_save import load_model_config

    bridge_env.init_dist(port=int(os.environ.get("PORT", "29511")))
    want = _bridge(fixture).to_megatron_provider(load_weights=False)
    have, args = load_model_config(dst)
    differ = [f"{n}: bridge {getattr(want, n)!r} megatron-lm {getattr(have, n, None)!r}" for n in MLM_FIELDS
              if getattr(want, n) != getattr(have, n, None)]
    if _callable_name(want.activation_func) != _callable_name(have.activation_func):
        differ.append(f"activation_func: {want.activation_func} {have.activation_func}")
    if args is not None and args.rotary_percent != want.rotary_percent:  # a GPTModel argument, not a config field
        differ.append(f"rotary_percent: bridge {want.rotary_percent} megatron-lm {args.rotary_percent}")
    _result(config=type(have).__name__, args=args is not None, differ=differ)
    return 1 if differ or args is None else 0


def _reference_and_loaded(bridge, provider, dst: str) -> tuple[list, list]:
    """Bridge's model with the HF weights (its own import), and a zeroed one that loaded DST at megatron-core's
    default strictness (assume_ok_unexpected: every key the model asks for must exist)."""
    from megatron.core import dist_checkpointing

    ref = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    bridge.load_hf_weights(ref)
    fresh = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    for p in fresh[0].parameters():
        p.data.zero_()
    fresh[0].load_state_dict(dist_checkpointing.load(fresh[0].sharded_state_dict(), dst), strict=False)
    return ref, fresh


def _parallel(rank: int, world: int, port: int, fixture: str, dst: str, tp: int, ep: int, out: str) -> None:
    bridge_env.init_dist(rank, world, port, tp=tp, ep=ep)
    bridge = _bridge(fixture)
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.tensor_model_parallel_size, provider.expert_model_parallel_size = tp, ep
    provider.finalize()
    ref, fresh = _reference_and_loaded(bridge, provider, dst)
    bad = _compare(_weights(ref), _weights(fresh))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"tensors": len(_weights(ref)), "mismatched": bad[:10]}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def mcore_parallel(fixture: str, dst: str, tp: str, ep: str, out: str) -> int:
    """Bridge's Qwen3-VL model at TP/EP over two gloo ranks loads DST with ``dist_checkpointing.load``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_parallel, args=(2, port, fixture, dst, int(tp), int(ep), out), nprocs=2)
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    _result(ranks=ranks)
    return 1 if any(r["mismatched"] or not r["tensors"] for r in ranks) else 0


def mlm_load(fixture: str, dst: str) -> int:
    """Megatron-LM's text-only ``GPTModel``: Bridge's mlm_compat reader takes the config from the checkpoint's
    ``args``; megatron-core builds the model from it and loads DST at default strictness (unprefixed keys)."""
    from megatron.bridge.training.model_load_save import load_model_config
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    bridge_env.init_dist(port=int(os.environ.get("PORT", "29511")))
    config, args = load_model_config(dst)
    bridge_env.cpu_settings(config)
    config.params_dtype = args.params_dtype
    spec = get_gpt_layer_local_spec(num_experts=args.num_experts, moe_grouped_gemm=False,
                                    qk_layernorm=args.qk_layernorm, normalization="RMSNorm")
    model = GPTModel(config, spec, vocab_size=args.padded_vocab_size,
                     max_sequence_length=args.max_position_embeddings, position_embedding_type="rope",
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                     rotary_base=args.rotary_base)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), dst), strict=False)
    bridge = _bridge(fixture)
    want = {k[len("language_model."):]: v for k, v in _weights(_reference(bridge)).items()
            if k.startswith("language_model.")}
    have = {k: v.to(want[k].dtype) if k in want else v for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}
    bad = _compare(want, have)
    _result(tensors=len(want), mismatched=bad[:10], args_layers=args.num_layers)
    return 1 if bad or not want else 0


def bridge_train_load(fixture: str, dst: str, mode: str) -> int:
    """Bridge's training loader ``load_checkpoint``: ``finetune`` (checkpoint.pretrained_checkpoint=DST, as a
    fine-tuning recipe starts) or ``resume`` (checkpoint.load=DST, as a restarted run continues)."""
    from megatron.bridge.training.checkpointing import load_checkpoint
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        LoggerConfig,
        OptimizerConfig,
        RNGConfig,
    )
    from megatron.bridge.training.state import GlobalState

    bridge_env.init_dist(port=int(os.environ.get("PORT", "29511")))
    bridge = _bridge(fixture)
    want = _weights(_reference(bridge))
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    for p in model[0].parameters():
        p.data.zero_()
    checkpoint = CheckpointConfig(load=dst if mode == "resume" else None, load_optim=False, load_rng=False,
                                  pretrained_checkpoint=dst if mode == "finetune" else None)
    state = GlobalState()
    state.cfg = ConfigContainer(model=provider, train=None,
                                optimizer=OptimizerConfig(use_distributed_optimizer=False), ddp=None, scheduler=None,
                                dataset=None, logger=LoggerConfig(), tokenizer=None, checkpoint=checkpoint, dist=None,
                                rng=RNGConfig())
    if mode == "resume":  # a training run has set up its batch schedule before it resumes
        from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

        init_num_microbatches_calculator(0, None, global_batch_size=1, micro_batch_size=1, data_parallel_size=1)
    iteration, _ = load_checkpoint(state, model, None, None)
    bad = _compare(want, _weights(model))
    _result(tensors=len(want), mismatched=bad[:10], iteration=iteration)
    return 1 if bad or not want else 0


def bridge_dump(dst: str, out: str) -> int:
    """Bridge's ``load_megatron_model(DST)`` (any Bridge version: 0.3 for megatron-core 0.16, 0.6 for 0.19),
    its weights saved to ``out`` for a comparison made in another environment."""
    from megatron.bridge.training.model_load_save import load_megatron_model

    bridge_env.init_dist(port=int(os.environ.get("PORT", "29511")))
    model = load_megatron_model(dst, use_cpu_init=True, skip_temp_dist_context=True)
    weights = _weights(model if isinstance(model, list) else [model])
    torch.save(weights, out)
    _result(tensors=len(weights))
    return 0 if weights else 1


def reference_dump(fixture: str, out: str) -> int:
    """Bridge's own HF import of ``fixture``, its weights saved to ``out``."""
    bridge_env.init_dist(port=int(os.environ.get("PORT", "29511")))
    weights = _weights(_reference(_bridge(fixture)))
    torch.save(weights, out)
    _result(tensors=len(weights))
    return 0


def _family_provider(bridge, tp: int, ep: int = 1):
    """Bridge's provider for a Qwen3 / Qwen3-MoE / Qwen2.5-VL HF folder at TP ``tp``, on megatron-core's local
    modules (Bridge's own ``local_layer_spec``: its default asks for Transformer Engine)."""
    from megatron.bridge.models.gpt_provider import local_layer_spec

    provider = bridge.to_megatron_provider(load_weights=False)
    provider.tensor_model_parallel_size, provider.expert_model_parallel_size = tp, ep
    provider.transformer_layer_spec = local_layer_spec
    provider.finalize()
    return provider


def _family_rank(rank: int, world: int, port: int, fixture: str, dst: str, tp: int, ep: int, out: str) -> None:
    from safetensors.torch import load_file

    bridge_env.init_dist(rank, world, port, tp=tp, ep=ep)
    bridge = _bridge(fixture)
    provider = _family_provider(bridge, tp, ep)
    ref, fresh = _reference_and_loaded(bridge, provider, dst)
    want, have = _weights(ref), _weights(fresh)
    bad = _compare(want, have)
    # Bridge's own Megatron -> HF export of the loaded model against the HF folder's tensors
    source = {}
    for f in sorted(Path(fixture).glob("*.safetensors")):
        source.update(load_file(f))
    exported = {name: t.cpu() for name, t in bridge.export_hf_weights(fresh, show_progress=False)}
    export_bad = sorted(set(source) ^ set(exported))
    export_bad += [k for k in source if k in exported and not torch.equal(source[k], exported[k])]
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "tensors": len(want), "mismatched": bad[:10], "exported": len(exported), "export_mismatched": export_bad[:10],
        "elements": sum(t.numel() for t in want.values())}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def family_load(fixture: str, dst: str, tp: str, ep: str, out: str) -> int:
    """Bridge's model for a Qwen3 / Qwen3-MoE / Qwen2.5-VL folder at TP ``tp`` / EP ``ep`` (max(tp, ep) gloo ranks)
    loads DST with ``dist_checkpointing.load`` at default strictness: every tensor equal to Bridge's own HF
    import; Bridge's ``export_hf_weights`` of the loaded model gives the HF folder's tensors back."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = max(int(tp), int(ep))
    torch.multiprocessing.spawn(_family_rank, args=(world, port, fixture, dst, int(tp), int(ep), out), nprocs=world)
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    _result(ranks=ranks)
    return 1 if any(r["mismatched"] or r["export_mismatched"] or not r["tensors"] for r in ranks) else 0


def _dense_layers_in_moe_registry(fixture: str) -> None:
    """A Qwen3-MoE config with dense layers among the MoE ones (``mlp_only_layers``): Bridge's Qwen3-MoE provider
    builds every layer as MoE, so its registry lacks the dense MLP; add its Qwen3 (dense) bridge's own
    ``mlp.linear_fc1`` / ``linear_fc2`` mappings for those layers (the reference import only)."""
    from megatron.bridge.models.conversion.mapping_registry import MegatronMappingRegistry
    from megatron.bridge.models.qwen.qwen3_bridge import Qwen3Bridge
    from megatron.bridge.models.qwen.qwen3_moe_bridge import Qwen3MoEBridge

    if not json.loads(Path(fixture, "config.json").read_text()).get("mlp_only_layers"):
        return
    moe_registry = Qwen3MoEBridge.mapping_registry

    def both(self):
        names = ("decoder.layers.*.mlp.linear_fc1.weight", "decoder.layers.*.mlp.linear_fc2.weight")
        dense = [m for m in Qwen3Bridge.mapping_registry(self).mappings if m.megatron_param in names]
        return MegatronMappingRegistry(*moe_registry(self).mappings, *dense)

    Qwen3MoEBridge.mapping_registry = both


def _mlm_rank(rank: int, world: int, port: int, fixture: str, dst: str, out: str, overrides: str) -> None:
    from megatron.bridge.training.model_load_save import load_model_config
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    bridge_env.init_dist(rank, world, port, tp=world)
    config, args = load_model_config(dst)  # Bridge's Megatron-LM reader: the checkpoint's own ``args``
    bridge_env.cpu_settings(config)
    config.params_dtype, config.tensor_model_parallel_size = args.params_dtype, world
    for name, value in json.loads(overrides).items():  # given on the command line (--moe-layer-freq, ...)
        setattr(config, name, value)

    def build() -> GPTModel:  # as Megatron-LM's pretrain_gpt.py builds it (local modules, mixed layers allowed)
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
        return GPTModel(config, spec, vocab_size=args.padded_vocab_size,
                        max_sequence_length=args.max_position_embeddings, position_embedding_type="rope",
                        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                        rotary_base=args.rotary_base)

    model = build()
    for p in model.parameters():
        p.data.zero_()
    # megatron-core's default strictness: every key the model asks for must be in the checkpoint
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), dst), strict=False)
    ref = build()  # the same GPTModel, filled by Bridge's own HF -> Megatron mapping of the HF folder
    _dense_layers_in_moe_registry(fixture)
    vocab = ["embedding.word_embeddings.weight", "output_layer.weight"]  # Megatron-LM pads the rows, Bridge not
    _bridge(fixture).load_hf_weights([ref], allowed_mismatched_params=vocab)
    want = {k: v for k, v in ref.state_dict().items() if not k.endswith("_extra_state") and k not in vocab}
    have = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    bad = _compare(want, {k: v for k, v in have.items() if k not in vocab})
    # the vocabulary rows against the HF tensors themselves: the TP shards gathered, the first V rows compared
    from safetensors.torch import load_file

    hf = {}
    for f in sorted(Path(fixture).glob("*.safetensors")):
        hf.update(load_file(f))
    padded_max = 0.0
    for name, hf_name in zip(vocab, ["model.embed_tokens.weight", "lm_head.weight"], strict=True):
        if name not in have:
            continue
        parts = [torch.empty_like(have[name]) for _ in range(world)]
        torch.distributed.all_gather(parts, have[name].contiguous())
        full, source = torch.cat(parts), hf.get(hf_name, hf["model.embed_tokens.weight"])
        want[name] = source
        if full.shape[0] != args.padded_vocab_size or not torch.equal(full[: source.shape[0]], source):
            bad.append(name)
        padded_max = max(padded_max, float(full[source.shape[0]:].float().abs().max()))
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "tensors": len(want), "mismatched": bad[:10], "elements": sum(t.numel() for t in want.values()),
        "vocab_rows": model.embedding.word_embeddings.weight.shape[0] * world, "padded_rows_max": padded_max,
        "moe_layers": [i for i, layer in enumerate(model.decoder.layers) if hasattr(layer.mlp, "router")]}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def mlm_family(fixture: str, dst: str, tp: str, out: str, overrides: str = "{}") -> int:
    """megatron-core's own GPTModel (unprefixed, as Megatron-LM saves), built from the checkpoint's ``args`` at TP
    ``tp`` on gloo ranks, loads DST with ``dist_checkpointing.load`` at default strictness; every tensor equals
    Bridge's HF -> Megatron import of the HF folder into the same model, the padded vocabulary tensors' first V rows
    equal the HF tensors. ``overrides``: config fields given instead of the checkpoint's ``args`` (JSON), as a
    Megatron-LM user passes them on the command line (``--moe-layer-freq``, ``--ffn-hidden-size``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = int(tp)
    torch.multiprocessing.spawn(_mlm_rank, args=(world, port, fixture, dst, out, overrides), nprocs=world)
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    _result(ranks=ranks)
    return 1 if any(r["mismatched"] or not r["tensors"] for r in ranks) else 0


JOBS = {"bridge-load": bridge_load, "bridge-load-export": bridge_load_export,
        "bridge-export": bridge_export, "bridge-save": bridge_save,
        "bridge-config": bridge_config, "bridge-train-load": bridge_train_load, "mcore-parallel": mcore_parallel,
        "mlm-load": mlm_load, "bridge-dump": bridge_dump, "reference-dump": reference_dump,
        "family-load": family_load, "mlm-family": mlm_family, "mlm-config": mlm_config}

if __name__ == "__main__":
    code = JOBS[sys.argv[1]](*sys.argv[2:])
    sys.stdout.flush()
    os._exit(code)
