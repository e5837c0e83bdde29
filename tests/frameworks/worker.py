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


def bridge_config(fixture: str, dst: str) -> int:
    """``load_model_config`` of vlconvert's run_config.yaml equals the provider Bridge derives from HF."""
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
        if f.name.startswith("_") or callable(a) and callable(b):
            continue
        if f.name == "hf_model_id":  # Bridge keeps the path as given, vlconvert makes it absolute
            a, b = Path(a).resolve(), Path(b).resolve()
        if a != b:
            differ.append(f"{f.name}: bridge {a!r} vlconvert {b!r}")
    _result(provider=type(have).__name__, fields=len(dataclasses.fields(want)), differ=differ[:20])
    return 1 if differ or type(have) is not type(want) else 0


def _parallel(rank: int, world: int, port: int, fixture: str, dst: str, tp: int, ep: int, out: str) -> None:
    from megatron.core import dist_checkpointing

    bridge_env.init_dist(rank, world, port, tp=tp, ep=ep)
    bridge = _bridge(fixture)
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.tensor_model_parallel_size, provider.expert_model_parallel_size = tp, ep
    provider.finalize()
    ref = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    bridge.load_hf_weights(ref)
    fresh = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    for p in fresh[0].parameters():
        p.data.zero_()
    # megatron-core's default strictness (assume_ok_unexpected): every key the model asks for must exist
    loaded = dist_checkpointing.load(fresh[0].sharded_state_dict(), dst)
    fresh[0].load_state_dict(loaded, strict=False)
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


JOBS = {"bridge-load": bridge_load, "bridge-export": bridge_export, "bridge-save": bridge_save,
        "bridge-config": bridge_config, "bridge-train-load": bridge_train_load, "mcore-parallel": mcore_parallel,
        "mlm-load": mlm_load, "bridge-dump": bridge_dump, "reference-dump": reference_dump}

if __name__ == "__main__":
    code = JOBS[sys.argv[1]](*sys.argv[2:])
    sys.stdout.flush()
    os._exit(code)
