"""Qwen3, Qwen3-MoE and Qwen2.5-VL through every layout: HF -> DCP / Megatron (TP 1, TP 2, EP 2) / torch_dist and
back, bit-exact; the DCP loads with ``dcp.load`` into the transformers model; the converted-back model's logits equal
the source's; plan, inspect and verify accept them.

Tiny bf16 models are built with transformers' own classes from a config (the shapes of ``tests/test_families.py``)
and saved with ``save_pretrained`` in a session temp dir; nothing is committed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_hf_tensors, run_cli
from test_families import CONFIGS as FAMILY_CONFIGS

from vlconvert.engine import Converter
from vlconvert.inspection import inspect_checkpoint
from vlconvert.planning import plan_conversion

# the tiny configs of tests/test_families.py (real shapes scaled down), under their model_type names
CONFIGS: dict[str, dict] = {"qwen3": FAMILY_CONFIGS["qwen3-tied"], "qwen3_moe": FAMILY_CONFIGS["qwen3-moe"],
                            "qwen2_5_vl": FAMILY_CONFIGS["qwen2_5_vl"]}
FAMILIES = list(CONFIGS)
INPUT_IDS = torch.tensor([[1, 5, 17, 42, 7, 88, 3, 60]])


def _model_class(config: dict):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM


def _build(config: dict) -> torch.nn.Module:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**json.loads(json.dumps(config)))
    torch.manual_seed(0)
    model = _model_class(config).from_config(cfg).to(torch.bfloat16)
    with torch.no_grad():  # norms start at 1 and biases at 0: give every tensor distinct values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def _load(folder: Path, family: str) -> torch.nn.Module:
    return _model_class(CONFIGS[family]).from_pretrained(folder, dtype=torch.bfloat16).eval()


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict, torch.Tensor]]:
    """Per family: the save_pretrained folder, the model's run-time state dict and the saved model's logits."""
    root = tmp_path_factory.mktemp("family-routes")
    out = {}
    for name, config in CONFIGS.items():
        model = _build(config)
        model.save_pretrained(root / name)
        # the source's logits as the converted-back model is loaded (from_pretrained), not the in-memory model
        out[name] = (root / name, {k: v.clone() for k, v in model.state_dict().items()},
                     _logits(_load(root / name, name)))
    return out


def _dcp_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from vlconvert.layouts.dcp import DCPReader

    reader = DCPReader(folder)
    try:
        return {key: reader.read(key) for key in reader.tensors}
    finally:
        reader.close()


def _same_tensors(a: Path, b: Path) -> None:
    left, right = load_hf_tensors(a), load_hf_tensors(b)
    assert sorted(left) == sorted(right)
    for name, tensor in left.items():
        assert tensor.dtype == right[name].dtype and torch.equal(tensor, right[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_dcp_loads_into_the_transformers_model_and_round_trips(sources: dict, tmp_path: Path, family: str) -> None:
    import torch.distributed.checkpoint as dcp

    src, state, logits = sources[family]
    Converter(src, tmp_path / "dcp", to="dcp").run()
    fresh = _build(CONFIGS[family])
    target = fresh.state_dict()
    dcp.load(target, checkpoint_id=str(tmp_path / "dcp"))  # strict: every key of the model's state dict
    assert sorted(target) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(target[name], tensor), name
    Converter(tmp_path / "dcp", tmp_path / "hf", to="hf", assets_dir=src).run()
    _same_tensors(src, tmp_path / "hf")
    assert torch.equal(_logits(_load(tmp_path / "hf", family)), logits)


ROUTES = [("qwen3", {}), ("qwen3", {"tp": 2}), ("qwen3_moe", {}), ("qwen3_moe", {"tp": 2}),
          ("qwen3_moe", {"ep": 2}), ("qwen3_moe", {"tp": 2, "ep": 2}), ("qwen2_5_vl", {}), ("qwen2_5_vl", {"tp": 2})]


@pytest.mark.parametrize(("family", "sizes"), ROUTES, ids=[f"{f}-{'-'.join(f'{k}{v}' for k, v in s.items()) or 'tp1'}"
                                                            for f, s in ROUTES])
def test_megatron_round_trip_is_bit_exact(sources: dict, tmp_path: Path, family: str, sizes: dict) -> None:
    src, _, logits = sources[family]
    result = Converter(src, tmp_path / "mg", to="megatron", **sizes).run()
    ranks = sizes.get("tp", 1) * sizes.get("ep", 1)
    assert len(result.plan.megatron.ranks) == ranks
    Converter(tmp_path / "mg", tmp_path / "hf", to="hf", assets_dir=src).run()
    _same_tensors(src, tmp_path / "hf")
    if sizes.get("tp") == 2:
        assert torch.equal(_logits(_load(tmp_path / "hf", family)), logits)
    if sizes.get("ep") == 2 or family != "qwen3_moe" and sizes:  # Megatron -> DCP holds what HF -> DCP holds
        Converter(tmp_path / "mg", tmp_path / "dcp-from-mg", to="dcp", assets_dir=src).run()
        Converter(src, tmp_path / "dcp-from-hf", to="dcp").run()
        left, right = _dcp_tensors(tmp_path / "dcp-from-mg"), _dcp_tensors(tmp_path / "dcp-from-hf")
        assert sorted(left) == sorted(right)
        assert all(torch.equal(left[k], right[k]) and left[k].dtype == right[k].dtype for k in left)


TORCH_DIST = [("qwen3", "mbridge"), ("qwen3", "megatron-lm"), ("qwen3_moe", "mbridge"), ("qwen3_moe", "megatron-lm"),
              ("qwen2_5_vl", "mbridge"), ("qwen2_5_vl", "ms-swift")]


@pytest.mark.parametrize(("family", "consumer"), TORCH_DIST)
def test_torch_dist_round_trip_is_bit_exact(sources: dict, tmp_path: Path, family: str, consumer: str) -> None:
    src = sources[family][0]
    Converter(src, tmp_path / "td", to="torch_dist", consumer=consumer).run()
    Converter(tmp_path / "td", tmp_path / "hf", to="hf", assets_dir=src).run()
    _same_tensors(src, tmp_path / "hf")
    Converter(tmp_path / "td", tmp_path / "mg", to="megatron", tp=2, assets_dir=src).run()
    Converter(tmp_path / "mg", tmp_path / "hf2", to="hf", assets_dir=src).run()
    _same_tensors(src, tmp_path / "hf2")


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_dist_for_megatron_bridge(sources: dict, tmp_path: Path, family: str) -> None:
    """The default consumer (Megatron-Bridge) writes its run_config.yaml beside the tensors of ``--for mbridge``
    (unpadded vocabulary; values in tests/test_bridge_run_config.py); back to HF bit-exact. Qwen3-MoE with a dense
    layer among MoE ones (layer 1 here) is refused in one line: Bridge 0.6.2's provider builds every layer as MoE."""
    src = sources[family][0]
    if family == "qwen3_moe":
        result = run_cli("convert", src, tmp_path / "td", "--to", "torch_dist", expect=1)
        assert "run_config.yaml" in result.output and "mlp_only_layers" in result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "td").exists()
        return
    run_cli("convert", src, tmp_path / "td", "--to", "torch_dist", "-q")
    model = yaml.safe_load((tmp_path / "td/iter_0000000/run_config.yaml").read_text())["model"]
    assert model["num_layers"] == 3 and model["hidden_size"] == 32 and model["hf_model_id"] == str(src.resolve())
    Converter(tmp_path / "td", tmp_path / "hf", to="hf", assets_dir=src).run()
    _same_tensors(src, tmp_path / "hf")
    Converter(src, tmp_path / "mb", to="torch_dist", consumer="mbridge").run()
    ours, theirs = _dcp_tensors(tmp_path / "td/iter_0000000"), _dcp_tensors(tmp_path / "mb/release")
    assert sorted(ours) == sorted(theirs)
    # Bridge builds these models unpadded (should_pad_vocab False); mbridge's rows are padded to 128 with zeros
    vocab = [k for k in ours if k.endswith(("word_embeddings.weight", "output_layer.weight"))]
    assert vocab and all(ours[k].shape[0] == 96 and theirs[k].shape[0] == 128 for k in vocab)
    assert all(torch.equal(ours[k], theirs[k][:96]) and not theirs[k][96:].any() for k in vocab)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k not in vocab)


def test_text_moe_torch_dist_keys_are_megatron_cores(sources: dict, tmp_path: Path) -> None:
    from vlconvert.layouts.dcp import DCPReader
    from vlconvert.layouts.torch_dist import find_torch_dist_dir

    Converter(sources["qwen3_moe"][0], tmp_path / "td", to="torch_dist", consumer="mbridge").run()
    folder, _ = find_torch_dist_dir(tmp_path / "td")
    keys = set(DCPReader(folder).tensors)
    assert "embedding.word_embeddings.weight" in keys and "output_layer.weight" in keys
    assert not any(k.startswith("language_model.") for k in keys)
    # layer 1 is dense among MoE layers: megatron-core saves non-homogeneous layers under their own numbers
    # (experts stacked within a layer), never as one [layers, ...] stack
    assert {"decoder.layers.0.mlp.experts.experts.linear_fc1.weight", "decoder.layers.1.mlp.linear_fc1.weight",
            "decoder.layers.2.mlp.router.weight"} <= keys
    assert not any(k.startswith("decoder.layers.self_attention") for k in keys)
    shape = DCPReader(folder).tensors["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"].shape
    assert tuple(shape) == (4, 32, 32)


def test_megatron_lm_args_say_the_layer_pattern_of_mixed_dense_and_moe_layers(sources: dict, tmp_path: Path) -> None:
    """The args --for megatron-lm writes are what megatron-core builds the model from: with a dense layer among
    MoE layers, moe_layer_freq is the per-layer pattern and ffn_hidden_size the dense MLP's (megatron-core 0.19.2
    loads the checkpoint from them alone: tests/frameworks/test_family_frameworks.py)."""
    from vlconvert.layouts.torch_dist import find_torch_dist_dir

    Converter(sources["qwen3_moe"][0], tmp_path / "td", to="torch_dist", consumer="megatron-lm").run()
    folder, _ = find_torch_dist_dir(tmp_path / "td")
    args = torch.load(folder / "common.pt", weights_only=False)["args"]  # our own file: argparse.Namespace
    text = CONFIGS["qwen3_moe"]
    assert args.moe_layer_freq == [1, 0, 1] and text["mlp_only_layers"] == [1]
    assert args.ffn_hidden_size == text["intermediate_size"]
    assert args.moe_ffn_hidden_size == text["moe_intermediate_size"]


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_inspect_and_verify_accept_the_family(sources: dict, tmp_path: Path, family: str) -> None:
    src = sources[family][0]
    moe = family == "qwen3_moe"
    sizes = {"tp": 2, "ep": 2} if moe else {"tp": 2}
    plan = plan_conversion(src / "config.json", "megatron", **sizes)
    assert plan.ok, [c.message for c in plan.failed]
    result = Converter(src, tmp_path / "mg", to="megatron", **sizes).run()
    written = {f"release/{r.folder}/model_optim_rng.pt": r.nbytes for r in result.plan.megatron.ranks}
    assert {r.folder: r.bytes for r in plan.ranks} == written  # the plan's per-rank bytes are the converter's
    assert plan.family == CONFIGS[family]["model_type"]
    report = inspect_checkpoint(src)
    assert report["family"] == CONFIGS[family]["model_type"] and report["inconsistencies"] == []
    bare = inspect_checkpoint(tmp_path / "mg")
    assert bare["family"] == CONFIGS[family]["model_type"] and bare["tensors"] == report["tensors"]
    Converter(tmp_path / "mg", tmp_path / "hf", to="hf", assets_dir=src).run()
    run_cli("verify", src, tmp_path / "hf")
    run_cli("verify", src, tmp_path / "mg", "--assets-dir", str(src))


@pytest.mark.parametrize("family", FAMILIES)
def test_retag_finds_each_familys_embedding_rows(sources: dict, family: str) -> None:
    from vlconvert.layouts.hf import HFCheckpoint
    from vlconvert.retag import _embedding_names, applies_to

    ckpt = HFCheckpoint(sources[family][0])
    try:
        embed, head = _embedding_names(ckpt.tensors)
    finally:
        ckpt.close()
    assert embed == "model.embed_tokens.weight"
    assert head == (None if CONFIGS[family]["tie_word_embeddings"] else "lm_head.weight")
    assert CONFIGS[family]["model_type"] in applies_to()


def test_doctor_expert_checks_concern_fused_families_only() -> None:
    from vlconvert.doctor import applies_to, check_square_experts

    square = {**CONFIGS["qwen3_moe"], "moe_intermediate_size": 32}  # I == H: square down_proj
    assert check_square_experts(square) is None  # stored per expert (2-D): no orientation to tell
    checks = applies_to()
    assert checks["square experts"] == ["qwen3_vl_moe"] and "qwen3_moe" not in checks["transformers experts"]
    assert set(checks["conv3d"]) == {"qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl", "qwen3_5", "qwen3_5_moe"}


def _mcore_worker(config: dict, legacy: str, written: str, port: int) -> None:
    """megatron-core 0.16's GPTModel (local spec) for a Qwen3 / Qwen3-MoE config, mixed dense/MoE layers included:
    the torch_dist checkpoint loads through its own sharded_state_dict and equals the legacy rank file."""
    import warnings

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from test_megatron_core import _init, assert_torch_dist_loads_as

    from vlconvert.layouts import megatron as mlay
    from vlconvert.models import load_config

    warnings.filterwarnings("ignore")
    _init(0, 1, port, 1)
    info = load_config(config)
    moe = {}
    if info.is_moe:
        sparse = [0 if i in (config.get("mlp_only_layers") or []) else 1 for i in range(info.layers)]
        moe = dict(num_moe_experts=info.experts, moe_router_topk=info.experts_per_token,
                   moe_ffn_hidden_size=info.moe_intermediate, moe_layer_freq=sparse)
    cfg = TransformerConfig(num_layers=info.layers, hidden_size=info.hidden, num_attention_heads=info.heads,
                            num_query_groups=info.kv_heads, kv_channels=info.head_dim,
                            ffn_hidden_size=info.intermediate, normalization="RMSNorm", gated_linear_unit=True,
                            activation_func=torch.nn.functional.silu, add_bias_linear=False, qk_layernorm=True,
                            use_cpu_initialization=True, **moe)

    def build() -> GPTModel:
        spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
        padded = -(-info.vocab // 128) * 128  # Megatron-LM's padding, as both checkpoints hold it
        return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=padded, max_sequence_length=64,
                        share_embeddings_and_output_weights=info.tied, position_embedding_type="rope")

    model = build()
    rank_file = mlay.RankFile(Path(legacy) / "release/mp_rank_00/model_optim_rng.pt")
    missing, unexpected = model.load_state_dict({n: rank_file.read(n) for n in rank_file.tensors}, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected, (missing, unexpected)
    assert_torch_dist_loads_as(model, build, written)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_megatron_core_gptmodel_loads_the_text_families_torch_dist(sources: dict, tmp_path: Path, family: str) -> None:
    pytest.importorskip("megatron.core")
    from test_megatron_core import _free_port

    src = sources[family][0]
    Converter(src, tmp_path / "legacy", to="megatron", spec="local", experts="sequential").run()
    Converter(src, tmp_path / "td", to="torch_dist", consumer="megatron-lm", spec="local").run()
    ctx = torch.multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_mcore_worker, args=(CONFIGS[family], str(tmp_path / "legacy"),
                                                   str(tmp_path / "td/release"), _free_port()))
    proc.start()
    proc.join(240)
    assert proc.exitcode == 0, "megatron-core GPTModel did not load the torch_dist output (see stderr)"
