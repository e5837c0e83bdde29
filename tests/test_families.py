"""The model-family registry: every family's skeleton equals what transformers saves, roles, detection, and a
Megatron table that covers every HF tensor exactly once with the right split.

Tiny models are built with transformers' own classes (bf16) in a session temp dir and saved with
``save_pretrained``; nothing is committed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlconvert.errors import UserError
from vlconvert.models import FAMILIES, build_skeleton, family_named, family_of, load_config
from vlconvert.models.base import Skeleton
from vlconvert.models.megatron_table import Param, Src, megatron_params, plan_megatron_ranks, source_shape

ROOT = Path(__file__).resolve().parents[1]

_TEXT = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 96, "dtype": "bfloat16"}
CONFIGS: dict[str, dict] = {
    "qwen3-tied": {"model_type": "qwen3", "tie_word_embeddings": True, **_TEXT},
    "qwen3-moe": {"model_type": "qwen3_moe", "tie_word_embeddings": False, **_TEXT, "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 16, "mlp_only_layers": [1],
                  "decoder_sparse_step": 1},
    "qwen2_5_vl": {"model_type": "qwen2_5_vl", "tie_word_embeddings": False, "dtype": "bfloat16",
                   "text_config": {**_TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                                "mrope_section": [1, 1, 2]}},
                   "vision_config": {"depth": 2, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2,
                                     "out_hidden_size": 32, "fullatt_block_indexes": [1], "window_size": 28}},
    # a released-style config: the language model's fields at the top level, no text_config
    "qwen2_5_vl-released": {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
                            "tie_word_embeddings": True, "torch_dtype": "bfloat16", **_TEXT,
                            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
                            "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 24,
                                              "num_heads": 2, "in_chans": 3, "out_hidden_size": 32,
                                              "fullatt_block_indexes": [0], "window_size": 28}},
}


def _build(config: dict) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = AutoConfig.for_model(**json.loads(json.dumps(config)))
    auto = AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM
    torch.manual_seed(0)
    return auto.from_config(cfg).to(torch.bfloat16)


def _saved(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = f.get_tensor(key)
                out[key] = (tuple(t.shape), t.dtype)
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, tuple[int, ...]]]]:
    """Per config: the save_pretrained folder and the model's run-time state_dict shapes."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, config in CONFIGS.items():
        model = _build(config)
        model.save_pretrained(root / name)
        out[name] = (root / name, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    return out


QWEN3_VL = [ROOT / "fixtures" / "tiny-moe", ROOT / "fixtures" / "tiny-dense-tied"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_skeleton_equals_what_transformers_saves(models: dict, name: str) -> None:
    folder, runtime = models[name]
    sk = build_skeleton(folder)
    saved = _saved(folder)
    assert {k: (sk.tensors[k].shape, sk.tensors[k].dtype) for k in sk.hf_keys()} == saved
    family = sk.family
    # run-time names map onto the canonical ones (Qwen2.5-VL: model.visual. / model.language_model.)
    canonical = [family.canonical_name(k) for k in runtime]
    if not sk.info.is_moe:  # same tensors in the same (registration) order
        assert canonical == list(sk.tensors)
    else:  # transformers 5 fuses the per-expert tensors at run time; everything else keeps its order
        assert [k for k in canonical if ".experts." not in k] == [k for k in sk.tensors if ".experts." not in k]


def test_text_moe_roles_and_expert_storage(models: dict) -> None:
    sk = build_skeleton(models["qwen3-moe"][0])
    roles = sk.family.roles(sk)
    assert (roles.embed, roles.output, roles.tied) == ("model.embed_tokens.weight", "lm_head.weight", False)
    assert roles.expert_storage == "per_expert" and roles.mtp == () and roles.vision == ()
    assert len(roles.experts) == 2 * 4 * 3  # layers 0 and 2 are sparse (layer 1 is mlp-only), 4 experts x 3
    assert "model.layers.1.mlp.gate_proj.weight" in sk.tensors and "model.layers.1.mlp.gate.weight" not in sk.tensors
    assert not any(sk.family.is_expert(n) for n in sk.tensors)  # no fused tensors: no orientation to change
    assert sk.family.megatron_prefixes.language == "" and sk.family.megatron_prefixes.vision is None


def test_dense_and_vl_roles(models: dict) -> None:
    tied = build_skeleton(models["qwen3-tied"][0])
    roles = tied.family.roles(tied)
    assert roles.tied and "lm_head.weight" in tied.tensors and "lm_head.weight" not in tied.hf_keys()
    assert roles.expert_storage == "none" and roles.experts == ()
    vl = build_skeleton(models["qwen2_5_vl"][0])
    roles = vl.family.roles(vl)
    assert roles.vision and all(n.startswith("visual.") for n in roles.vision)
    assert set(roles.vision) == {n for n in vl.tensors if n.startswith("visual.")}
    assert roles.embed == "model.embed_tokens.weight" and "model.layers.0.self_attn.q_proj.bias" in vl.tensors
    assert vl.family.stage_of("visual.merger.mlp.0.weight") == "first"
    assert vl.family.stage_of("model.layers.2.mlp.up_proj.weight") == "layer"
    assert vl.family.stage_of("model.norm.weight") == "last"
    released = build_skeleton(models["qwen2_5_vl-released"][0])
    assert released.info.tied and released.info.layers == 3 and released.info.vision_depth == 1
    for path in QWEN3_VL:
        sk = build_skeleton(path)
        roles = sk.family.roles(sk)
        assert roles.embed == "model.language_model.embed_tokens.weight" and roles.tied == sk.info.tied
        assert roles.expert_storage == ("fused" if sk.info.is_moe else "none")
        assert all(sk.family.is_expert(n) for n in roles.experts)


@pytest.mark.parametrize(("config", "family"), [
    ({"model_type": "qwen3"}, "qwen3"), ({"model_type": "qwen3_moe"}, "qwen3"),
    ({"model_type": "qwen2_5_vl"}, "qwen2_5_vl"), ({"model_type": "qwen3_vl"}, "qwen3_vl"),
    ({"model_type": "qwen3_vl_moe"}, "qwen3_vl"), ({"architectures": ["Qwen3MoeForCausalLM"]}, "qwen3"),
    ({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}, "qwen2_5_vl"),
])
def test_detection_from_config(config: dict, family: str) -> None:
    assert family_of(config).name == family


def test_detection_from_config_json(models: dict) -> None:
    for name, (folder, _) in models.items():
        assert family_of(folder / "config.json") is family_named(CONFIGS[name]["model_type"])
    for path in QWEN3_VL:
        assert family_of(path).name == "qwen3_vl"


@pytest.mark.parametrize("config", [{"model_type": "llama"}, {"architectures": ["LlamaForCausalLM"]}, {}])
def test_unknown_family_is_one_line_naming_the_supported_ones(config: dict) -> None:
    with pytest.raises(UserError) as exc:
        load_config(config)
    message = str(exc.value)
    assert "\n" not in message
    for family in FAMILIES:
        for model_type in family.model_types:
            assert model_type in message


def test_architectures_only_config_loads(models: dict) -> None:
    raw = json.loads((models["qwen3-moe"][0] / "config.json").read_text())
    raw.pop("model_type")
    assert load_config(raw).family == "qwen3_moe" and load_config(raw).experts == 4


# ------------------------------------------------------------------------------------------------ megatron
def _rows_by_source(params: list[Param], sk: Skeleton) -> dict[Src, list[tuple[int, int]]]:
    """Per source matrix, the dim-0 row ranges (or, for column-split params, the whole source) each
    parameter reads."""
    used: dict[Src, list[tuple[int, int]]] = {}
    for p in params:
        for src, a, b in p.rows:
            if src is None:
                continue
            used.setdefault(src, []).append((a, b))
    return used


def _expected_split(name: str) -> str:
    rules: list[tuple[Callable[[str], bool], str]] = [
        (lambda n: "linear_qkv.layer_norm" in n or "layernorm" in n or "router" in n, "none"),
        (lambda n: "linear_qkv" in n or "word_embeddings" in n or "output_layer" in n, "rows"),
        (lambda n: "linear_proj.weight" in n or "linear_fc2.weight" in n, "cols"),
        (lambda n: "linear_fc1.weight" in n, "halves"),
    ]
    for rule, split in rules:
        if rule(name):
            return split
    return "none"


ALL = list(CONFIGS) + [str(p) for p in QWEN3_VL]


def _skeleton(models: dict, name: str) -> Skeleton:
    return build_skeleton(models[name][0] if name in models else Path(name))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("spec", "experts"), [("te", "grouped"), ("local", "sequential")])
def test_megatron_table_covers_every_tensor_once(models: dict, name: str, spec: str, experts: str) -> None:
    sk = _skeleton(models, name)
    params = megatron_params(sk, spec=spec, experts=experts, padded_vocab=sk.info.vocab + 32)
    names = [p.name for p in params]
    assert len(names) == len(set((p.name, p.layer, p.expert) for p in params))
    used = _rows_by_source(params, sk)
    hf_used = {src.hf for src in used}
    tied_head = {sk.family.output} if sk.info.tied else set()
    assert hf_used == set(sk.hf_keys()) - tied_head | ({sk.family.embed} if tied_head else set())
    for src, ranges in used.items():
        if src.hf == sk.family.embed and sk.info.tied:  # read by the embedding and the tied output layer
            ranges = ranges[: len(ranges) // 2]
        rows = source_shape(sk, src)[0]
        covered = sorted(ranges)
        assert covered[0][0] == 0 and covered[-1][1] == rows, src
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False)), f"{src}: {covered}"
    prefixes = sk.family.megatron_prefixes
    for p in params:
        vision = prefixes.vision is not None and p.name.startswith(prefixes.vision)
        assert vision or p.name.startswith(prefixes.language), p.name
        if vision and not sk.family.vision_tensor_parallel:
            assert p.split == "none", p.name  # kept as the HF module, replicated
        elif not vision:
            assert p.split == _expected_split(p.name), p.name
            assert p.group == ("etp" if p.expert is not None else "tp")


def test_qwen2_5_vl_qkv_bias_interleaved_like_the_weights(models: dict) -> None:
    sk = _skeleton(models, "qwen2_5_vl")
    folder = models["qwen2_5_vl"][0]
    with safe_open(next(folder.glob("*.safetensors")), "pt") as f:
        hf = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    param = next(p for p in megatron_params(sk) if p.name.endswith("layers.{layer}.self_attention.linear_qkv.bias")
                 and p.layer == 1)
    built = torch.cat([hf[src.hf][a:b] for src, a, b in param.rows])
    info = sk.info
    g, r, hd = info.kv_heads, info.heads // info.kv_heads, info.head_dim
    q, k, v = (hf[f"model.layers.1.self_attn.{t}_proj.bias"] for t in "qkv")
    expected = torch.cat([q.reshape(g, r * hd), k.reshape(g, hd), v.reshape(g, hd)], dim=1).reshape(-1)
    assert torch.equal(built, expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rank_plans_at_tp2_pp2_ep2(models: dict, name: str) -> None:
    sk = _skeleton(models, name)
    ep = 2 if sk.info.is_moe else 1
    plan = plan_megatron_ranks(sk, tp=2, pp=2, ep=ep, pp_first_layers=1, pp_last_layers=2)
    first = {t.name: t for t in plan.ranks[0].tensors}
    embed = f"{sk.family.megatron_prefixes.language}embedding.word_embeddings.weight"
    assert first[embed].shape == (plan.padded_vocab // 2, sk.info.hidden)  # vocabulary rows split over TP
    if sk.info.is_moe:  # 4 experts over EP 2: local experts 0 and 1 on every rank of a sparse layer
        local = {t.name for r in plan.ranks for t in r.tensors if "experts.linear_fc1.weight" in t.name}
        assert local == {"decoder.layers.0.mlp.experts.linear_fc1.weight0",
                         "decoder.layers.0.mlp.experts.linear_fc1.weight1",
                         "decoder.layers.1.mlp.experts.linear_fc1.weight0",
                         "decoder.layers.1.mlp.experts.linear_fc1.weight1"}
    vision = sk.family.megatron_prefixes.vision
    if vision:  # the HF vision tower is replicated: same shapes on both TP ranks of the first stage
        second = {t.name: t.shape for t in plan.ranks[1].tensors if t.name.startswith(vision)}
        assert second and second == {n: t.shape for n, t in first.items() if n.startswith(vision)}
        assert second == {n: sk.tensors[n].shape for n in sk.tensors if n.startswith(vision)}
