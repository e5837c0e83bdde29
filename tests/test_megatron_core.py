"""Rank files against megatron-core's own GPTModel (language model part, local spec, built on the CPU).

Needs ``megatron-core==0.16.1`` (``pip install megatron-core==0.16.1``); skipped without it.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from vlconvert.layouts import megatron as mlay  # noqa: E402
from vlconvert.megatron_convert import hf_to_megatron  # noqa: E402
from vlconvert.models.qwen3vl import load_config  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures"
LM = "language_model."


def build_gpt(fixture: str):
    """megatron-core GPTModel with the local spec for the text model of ``fixture`` (current parallel state)."""
    warnings.filterwarnings("ignore")
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    info = load_config(FIX / fixture / "config.json")
    text = info.raw["text_config"]
    moe = dict(num_moe_experts=info.experts, moe_router_topk=info.experts_per_token,
               moe_ffn_hidden_size=info.moe_intermediate) if info.is_moe else {}
    cfg = TransformerConfig(num_layers=info.layers, hidden_size=info.hidden, num_attention_heads=info.heads,
                            num_query_groups=info.kv_heads, kv_channels=info.head_dim,
                            ffn_hidden_size=info.intermediate, normalization="RMSNorm", gated_linear_unit=True,
                            activation_func=torch.nn.functional.silu, add_bias_linear=False, qk_layernorm=True,
                            layernorm_epsilon=text.get("rms_norm_eps", 1e-6), use_cpu_initialization=True,
                            tensor_model_parallel_size=torch.distributed.get_world_size()
                            if _TP_FROM_WORLD else 1, **moe)
    spec = get_gpt_layer_local_spec(num_experts=info.experts or None, moe_grouped_gemm=False, qk_layernorm=True,
                                    normalization="RMSNorm")
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=info.vocab, max_sequence_length=256,
                    share_embeddings_and_output_weights=info.tied, position_embedding_type="rope",
                    rotary_base=int(text.get("rope_theta", 5000000)))


_TP_FROM_WORLD = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_torch_dist_loads_as(model: torch.nn.Module, build: Callable[[], torch.nn.Module], written: str) -> None:
    """A fresh model from ``build()`` (zeroed) loads the torch_dist checkpoint ``written`` through its own
    ``sharded_state_dict`` at default strictness, and every tensor equals ``model``'s (extra state aside)."""
    from megatron.core import dist_checkpointing

    fresh = build()
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), written), strict=False)
    want = model.state_dict()
    for name, tensor in fresh.state_dict().items():
        if not name.endswith("_extra_state"):
            assert torch.equal(tensor, want[name]), name


def _lm_part(path: Path) -> dict[str, torch.Tensor]:
    rf = mlay.RankFile(path)
    return {n[len(LM):]: rf.read(n) for n in rf.tensors if n.startswith(LM)}


def _init(rank: int, world: int, port: int, tp: int, ep: int = 1) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.get_cuda_rng_tracker().add = lambda *a, **k: None  # CPU: no CUDA RNG streams
    torch.manual_seed(0)


@pytest.mark.parametrize("fixture", ["tiny-dense-tied", "tiny-dense-untied", "tiny-moe"])
def test_tp1_rank_loads_strict_into_gptmodel(tmp_path: Path, fixture: str) -> None:
    hf_to_megatron(FIX / fixture, tmp_path / "mg", spec="local", experts="sequential")
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_strict_worker, args=(fixture, str(tmp_path / "mg"), _free_port()))
    proc.start()
    proc.join(180)
    assert proc.exitcode == 0, f"megatron-core strict load failed for {fixture} (see captured stderr)"


def _strict_worker(fixture: str, root: str, port: int) -> None:
    _init(0, 1, port, 1)
    model = build_gpt(fixture)
    sd = _lm_part(Path(root) / "release/mp_rank_00/model_optim_rng.pt")
    expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    assert set(sd) == expected, (set(sd) ^ expected)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in model.state_dict().items():
        if not name.endswith("_extra_state"):
            assert torch.equal(tensor, sd[name].to(tensor.dtype)), name
    torch.distributed.destroy_process_group()


def _shape_worker(rank: int, world: int, port: int, jobs: list[tuple[str, str, int, int]]) -> None:
    for fixture, root, tp, ep in jobs:
        _init(rank, world, port, tp, ep)
        from megatron.core import parallel_state

        t = parallel_state.get_tensor_model_parallel_rank()
        e = parallel_state.get_expert_model_parallel_rank()
        model = build_gpt(fixture)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        folder = mlay.rank_folder(t, 0, e, 1, ep)
        got = {k: tuple(v.shape) for k, v in _lm_part(Path(root) / "release" / folder / mlay.RANK_FILE).items()}
        assert got == want, f"{folder}: {set(got.items()) ^ set(want.items())}"
    torch.distributed.barrier()  # no rank tears gloo down while the other still works
    torch.distributed.destroy_process_group()


def test_tp2_and_ep2_shapes_match_gptmodel(tmp_path: Path) -> None:
    jobs = []
    for fixture, tp, ep in [("tiny-dense-untied", 2, 1), ("tiny-moe", 2, 1), ("tiny-moe", 1, 2)]:
        root = tmp_path / f"{fixture}-{tp}-{ep}"
        hf_to_megatron(FIX / fixture, root, tp=tp, ep=ep, spec="local", experts="sequential")
        jobs.append((fixture, str(root), tp, ep))
    torch.multiprocessing.spawn(_shape_worker, args=(2, _free_port(), jobs), nprocs=2, join=True)
