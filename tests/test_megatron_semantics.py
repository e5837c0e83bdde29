"""Semantics: blocks computed from TP/EP-sharded rank tensors the way Megatron does equal the HF modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlconvert.layouts import megatron as mlay
from vlconvert.megatron_convert import hf_to_megatron

FIX = Path(__file__).resolve().parents[1] / "fixtures"
P = "language_model.decoder.layers.0."


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _ranks(root: Path, tp: int, ep: int = 1) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    out = {}
    for t in range(tp):
        for e in range(ep):
            rf = mlay.RankFile(root / "release" / mlay.rank_folder(t, 0, e, 1, ep) / mlay.RANK_FILE)
            out[(t, e)] = {n: rf.read(n) for n in rf.tensors if n.startswith(P)}
    return out


@pytest.fixture(scope="module")
def hf_moe():
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(FIX / "tiny-moe", dtype=torch.float32,
                                                        attn_implementation="eager")
    return model.eval()


@pytest.mark.parametrize("tp", [2, 4])
def test_attention_from_tp_shards_matches_hf(tmp_path: Path, hf_moe, tp: int) -> None:
    hf_to_megatron(FIX / "tiny-moe", tmp_path / "mg", tp=tp, dtype=torch.float32)
    ranks = _ranks(tmp_path / "mg", tp)
    lm = hf_moe.model.language_model
    layer = lm.layers[0]
    cfg = lm.config
    heads, groups, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    seq = 7
    x = torch.randn(1, seq, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(seq).view(1, 1, -1).expand(3, 1, -1)
    cos, sin = lm.rotary_emb(x, pos)
    mask = torch.full((seq, seq), float("-inf")).triu(1).view(1, 1, seq, seq)
    with torch.no_grad():
        want = layer.self_attn(layer.input_layernorm(x), position_embeddings=(cos, sin), attention_mask=mask)[0]
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import apply_rotary_pos_emb

    total = torch.zeros_like(want)
    g_local, r = groups // tp, heads // groups
    for t in range(tp):
        w = ranks[(t, 0)]
        xn = _rms(x, w[P + "self_attention.linear_qkv.layer_norm_weight"])
        qkv = (xn @ w[P + "self_attention.linear_qkv.weight"].t()).view(1, seq, g_local, (r + 2) * hd)
        q, k, v = torch.split(qkv, [r * hd, hd, hd], dim=-1)
        q = _rms(q.reshape(1, seq, g_local * r, hd), w[P + "self_attention.q_layernorm.weight"]).transpose(1, 2)
        k = _rms(k, w[P + "self_attention.k_layernorm.weight"]).transpose(1, 2)
        v = v.transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, seq, -1)
        total += o @ w[P + "self_attention.linear_proj.weight"].t()  # row parallel: partial sums
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)


def test_moe_from_ep_etp_shards_matches_hf(tmp_path: Path, hf_moe) -> None:
    tp, ep = 2, 2
    hf_to_megatron(FIX / "tiny-moe", tmp_path / "mg", tp=tp, ep=ep, dtype=torch.float32)
    ranks = _ranks(tmp_path / "mg", tp, ep)
    cfg = hf_moe.model.language_model.config
    block = hf_moe.model.language_model.layers[0].mlp
    x = torch.randn(1, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = block(x)
    flat = x.view(-1, cfg.hidden_size)
    router = ranks[(0, 0)][P + "mlp.router.weight"]
    assert all(torch.equal(router, r[P + "mlp.router.weight"]) for r in ranks.values())  # replicated
    logits = flat @ router.t()
    top_logits, top = logits.topk(cfg.num_experts_per_tok, dim=-1)
    probs = top_logits.softmax(-1)  # Megatron: top-k then softmax (moe_router_pre_softmax=False)
    per_rank = cfg.num_experts // ep
    out = torch.zeros_like(flat)
    for e in range(ep):
        for local in range(per_rank):
            g = e * per_rank + local
            hit = (top == g)
            tokens = hit.any(-1)
            if not tokens.any():
                continue
            weight = (probs * hit).sum(-1)[tokens]
            y = torch.zeros(int(tokens.sum()), cfg.hidden_size)
            for t in range(tp):  # expert TP: each rank holds [gate_t; up_t] and columns of fc2
                fc1 = ranks[(t, e)][P + f"mlp.experts.linear_fc1.weight{local}"]
                fc2 = ranks[(t, e)][P + f"mlp.experts.linear_fc2.weight{local}"]
                gate, up = (flat[tokens] @ fc1.t()).chunk(2, dim=-1)
                y += (F.silu(gate) * up) @ fc2.t()
            out[tokens] += weight[:, None] * y
    torch.testing.assert_close(out.view_as(want), want, rtol=1e-5, atol=1e-5)


def test_dense_mlp_from_tp_shards_matches_hf(tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(FIX / "tiny-dense-untied", dtype=torch.float32)
    tp = 4
    hf_to_megatron(FIX / "tiny-dense-untied", tmp_path / "mg", tp=tp, dtype=torch.float32)
    ranks = _ranks(tmp_path / "mg", tp)
    layer = model.model.language_model.layers[0]
    x = torch.randn(1, 5, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = layer.mlp(layer.post_attention_layernorm(x))
    total = torch.zeros_like(want)
    for t in range(tp):
        w = ranks[(t, 0)]
        xn = _rms(x, w[P + "mlp.linear_fc1.layer_norm_weight"])
        gate, up = (xn @ w[P + "mlp.linear_fc1.weight"].t()).chunk(2, dim=-1)
        total += (F.silu(gate) * up) @ w[P + "mlp.linear_fc2.weight"].t()
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)
