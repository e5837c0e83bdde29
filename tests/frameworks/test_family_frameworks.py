"""Qwen3, Qwen3-MoE and Qwen2.5-VL (issue 23): vlconvert's torch_dist output in megatron-core 0.19.2 and
Megatron-Bridge 0.6.2 themselves (Python 3.12 set, ``bash tests/frameworks/run.sh``).

The HF sources are tiny bf16 models built with transformers' own classes from a config (the shapes of
``tests/test_family_routes.py``) and saved with ``save_pretrained`` in a session temp dir. vlconvert writes
``--to torch_dist --spec local``; nothing in a comparison comes from vlconvert:

- ``--for mbridge`` (verl's layout: ``dist_checkpointing.load(model.sharded_state_dict(), DST/release)``): Bridge's
  own model for the family (``AutoBridge`` provider; its ``local_layer_spec`` since Transformer Engine cannot be
  built here: Qwen3 / Qwen3-MoE are megatron-core's GPTModel, Qwen2.5-VL Bridge's ``Qwen25VLModel`` with the HF
  vision tower under ``visual.``) at TP 1, TP 2 and (MoE) EP 2 on gloo ranks, zeroed, loads DST at
  megatron-core's default strictness; every tensor equals Bridge's own ``load_hf_weights`` of the HF folder, and
  Bridge's ``export_hf_weights`` of the loaded model gives every HF tensor back, bit for bit.
- ``--for ms-swift``: ms-swift 4.6.0's ``load_mcore_checkpoint`` (``--mcore_model DST``) and
  ``dist_checkpointing.load`` into mcore-bridge 1.6.5's model (``swift_worker.py``), compared with mcore-bridge's
  own HF import; ms-swift's own ``save_mcore_checkpoint`` read back to HF by vlconvert, bit for bit.
- ``--for megatron-lm`` (Qwen3, Qwen3-MoE): megatron-core's own GPTModel built as Megatron-LM's ``pretrain_gpt.py``
  builds it from the checkpoint's ``args`` (Bridge's Megatron-LM reader ``load_model_config``), local modules,
  unprefixed names, padded vocabulary, TP 1 / TP 2, loads DST at default strictness; every tensor equals Bridge's
  HF -> Megatron mapping of the HF folder into the same model, the vocabulary tensors' first V rows the HF ones.

Not covered here, and why:
- Bridge's ``load_megatron_model`` of the default output (``--for megatron-bridge``, with its ``run_config.yaml``):
  ``test_bridge_families.py``.
- Megatron legacy: no installed framework reads it (Megatron-Bridge 0.6.2 loads torch_dist only; Megatron-LM's
  ``megatron.training`` is not installed).
- Qwen3-MoE with dense layers among the MoE ones (``mlp_only_layers``) in Bridge: its Qwen3-MoE provider builds
  every layer as MoE (``qwen3_moe_bridge.py``: ``decoder_sparse_step = 1``), so only megatron-core's GPTModel is
  checked for it (the reference import adds Bridge's Qwen3 dense MLP mappings for those layers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fwrun import hf_tensors, vlconvert, worker
from torch.distributed.checkpoint import FileSystemReader

WORKER = Path(__file__).with_name("worker.py")
SWIFT = Path(__file__).with_name("swift_worker.py")
_TEXT = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 96, "dtype": "bfloat16"}
_MOE = {"model_type": "qwen3_moe", "tie_word_embeddings": False, **_TEXT, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 16, "decoder_sparse_step": 1}
CONFIGS: dict[str, dict] = {
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True, **_TEXT},
    "qwen3_moe": {**_MOE, "mlp_only_layers": []},
    "qwen3_moe_mixed": {**_MOE, "mlp_only_layers": [1]},
    "qwen2_5_vl": {"model_type": "qwen2_5_vl", "tie_word_embeddings": False, "dtype": "bfloat16",
                   "text_config": {**_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                                "mrope_section": [1, 1, 2]}},
                   "vision_config": {"depth": 2, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2,
                                     "out_hidden_size": 32, "fullatt_block_indexes": [1], "window_size": 28}},
}
# what a Megatron-LM user gives on the command line for the mixed model (--moe-layer-freq, --ffn-hidden-size)
MIXED_ARGS = {"moe_layer_freq": [1, 0, 1], "ffn_hidden_size": 48}


def _build(config: dict) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM
    torch.manual_seed(0)
    model = cls.from_config(AutoConfig.for_model(**json.loads(json.dumps(config)))).to(torch.bfloat16)
    with torch.no_grad():  # norms start at 1 and biases at 0: give every tensor distinct values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-frameworks")
    for name, config in CONFIGS.items():
        _build(config).save_pretrained(root / name)
    return {name: root / name for name in CONFIGS}


def _torch_dist(src: Path, dst: Path, consumer: str) -> Path:
    vlconvert("convert", src, dst, "--to", "torch_dist", "--for", consumer, "--spec", "local")
    return dst / "release"


BRIDGE = [("qwen3", 1, 1), ("qwen3", 2, 1), ("qwen3_moe", 1, 1), ("qwen3_moe", 2, 1), ("qwen3_moe", 1, 2),
          ("qwen2_5_vl", 1, 1), ("qwen2_5_vl", 2, 1)]


@pytest.mark.parametrize(("family", "tp", "ep"), BRIDGE, ids=[f"{f}-tp{t}-ep{e}" for f, t, e in BRIDGE])
def test_bridge_model_loads_mbridge_output_and_exports_the_source(sources: dict, tmp_path: Path, family: str,
                                                                   tp: int, ep: int) -> None:
    src = sources[family]
    dst = _torch_dist(src, tmp_path / "td", "mbridge")
    got = worker(WORKER, "family-load", src, dst, tp, ep, tmp_path)
    n_hf = len(hf_tensors(src))
    assert len(got["ranks"]) == max(tp, ep)
    for r in got["ranks"]:
        assert r["tensors"] > 20 and not r["mismatched"], got
        assert r["exported"] == n_hf and not r["export_mismatched"], got


MLM = [("qwen3", 1), ("qwen3", 2), ("qwen3_moe", 1), ("qwen3_moe", 2)]


@pytest.mark.parametrize(("family", "tp"), MLM, ids=[f"{f}-tp{t}" for f, t in MLM])
def test_megatron_core_gptmodel_from_checkpoint_args_loads_megatron_lm_output(sources: dict, tmp_path: Path,
                                                                              family: str, tp: int) -> None:
    dst = _torch_dist(sources[family], tmp_path / "td", "megatron-lm")
    got = worker(WORKER, "mlm-family", sources[family], dst, tp, tmp_path)
    moe = CONFIGS[family].get("num_experts")
    for r in got["ranks"]:
        assert r["tensors"] > 20 and not r["mismatched"] and r["vocab_rows"] == 128, got
        assert r["moe_layers"] == ([0, 1, 2] if moe else []), got


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_core_gptmodel_loads_mixed_dense_and_moe_layers(sources: dict, tmp_path: Path, tp: int) -> None:
    """Layer 1 dense among MoE layers: megatron-core keys such a block per layer (``decoder.layers.N.``); with the
    layer pattern and the dense FFN size given as Megatron-LM's command line gives them, the model loads DST."""
    dst = _torch_dist(sources["qwen3_moe_mixed"], tmp_path / "td", "megatron-lm")
    got = worker(WORKER, "mlm-family", sources["qwen3_moe_mixed"], dst, tp, tmp_path, json.dumps(MIXED_ARGS))
    for r in got["ranks"]:
        assert r["tensors"] > 20 and not r["mismatched"] and r["moe_layers"] == [0, 2], got


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_core_gptmodel_from_args_alone_loads_mixed_layers(sources: dict, tmp_path: Path, tp: int) -> None:
    """The checkpoint's own args say the layer pattern (moe_layer_freq [1, 0, 1]) and the dense FFN size: a GPTModel
    built from them alone loads DST (before, moe_layer_freq=1 and ffn_hidden_size=moe_intermediate_size made it ask
    for stacked keys)."""
    dst = _torch_dist(sources["qwen3_moe_mixed"], tmp_path / "td", "megatron-lm")
    got = worker(WORKER, "mlm-family", sources["qwen3_moe_mixed"], dst, tp, tmp_path)
    for r in got["ranks"]:
        assert r["tensors"] > 20 and not r["mismatched"] and r["moe_layers"] == [0, 2], got


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "qwen2_5_vl"])
def test_swift_loads_vlconvert_output_bit_exact(sources: dict, tmp_path: Path, family: str) -> None:
    vlconvert("convert", sources[family], tmp_path / "td", "--to", "torch_dist", "--for", "ms-swift", "--spec",
              "local", "-q")
    got = worker(SWIFT, "swift-load", sources[family], tmp_path / "td")
    assert got["tensors"] > 20 and not got["mismatched"] and not got["mismatched_plain"], got
    assert got["visual"] == (30 if family == "qwen2_5_vl" else 0) and got["iteration"] == 0, got


def _disk_keys(folder: Path) -> dict[str, tuple]:
    md = FileSystemReader(str(folder)).read_metadata()
    return {k: tuple(getattr(v, "size", ())) for k, v in md.state_dict_metadata.items()}


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "qwen2_5_vl"])
def test_vlconvert_reads_swift_own_save(sources: dict, tmp_path: Path, family: str) -> None:
    """ms-swift's own save of mcore-bridge's HF import, back to HF with vlconvert: the source's tensors bit for bit;
    vlconvert's ``--for ms-swift`` output has every key of that save with its shape (the vocabulary tensors padded
    to 128 rows, which ms-swift's loader takes, above; its own save keeps the HF rows)."""
    src = sources[family]
    worker(SWIFT, "swift-save", src, tmp_path / "saved")
    vlconvert("convert", tmp_path / "saved", tmp_path / "hf", "--to", "hf", "--assets-dir", src, "-q")
    want, have = hf_tensors(src), hf_tensors(tmp_path / "hf")
    assert set(want) == set(have) and not [k for k in want if not torch.equal(want[k], have[k])]
    vlconvert("convert", src, tmp_path / "td", "--to", "torch_dist", "--for", "ms-swift", "--spec", "local", "-q")
    theirs, ours = _disk_keys(tmp_path / "saved/iter_0000001"), _disk_keys(tmp_path / "td/iter_0000001")
    assert not set(theirs) - set(ours), sorted(set(theirs) - set(ours))[:5]
    vocab = {k for k in theirs if k.endswith(("word_embeddings.weight", "output_layer.weight"))}
    assert {k: ours[k] for k in theirs if k not in vocab} == {k: v for k, v in theirs.items() if k not in vocab}
    assert all(ours[k] == (128, theirs[k][1]) for k in vocab), {k: (theirs[k], ours[k]) for k in vocab}
