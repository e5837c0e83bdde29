"""Qwen3.5-VL family module: skeleton against transformers' own models, Megatron table coverage, TP/EP splits.

Tiny dense and MoE models are built with transformers' classes (bf16, one linear-attention and one
full-attention layer, shared experts), saved with ``save_pretrained``, and given the ``mtp.*`` tensors
released checkpoints carry (built from transformers' own decoder layer and norm classes, one MTP layer;
per-expert MTP experts as Qwen3.5 releases store them).
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from helpers import load_hf_tensors
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlconvert.errors import UserError
from vlconvert.models import qwen3_5 as q
from vlconvert.models.base import ModelInfo
from vlconvert.models.megatron_table import Src

transformers = pytest.importorskip("transformers")
EMBED_KEY = "model.language_model.embed_tokens.weight"


def _config(moe: bool, tied: bool = False) -> dict:
    text = {"hidden_size": 32, "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"],
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_key_head_dim": 8,
            "linear_value_head_dim": 12, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "linear_conv_kernel_dim": 4, "vocab_size": 160, "intermediate_size": 48, "mtp_num_hidden_layers": 1,
            "attn_output_gate": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                "mrope_section": [2, 1, 1], "mrope_interleaved": True}}
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    shared_expert_intermediate_size=24)
    return {"model_type": "qwen3_5_moe" if moe else "qwen3_5", "tie_word_embeddings": tied, "text_config": text,
            "vision_config": {"depth": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 24,
                              "out_hidden_size": 32, "num_position_embeddings": 16, "patch_size": 4}}


def _mtp_tensors(model, moe: bool, packed: bool) -> dict[str, torch.Tensor]:
    """The ``mtp.*`` tensors of a released checkpoint, made with transformers' own module classes."""
    if moe:
        from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as mod
        layer_cls, norm_cls = mod.Qwen3_5MoeDecoderLayer, mod.Qwen3_5MoeRMSNorm
    else:
        from transformers.models.qwen3_5 import modeling_qwen3_5 as mod
        layer_cls, norm_cls = mod.Qwen3_5DecoderLayer, mod.Qwen3_5RMSNorm
    text = copy.deepcopy(model.config.text_config)
    text.layer_types = ["full_attention"]
    h = text.hidden_size
    torch.manual_seed(1)
    parts = {"fc": torch.nn.Linear(2 * h, h, bias=False), "layers.0": layer_cls(text, 0), "norm": norm_cls(h),
             "pre_fc_norm_hidden": norm_cls(h), "pre_fc_norm_embedding": norm_cls(h)}
    out: dict[str, torch.Tensor] = {}
    for prefix, module in parts.items():
        for name, t in module.state_dict().items():
            t = (torch.randn_like(t.float()) * 0.02 + (1 if t.dim() == 1 else 0)).to(torch.bfloat16)
            if name.endswith("experts.gate_up_proj") and not packed:  # Qwen3.5 releases MTP experts one by one
                inter = t.shape[1] // 2
                for e in range(t.shape[0]):
                    out[f"mtp.{prefix}.mlp.experts.{e}.gate_proj.weight"] = t[e, :inter].clone()
                    out[f"mtp.{prefix}.mlp.experts.{e}.up_proj.weight"] = t[e, inter:].clone()
            elif name.endswith("experts.down_proj") and not packed:
                for e in range(t.shape[0]):
                    out[f"mtp.{prefix}.mlp.experts.{e}.down_proj.weight"] = t[e].clone()
            else:
                out[f"mtp.{prefix}.{name}"] = t
    return out


def _build(tmp: Path, moe: bool, packed_mtp: bool = False) -> Path:
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**_config(moe)), dtype=torch.bfloat16)
    with torch.no_grad():  # non-trivial norms (the zero-centred ones start at 0, the GDN gain at 1)
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand_like(p.float()).mul(1.5).add(0.5).to(p.dtype))
    folder = tmp / ("moe" if moe else "dense")
    model.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors.update(_mtp_tensors(model, moe, packed_mtp))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _fuse(src: Path, dst: Path) -> Path:
    """The released form of the same weights: decoder and MTP experts fused ([E, 2I, H], [E, H, I]), as
    Qwen3.6 stores both."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    per: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    out = {}
    for name, t in load_file(src / "model.safetensors").items():
        head, sep, tail = name.partition(".mlp.experts.")
        if sep:
            e, proj = tail.split(".")[:2]
            per[head][int(e)][proj] = t
        else:
            out[name] = t
    for head, experts in per.items():
        order = sorted(experts)
        out[f"{head}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in order])
        out[f"{head}.mlp.experts.down_proj"] = torch.stack([experts[e]["down_proj"] for e in order])
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("qwen3_5")
    built = {"dense": _build(tmp, False), "moe": _build(tmp, True)}
    built["moe_fused"] = _fuse(built["moe"], tmp / "moe_fused")
    return built


def test_fused_release_form_loads_in_transformers_as_saved_form(folders):
    """transformers takes the fused [E, 2I, H] form as it is (no transpose) and gives the same weights as
    from its own per-expert save; it drops mtp.* on load."""
    from transformers import AutoModelForImageTextToText

    a = AutoModelForImageTextToText.from_pretrained(folders["moe"], dtype=torch.bfloat16).state_dict()
    b = AutoModelForImageTextToText.from_pretrained(folders["moe_fused"], dtype=torch.bfloat16).state_dict()
    assert a.keys() == b.keys() and not any(k.startswith("mtp.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _saved(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def _skeleton(folder: Path) -> q.Skeleton:
    names = _saved(folder)
    experts, mtp_experts, has_mtp = q.detect_expert_layouts(names)
    return q.build_skeleton(json.loads((folder / "config.json").read_text()), experts=experts,
                            mtp_experts=mtp_experts, mtp=has_mtp)


# --------------------------------------------------------------------------------------------- skeleton
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_skeleton_equals_saved_checkpoint(folders, kind):
    saved = _saved(folders[kind])
    sk = _skeleton(folders[kind])
    assert {k: sk.tensors[k].shape for k in sk.hf_keys()} == saved
    assert all(sk.tensors[k].dtype == torch.bfloat16 for k in sk.tensors)
    assert sk.mtp_keys() and all(k in saved for k in sk.mtp_keys())
    if kind == "moe":  # transformers 5.x save_pretrained writes experts one by one; MTP experts as released
        assert (sk.experts, sk.mtp_experts) == ("per_expert", "per_expert")
        assert "model.language_model.layers.0.mlp.experts.3.down_proj.weight" in saved
    fused = _skeleton(folders["moe_fused"]) if kind == "moe" else None
    if fused is not None:
        assert (fused.experts, fused.mtp_experts) == ("fused", "fused")
        assert {k: fused.tensors[k].shape for k in fused.hf_keys()} == _saved(folders["moe_fused"])


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_skeleton_equals_transformers_runtime_state_dict(folders, kind):
    from transformers import AutoConfig, AutoModelForImageTextToText

    raw = json.loads((folders[kind] / "config.json").read_text())
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**raw))
    runtime = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sk = q.build_skeleton(raw, experts="fused", mtp=False)
    assert list(sk.tensors) == list(runtime)  # registration order too
    assert {k: v.shape for k, v in sk.tensors.items()} == runtime


def test_expert_layout_detection():
    assert q.detect_expert_layouts(["a.mlp.experts.gate_up_proj", "mtp.layers.0.mlp.experts.0.up_proj.weight"]) \
        == ("fused", "per_expert", True)
    assert q.detect_expert_layouts(["mtp.layers.0.mlp.experts.down_proj"]) == ("fused", "fused", True)
    with pytest.raises(UserError, match="one layout"):
        q.detect_expert_layouts(["x.mlp.experts.gate_up_proj", "x.mlp.experts.1.gate_proj.weight"])


def test_roles_and_tied():
    raw = _config(True, tied=True)
    sk = q.build_skeleton(raw)
    assert q.LM_HEAD in sk.tensors and q.LM_HEAD not in sk.hf_keys()
    assert q.tensor_role(q.EMBED) == "embedding" and q.tensor_role(q.LM_HEAD) == "output"
    assert q.tensor_role("model.language_model.layers.0.mlp.experts.gate_up_proj") == "experts"
    assert q.tensor_role("mtp.fc.weight") == "mtp"
    assert q.tensor_role("model.language_model.layers.0.linear_attn.norm.weight") == "zero_centered_norm"
    assert q.tensor_role("model.visual.pos_embed.weight") == "vision"
    assert sk.model_keys() == [k for k in sk.hf_keys() if not k.startswith("mtp.")]


def test_config_refusals():
    raw = _config(False)
    raw["text_config"]["layer_types"] = ["linear_attention", "sliding_attention"]
    with pytest.raises(UserError, match="layer_types"):
        q.load_config(raw)
    raw = _config(False)
    raw["text_config"]["attn_output_gate"] = False
    with pytest.raises(UserError, match="attn_output_gate"):
        q.load_config(raw)
    raw = _config(False)
    del raw["text_config"]["layer_types"]
    raw["text_config"]["full_attention_interval"] = 2
    assert q.load_config(raw).layer_types == ("linear_attention", "full_attention")
    with pytest.raises(UserError, match="--tp 8"):
        q.check_tp(q.load_config(_config(False)), 8)


# ---------------------------------------------------------------------------------------- Megatron table
def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _source(hf: dict[str, torch.Tensor], src: Src) -> torch.Tensor:
    return hf[src.hf] if src.expert is None else hf[src.hf][src.expert]


def _materialize(p, hf, size: int, rank: int) -> torch.Tensor:
    axis, segs, shape = q.split_param(p, size, rank)
    if axis == 1:
        src, a, b = segs[0]
        t = _source(hf, src)[:, a:b]
    else:
        ref = _source(hf, next(s for s, _, _ in segs if s is not None))
        t = torch.cat([_source(hf, s)[a:b] if s is not None else ref.new_zeros((b - a, *ref.shape[1:]))
                       for s, a, b in segs])
    assert tuple(t.shape) == shape, p.name
    return q.to_megatron_value(p, t.clone())


def _placed(params, info, ep: int, ep_rank: int):
    per = info.experts // ep if info.experts else 0
    return [p for p in params if p.expert is None or ep_rank * per <= p.expert < (ep_rank + 1) * per]


@pytest.mark.parametrize("kind", ["dense", "moe", "moe_fused"])
@pytest.mark.parametrize("spec,experts", [("te", "grouped"), ("local", "sequential")])
def test_table_covers_each_tensor_once(folders, kind, spec, experts):
    sk = _skeleton(folders[kind])
    params = q.megatron_params(sk, spec=spec, experts=experts)
    names = [p.name.format(layer=p.layer, expert=p.expert) for p in params]
    assert len(names) == len(set(names))
    rows: dict[Src, list[tuple[int, int]]] = defaultdict(list)
    for p in params:
        if p.split == "cols":
            rows[p.rows[0][0]].append((0, q.source_shape(sk, p.rows[0][0])[0]))
        else:
            for s, a, b in p.rows:
                if s is not None:
                    rows[s].append((a, b))
        assert p.shape[0] == sum(b - a for _, a, b in p.rows) or p.split == "cols", p.name
    covered: dict[str, set] = defaultdict(set)
    for src, spans in rows.items():
        n = q.source_shape(sk, src)[0]
        assert sorted(spans)[0][0] == 0 and sum(b - a for a, b in spans) == n, src
        flat = sorted(spans)
        assert all(x[1] == y[0] for x, y in zip(flat, flat[1:], strict=False)), src  # no overlap, no gap
        covered[src.hf].add(src.expert)
    assert set(covered) == set(sk.hf_keys())
    for name, experts_seen in covered.items():
        if q.is_expert(name):
            assert experts_seen == set(range(sk.info.experts))


@pytest.mark.parametrize("kind", ["dense", "moe", "moe_fused"])
def test_tp2_ep2_shards_reassemble_bit_exact(folders, kind):
    sk = _skeleton(folders[kind])
    hf = _tensors(folders[kind])
    info = sk.info
    q.check_tp(info, 2)
    params = q.megatron_params(sk, padded_vocab=256)
    ep = 2 if info.is_moe else 1
    back = {n: torch.full(t.shape, float("nan"), dtype=torch.float32) for n, t in hf.items()}
    seen_expert_ranks: dict[tuple, set] = defaultdict(set)
    for e_rank in range(ep):
        for p in _placed(params, info, ep, e_rank):
            if p.expert is not None:
                seen_expert_ranks[(p.name, p.layer, p.expert)].add(e_rank)
            for rank in range(2):
                t = q.to_hf_value(p, _materialize(p, hf, 2, rank))
                axis, segs, _ = q.split_param(p, 2, rank)
                off = 0
                for src, a, b in segs:
                    if src is None:
                        assert not t[off:off + b - a].any()  # vocab padding is zeros
                    else:
                        dst = back[src.hf] if src.expert is None else back[src.hf][src.expert]
                        piece = t[:, :] if axis == 1 else t[off:off + b - a]
                        view = dst[:, a:b] if axis == 1 else dst[a:b]
                        done = ~torch.isnan(view)
                        assert torch.equal(view[done], piece.float()[done]), p.name  # replicas agree
                        view.copy_(piece.float())
                    off += b - a
    assert all(len(r) == 1 for r in seen_expert_ranks.values())  # each expert on one EP rank
    for name, t in hf.items():
        if info.tied and name == q.LM_HEAD:
            continue
        assert torch.equal(back[name].to(t.dtype).view(torch.int16), t.view(torch.int16)), name


def test_tp_layouts_match_independent_statements(folders):
    """The table's rank tensors equal the rules written as whole-tensor ops, and Megatron's own view
    of linear_qkv (per group [q; gate; k; v]) gives back HF's query and gate heads."""
    sk = _skeleton(folders["moe"])
    hf = _tensors(folders["moe"])
    info = sk.info
    params = {p.name.format(layer=p.layer, expert=p.expert): p for p in q.megatron_params(sk)}
    lin, full = "model.language_model.layers.0.linear_attn.", "model.language_model.layers.1.self_attn."
    in_proj = params["language_model.decoder.layers.0.self_attention.in_proj.weight"]
    for tp in (1, 2):
        ranks = torch.cat([_materialize(in_proj, hf, tp, r) for r in range(tp)])
        expect = q.fuse_gdn_in_proj(hf[lin + "in_proj_qkv.weight"], hf[lin + "in_proj_z.weight"],
                                    hf[lin + "in_proj_b.weight"], hf[lin + "in_proj_a.weight"], info.key_dim, tp)
        assert torch.equal(ranks, expect)
    conv = params["language_model.decoder.layers.0.self_attention.conv1d.weight"]
    r1 = _materialize(conv, hf, 2, 1)
    kd = info.key_dim
    assert torch.equal(r1[:kd // 2], hf[lin + "conv1d.weight"][kd // 2:kd])  # rank 1 starts with its q half
    qkv = params["language_model.decoder.layers.1.self_attention.linear_qkv.weight"]
    full_qkv = _materialize(qkv, hf, 1, 0)
    assert torch.equal(full_qkv, q.interleave_gated_qkv(hf[full + "q_proj.weight"], hf[full + "k_proj.weight"],
                                                        hf[full + "v_proj.weight"], info.kv_heads))
    r, hd = info.heads // info.kv_heads, info.head_dim
    groups = full_qkv.view(info.kv_heads, (2 * r + 2) * hd, -1)
    query, gate, _, _ = torch.split(groups, [r * hd, r * hd, hd, hd], dim=1)
    hf_q = hf[full + "q_proj.weight"].view(info.heads, 2, hd, -1)  # transformers: view(heads, 2*hd) then chunk
    assert torch.equal(query.reshape(info.heads, hd, -1), hf_q[:, 0])
    assert torch.equal(gate.reshape(info.heads, hd, -1), hf_q[:, 1])
    norm = params["language_model.decoder.layers.0.self_attention.out_norm.weight"]
    assert torch.equal(_materialize(norm, hf, 1, 0), (hf[lin + "norm.weight"].float() - 1).to(torch.bfloat16))


def test_minus_one_exactness():
    gains = torch.linspace(0.5, 1.99, 200).to(torch.bfloat16)
    assert q.minus_one_is_exact(gains)
    assert not q.minus_one_is_exact(torch.tensor([0.1], dtype=torch.bfloat16))


def test_mtp_table_names(folders):
    sk = _skeleton(folders["moe"])
    names = {p.name for p in q.megatron_params(sk) if p.stage == "last" and ".mtp." in p.name}
    mg = "language_model.mtp.layers.0."
    for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight",
              "mtp_model_layer.self_attention.linear_qkv.weight", "mtp_model_layer.mlp.router.weight",
              "mtp_model_layer.mlp.experts.linear_fc1.weight{expert}", "mtp_model_layer.mlp.shared_experts.gate_weight",
              "mtp_model_layer.pre_mlp_layernorm.weight"):
        assert mg + n in names
    no_mtp = q.build_skeleton(sk.info, experts=sk.experts, mtp=False)
    assert not [p for p in q.megatron_params(no_mtp) if ".mtp." in p.name]


def test_family_interface(folders):
    fam = q.FAMILY
    raw = json.loads((folders["moe"] / "config.json").read_text())
    info = fam.load_config(raw)
    assert isinstance(info, ModelInfo) and info.is_moe and info.layer_types == ("linear_attention", "full_attention")
    assert "qwen3_5_moe" in fam.model_types and "Qwen3_5MoeForConditionalGeneration" in fam.architectures
    released = fam.build_skeleton(info)  # released Qwen3.5: fused decoder experts, per-expert MTP experts
    assert (released.experts, released.mtp_experts, released.family) == ("fused", "per_expert", fam)
    sk = fam.skeleton_for(info, _saved(folders["moe"]))
    assert {k: sk.tensors[k].shape for k in sk.hf_keys()} == _saved(folders["moe"])
    roles = fam.roles(sk)
    assert roles.expert_storage == "per_expert" and roles.embed == q.EMBED and not roles.tied
    assert all(n.startswith("mtp.") for n in roles.mtp) and "mtp.fc.weight" in roles.mtp
    assert "model.language_model.layers.1.mlp.experts.2.up_proj.weight" in roles.experts
    assert all(n.startswith("model.visual.") for n in roles.vision) and roles.vision
    assert not fam.is_expert("model.language_model.layers.0.mlp.experts.gate_up_proj")  # never transposed
    assert fam.layer_of("model.language_model.layers.1.self_attn.q_proj.weight") == 1
    assert fam.stage_of("mtp.layers.0.self_attn.q_proj.weight") == "last"
    assert fam.stage_of("model.visual.pos_embed.weight") == "first"
    assert fam.source_shape(released, Src("model.language_model.layers.0.mlp.experts.gate_up_proj", 1)) == (32, 32)
    assert fam.source_shape(released, Src("model.language_model.layers.0.mlp.experts.down_proj", 1)) == (32, 16)
    fam.check_tensor_parallel(info, 2)
    with pytest.raises(UserError, match="--tp 4 must divide"):
        fam.check_tensor_parallel(info, 4)
    assert len(fam.megatron_params(sk)) == len(q.megatron_params(sk))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_generic_split_handles_blocks_as_the_family_does(folders, kind):
    """megatron_table._split (what plan_megatron_ranks uses) gives every TP-2 shard of the Qwen3.5 table the bytes
    the family's own split_param gives, ``blocks`` (GDN in_proj / conv1d) included."""
    from vlconvert.models.megatron_table import _split

    sk = _skeleton(folders[kind])
    hf = _tensors(folders[kind])
    params = q.megatron_params(sk, padded_vocab=256)
    assert any(p.split == "blocks" for p in params)
    for p in params:
        for rank in range(2):
            axis, segs, shape = _split(p, 2, rank)
            want_axis, want_segs, want_shape = q.split_param(p, 2, rank)
            assert (axis, shape) == (want_axis, want_shape), p.name
            if p.split == "blocks":
                assert segs == want_segs, p.name
            if axis == 0 and all(s is not None for s, _, _ in segs):
                got = torch.cat([_source(hf, s)[a:b] for s, a, b in segs])
                assert torch.equal(got, _materialize(p, hf, 2, rank) if p.value_op is None
                                   else q.to_hf_value(p, _materialize(p, hf, 2, rank))), p.name


# --------------------------------------------------------------------------------------- routes (registered)
def _hf(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _same(a: Path, b: Path) -> None:
    left, right = _hf(a), _hf(b)
    assert sorted(left) == sorted(right)
    for name, t in left.items():
        assert t.dtype == right[name].dtype and torch.equal(t, right[name]), name


def _logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 17, 42, 7, 88, 3, 60]])).logits


ROUTES = [("dense", {}), ("dense", {"tp": 2}), ("moe", {"tp": 2, "ep": 2}), ("moe_fused", {}),
          ("moe_fused", {"ep": 2}), ("moe_fused", {"tp": 2, "ep": 2})]


@pytest.mark.parametrize(("kind", "sizes"), ROUTES, ids=[f"{k}-{'-'.join(f'{a}{b}' for a, b in s.items()) or 'tp1'}"
                                                         for k, s in ROUTES])
def test_megatron_round_trip_keeps_mtp_bit_exact(folders, tmp_path, kind, sizes):
    """HF -> Megatron -> HF: every tensor back bit-exact, mtp.* included (Megatron's MTP layer holds it), in the
    stored form of the original folder (--assets-dir); GDN out_norm through the minus_one value op."""
    from vlconvert.engine import Converter

    src = folders[kind]
    result = Converter(src, tmp_path / "mg", to="megatron", **sizes).run()
    names = {t.name for r in result.plan.megatron.ranks for t in r.tensors}
    assert any(".mtp.layers.0.mtp_model_layer." in n for n in names) and any("out_norm" in n for n in names)
    Converter(tmp_path / "mg", tmp_path / "hf", to="hf", assets_dir=src).run()
    _same(src, tmp_path / "hf")
    if sizes.get("tp") == 2:
        assert torch.equal(_logits(tmp_path / "hf"), _logits(src))


@pytest.mark.parametrize("kind", ["dense", "moe", "moe_fused"])
def test_dcp_loads_into_the_transformers_model(folders, tmp_path, kind):
    """HF -> DCP: dcp.load fills the transformers model's whole state dict (experts fused as it holds them,
    mtp.* kept beside under its own names); DCP -> HF gives the folder back bit-exact."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForImageTextToText

    from vlconvert.engine import Converter

    src = folders[kind]
    Converter(src, tmp_path / "dcp", to="dcp").run()
    reference = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.bfloat16).state_dict()
    target = {k: torch.zeros_like(v) for k, v in reference.items()}
    dcp.load(target, checkpoint_id=str(tmp_path / "dcp"))
    for name, t in reference.items():
        assert torch.equal(target[name], t), name
    Converter(tmp_path / "dcp", tmp_path / "hf", to="hf", assets_dir=src).run()
    _same(src, tmp_path / "hf")


@pytest.mark.parametrize("kind", ["dense", "moe_fused"])
def test_torch_dist_round_trip_for_each_consumer(folders, tmp_path, kind):
    """mbridge (Megatron-Core ViT), ms-swift (the HF ViT kept as a module) and the default consumer Megatron-Bridge
    (mbridge's tensors and its run_config.yaml, checked in tests/test_bridge_run_config.py): back to HF bit-exact."""
    import yaml

    from vlconvert.engine import Converter

    src = folders[kind]
    for consumer in ("mbridge", "ms-swift", "megatron-bridge"):
        Converter(src, tmp_path / consumer, to="torch_dist", consumer=consumer).run()
        Converter(tmp_path / consumer, tmp_path / f"{consumer}-hf", to="hf", assets_dir=src).run()
        _same(src, tmp_path / f"{consumer}-hf")
    model = yaml.safe_load((tmp_path / "megatron-bridge/iter_0000000/run_config.yaml").read_text())["model"]
    assert model["_target_"].endswith("Qwen35VLMoEModelProvider" if kind != "dense" else "Qwen35VLModelProvider")
    assert model["linear_attention_freq"] == [1, 0] and model["mtp_num_layers"] == 1


@pytest.mark.parametrize("kind", ["dense", "moe", "moe_fused"])
def test_plan_and_inspect_accept_every_stored_form(folders, tmp_path, kind):
    from vlconvert.engine import Converter
    from vlconvert.inspection import inspect_checkpoint
    from vlconvert.planning import plan_conversion

    src = folders[kind]
    sizes = {"tp": 2, "ep": 2} if kind != "dense" else {"tp": 2}
    plan = plan_conversion(src / "config.json", "megatron", **sizes)
    assert plan.ok, [c.message for c in plan.failed]
    # with --source the tensors held are checked against the config in the form they are stored (fused or per
    # expert): plan must not say a conversion would be refused that runs
    checked = plan_conversion(None, "megatron", source=src, **sizes)
    keys = next(c for c in checked.checks if c.name == "source keys")
    assert checked.ok and keys.ok and keys.message.startswith("0 missing, 0 unexpected"), keys.message
    result = Converter(src, tmp_path / "mg", to="megatron", **sizes).run()
    written = {f"release/{r.folder}/model_optim_rng.pt": r.nbytes for r in result.plan.megatron.ranks}
    assert {r.folder: r.bytes for r in plan.ranks} == written
    Converter(src, tmp_path / "dcp", to="dcp").run()
    # verify the release against its conversions with no option: the HF side tells the other side's stored form
    from vlconvert.comparison import verify

    for other in (tmp_path / "mg", tmp_path / "dcp"):
        for left, right in ((src, other), (other, src)):
            report = verify(left, right)
            assert report.ok and report.counts() == {"equal": len(_saved(src))}, (left, right, report.counts())
    for folder in (src, tmp_path / "mg", tmp_path / "dcp"):
        report = inspect_checkpoint(folder)
        assert report["family"] == ("qwen3_5" if kind == "dense" else "qwen3_5_moe"), folder
        assert report["inconsistencies"] == [], folder


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_training_dcp_without_mtp_gets_it_back_from_assets(folders, tmp_path, kind):
    """A DCP a training job saves (``dcp.save`` of the transformers model: no ``mtp.*``) converted back with
    --assets-dir the release: every tensor of the release, mtp.* read from it; through Megatron too."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForImageTextToText

    from vlconvert.engine import Converter

    src = folders[kind]
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.bfloat16)
    assert not any(k.startswith("mtp.") for k in model.state_dict())
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "job"))
    result = Converter(tmp_path / "job", tmp_path / "hf", to="hf", assets_dir=src).run()
    assert any("taken from --assets-dir" in n for n in result.notes)
    _same(src, tmp_path / "hf")
    Converter(tmp_path / "job", tmp_path / "mg", to="megatron", tp=2, assets_dir=src).run()
    Converter(tmp_path / "mg", tmp_path / "hf2", to="hf", assets_dir=src).run()
    _same(src, tmp_path / "hf2")


def test_a_folder_without_config_is_told_apart_from_qwen3_vl(folders, tmp_path):
    """Qwen3.5 shares Qwen3-VL's embedding and vision names; its Gated DeltaNet layers tell it apart."""
    from vlconvert.inspection import inspect_checkpoint

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((folders["moe_fused"] / "model.safetensors").read_bytes())
    report = inspect_checkpoint(bare)
    assert report["config"] is None and report["family"] == "qwen3_5_moe"
    assert report["parameters"]["experts"] > 0 and report["tied_embeddings"]["lm_head_stored"]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_megatron_lm_args_carry_gated_deltanet_fields(folders, tmp_path, kind):
    """``--for megatron-lm``: the checkpoint's ``args`` name the hybrid layers and GDN sizes as megatron-core 0.19's
    TransformerConfig fields (Megatron-LM's flags), from the HF config."""
    from vlconvert.engine import Converter

    src = folders[kind]
    text = json.loads((src / "config.json").read_text())["text_config"]
    Converter(src, tmp_path / "td", to="torch_dist", consumer="megatron-lm").run()
    args = torch.load(tmp_path / "td/release/common.pt", weights_only=False)["args"]
    assert args.experimental_attention_variant == "gated_delta_net" and args.attention_output_gate
    assert args.linear_attention_freq == [int(t == "linear_attention") for t in text["layer_types"]] == [1, 0]
    assert (args.linear_conv_kernel_dim, args.linear_key_head_dim, args.linear_value_head_dim,
            args.linear_num_key_heads, args.linear_num_value_heads) == tuple(
        text[k] for k in ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                          "linear_num_key_heads", "linear_num_value_heads"))
    assert args.apply_layernorm_1p and args.layernorm_zero_centered_gamma and args.qk_layernorm
    assert args.rotary_percent == text["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert args.mtp_num_layers == text["mtp_num_hidden_layers"] == 1 and args.kv_channels == text["head_dim"]
    if kind == "moe":
        assert args.moe_shared_expert_intermediate_size == text["shared_expert_intermediate_size"]
        assert args.num_experts == text["num_experts"] and args.ffn_hidden_size == text["moe_intermediate_size"]
    # the language model only (no vision tower): back to HF as a partial checkpoint, bit-exact
    Converter(tmp_path / "td", tmp_path / "hf", to="hf", assets_dir=src, allow_missing=True).run()
    want, have = load_file(src / "model.safetensors"), load_hf_tensors(tmp_path / "hf")
    assert not [k for k in have if k.startswith("model.visual.")] and EMBED_KEY in have
    assert all(torch.equal(want[k], have[k]) for k in have)
    assert sorted(have) == sorted(k for k in want if not k.startswith("model.visual."))
