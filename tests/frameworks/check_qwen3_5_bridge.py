"""vlconvert's Qwen3.5-VL Megatron table against Megatron-Bridge 0.6.2's own Qwen3.5-VL mappings (a script).

Run with the frameworks venv (Python 3.12, Megatron-Bridge 0.6.2, megatron-core 0.19.2):

    .venv-frameworks/bin/python tests/frameworks/check_qwen3_5_bridge.py   (the venv tests/frameworks/run.sh makes)

1. Names: for tiny dense and MoE configs in every stored expert layout (fused / per-expert decoder experts,
   per-expert / fused MTP experts), every parameter of ``qwen3_5.megatron_params`` (TE spec; grouped and
   sequential experts; the bridge maps the MTP layer's experts only as grouped GEMM, so sequential MTP
   experts are skipped) is found by the bridge's ``mapping_registry().megatron_to_hf_lookup`` and maps to the
   same HF tensors; every HF tensor of the skeleton is found by ``hf_to_megatron_lookup``.
2. Values: the full (TP 1) and per-rank (TP 2) Megatron tensors vlconvert's row maps build equal what the
   bridge's own mapping classes produce from the same HF tensors (gated QKV, GDN in_proj, GDN conv1d, the
   zero-centred GDN output norm); the bridge's distribution step is replaced by an even chunk of the
   merged tensor, which is what its column-parallel mapping does.
Exit status 0 when everything agrees.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bridge_env  # noqa: E402

bridge_env.install()

from megatron.bridge.models.conversion import param_mapping as pm  # noqa: E402
from megatron.bridge.models.qwen_vl.qwen35_vl_bridge import Qwen35VLBridge, Qwen35VLMoEBridge  # noqa: E402

from vlconvert.models import qwen3_5 as q  # noqa: E402


def config(moe: bool) -> dict:
    text = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "linear_key_head_dim": 8, "linear_value_head_dim": 12, "linear_num_key_heads": 2,
            "linear_num_value_heads": 4, "linear_conv_kernel_dim": 4, "vocab_size": 160, "intermediate_size": 48,
            "mtp_num_hidden_layers": 1, "full_attention_interval": 2}
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    shared_expert_intermediate_size=24)
    return {"model_type": "qwen3_5_moe" if moe else "qwen3_5", "tie_word_embeddings": False, "text_config": text,
            "vision_config": {"depth": 2, "hidden_size": 16, "num_heads": 2, "intermediate_size": 24,
                              "out_hidden_size": 32, "num_position_embeddings": 16, "patch_size": 4}}


def registry_for(sk: q.Skeleton):
    bridge = Qwen35VLMoEBridge() if sk.info.is_moe else Qwen35VLBridge()
    keys = list(sk.hf_keys())
    bridge.hf_pretrained = SimpleNamespace(state=SimpleNamespace(source=SimpleNamespace(get_all_keys=lambda: keys)))
    return bridge.mapping_registry()


def hf_names(mapping) -> set[str]:
    hp = mapping.hf_param
    return set(hp.values()) if isinstance(hp, dict) else {hp}


def check_names(sk: q.Skeleton, what: str) -> list[str]:
    errors: list[str] = []
    reg = registry_for(sk)
    for style in ("grouped", "sequential"):
        for p in q.megatron_params(sk, spec="te", experts=style):
            name = p.name.format(layer=p.layer, expert=p.expert)
            m = reg.megatron_to_hf_lookup(name)
            mine = {s.hf for s in p.sources()}
            if p.name.endswith("output_layer.weight") and sk.info.tied:
                continue
            if m is None and ".mtp." in name and ".local_experts." in name:
                continue  # Bridge 0.6.2 maps MTP experts only as grouped GEMM (no SequentialMLP MTP mapping)
            if m is None:
                errors.append(f"{what}: bridge has no mapping for {name}")
            elif hf_names(m) != mine:
                errors.append(f"{what}: {name}: bridge {sorted(hf_names(m))} vs vlconvert {sorted(mine)}")
    for n in sk.hf_keys():
        if reg.hf_to_megatron_lookup(n) is None:
            errors.append(f"{what}: bridge has no mapping for HF {n}")
    return errors


class _Chunk:
    """Stand-in for the bridge's TP distribution: the merged tensor chunked evenly, as column parallel does."""

    def __init__(self, tp: int, rank: int):
        self.tp, self.rank = tp, rank

    def hf_to_megatron(self, merged, module):
        return merged.chunk(self.tp)[self.rank]


def run_mapping(cls, tp: int, rank: int, hf_weights, cfg, *args):
    """Call a bridge mapping's hf_to_megatron as TP rank ``rank`` of ``tp`` (merge computed as rank 0)."""
    sub = type(f"Local{cls.__name__}", (cls,), {"tp_rank": property(lambda s: 0), "tp_size": property(lambda s: tp)})
    m = sub(*args)
    m._tp_mapping = _Chunk(tp, rank)
    return m.hf_to_megatron(hf_weights, SimpleNamespace(config=cfg))


def check_values() -> list[str]:
    errors: list[str] = []
    sk = q.build_skeleton(config(True))
    info = sk.info
    torch.manual_seed(0)
    hf = {n: torch.randn(t.shape).to(torch.bfloat16) for n, t in sk.tensors.items()}
    hf.update({n: (torch.rand(t.shape) + 0.5).to(torch.bfloat16) for n, t in sk.tensors.items()
               if n.endswith("norm.weight")})
    params = {p.name.format(layer=p.layer, expert=p.expert): p for p in q.megatron_params(sk)}
    cfg = SimpleNamespace(num_attention_heads=info.heads, num_query_groups=info.kv_heads, kv_channels=info.head_dim,
                          hidden_size=info.hidden, attention_output_gate=True,
                          linear_key_head_dim=info.linear_key_head_dim,
                          linear_value_head_dim=info.linear_value_head_dim,
                          linear_num_key_heads=info.linear_key_heads, linear_num_value_heads=info.linear_value_heads)

    def mine(name: str, tp: int, rank: int) -> torch.Tensor:
        p = params[name]
        axis, segs, _ = q.split_param(p, tp, rank)
        src = lambda s: hf[s.hf] if s.expert is None else hf[s.hf][s.expert]  # noqa: E731
        t = src(segs[0][0])[:, segs[0][1]:segs[0][2]] if axis == 1 else torch.cat([src(s)[a:b] for s, a, b in segs])
        return q.to_megatron_value(p, t)

    lin, full = "model.language_model.layers.0.linear_attn.", "model.language_model.layers.1.self_attn."
    mg_lin = "language_model.decoder.layers.0.self_attention."
    mg_full = "language_model.decoder.layers.1.self_attention."
    for tp in (1, 2):
        for rank in range(tp):
            cases = {
                "linear_qkv": (run_mapping(pm.QKVMapping, tp, rank,
                                           {t: hf[f"{full}{t}_proj.weight"] for t in "qkv"}, cfg,
                                           mg_full + "linear_qkv.weight", "q", "k", "v"),
                               mine(mg_full + "linear_qkv.weight", tp, rank)),
                "in_proj": (run_mapping(pm.GDNLinearMappingSeparate, tp, rank,
                                        {"qkv": hf[lin + "in_proj_qkv.weight"], "z": hf[lin + "in_proj_z.weight"],
                                         "b": hf[lin + "in_proj_b.weight"], "a": hf[lin + "in_proj_a.weight"]},
                                        cfg, mg_lin + "in_proj.weight", "qkv", "z", "b", "a"),
                            mine(mg_lin + "in_proj.weight", tp, rank)),
                "conv1d": (run_mapping(pm.GDNConv1dMapping, tp, rank, hf[lin + "conv1d.weight"], cfg,
                                       mg_lin + "conv1d.weight", "x"), mine(mg_lin + "conv1d.weight", tp, rank)),
            }
            for what, (theirs, ours) in cases.items():
                if not torch.equal(theirs, ours):
                    errors.append(f"values: {what} at TP {tp} rank {rank} differs from the bridge")
    norm = pm.RMSNorm2ZeroCenteredRMSNormMapping(mg_lin + "out_norm.weight", lin + "norm.weight")
    orig = pm.AutoMapping.hf_to_megatron
    pm.AutoMapping.hf_to_megatron = lambda self, w, m: w
    try:
        theirs = norm.hf_to_megatron(hf[lin + "norm.weight"], None)
    finally:
        pm.AutoMapping.hf_to_megatron = orig
    if not torch.equal(theirs, mine(mg_lin + "out_norm.weight", 1, 0)):
        errors.append("values: GDN out_norm (HF - 1) differs from the bridge")
    return errors


def main() -> int:
    errors: list[str] = []
    checked = 0
    for moe in (False, True):
        layouts = [("fused", "per_expert")]
        if moe:
            layouts += [("per_expert", "per_expert"), ("fused", "fused")]
        for experts, mtp_experts in layouts:
            sk = q.build_skeleton(config(moe), experts=experts, mtp_experts=mtp_experts)
            what = f"{sk.info.family} experts={experts} mtp_experts={mtp_experts}"
            errors += check_names(sk, what)
            checked += len(q.megatron_params(sk))
    errors += check_values()
    for e in errors:
        print("MISMATCH", e)
    print(f"{checked} parameters (x2 expert styles) checked against Megatron-Bridge 0.6.2; "
          f"{len(errors)} mismatches")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
