"""GPU parity: megatron-core's GPTModel forward on vlconvert's converted text model vs HF logits.

For each tiny fixture: ``hf_to_megatron --spec local --experts sequential --tp 1 --dtype fp32``, load the
``language_model.*`` part of the rank file into megatron-core's ``GPTModel`` (local spec) with
``strict=True``, run a text-only prompt on CUDA, and compare the logits (first ``vocab`` columns) with
transformers' ``Qwen3VL(Moe)ForConditionalGeneration`` in fp32 on the same tokens.

Run (needs CUDA and megatron-core 0.16.1)::

    PYTHONPATH=. python bench/gpu_megatron_parity.py --out parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
FIX = ROOT / "fixtures"

from gpu_megatron_parity_mp import build_gpt  # noqa: E402


def parity(fixture: str, work: Path, device: str) -> dict:
    from transformers import AutoModelForImageTextToText

    from vlconvert.layouts import megatron as mlay
    from vlconvert.megatron_convert import hf_to_megatron
    from vlconvert.models.qwen3vl import load_config

    src = FIX / fixture
    info = load_config(src / "config.json")
    dst = work / fixture
    result = hf_to_megatron(src, dst, spec="local", experts="sequential", dtype=torch.float32)
    rf = mlay.RankFile(dst / "release/mp_rank_00/model_optim_rng.pt")
    sd = {n.removeprefix("language_model."): rf.read(n) for n in rf.tensors if n.startswith("language_model.")}
    model = build_gpt(info, 1, 1, 1, None)  # the same model as the multi-GPU check, at TP = PP = EP = 1
    missing, unexpected = model.load_state_dict(sd, strict=True)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2000, (2, 24), generator=gen)  # text ids only, below the special tokens
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        mg_logits = model(tokens.to(device), positions.to(device), attention_mask=None)
    mg_logits = mg_logits.float()[..., : info.vocab].cpu()
    hf = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=tokens.to(device)).logits.float().cpu()
    diff = (mg_logits - hf_logits).abs().max().item()
    rel = diff / hf_logits.abs().max().item()
    return {"fixture": fixture, "rank_files": result.files, "strict_load": not missing and not unexpected,
            "logits_shape": list(hf_logits.shape), "max_abs_diff": diff, "max_rel_diff": rel,
            "argmax_equal": bool(torch.equal(mg_logits.argmax(-1), hf_logits.argmax(-1))),
            "pass": rel < 1e-4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--fixtures", nargs="+", default=["tiny-dense-tied", "tiny-dense-untied", "tiny-moe"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    device = "cuda"
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None  # 0.16.1 without Transformer Engine references it unguarded
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    import megatron.core
    import transformers

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fixture in args.fixtures:
            row = parity(fixture, Path(tmp), device)
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "transformers": transformers.__version__, "megatron_core": megatron.core.__version__,
               "results": rows, "all_pass": all(r["pass"] for r in rows)}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    sys.exit(0 if summary["all_pass"] else 1)


if __name__ == "__main__":
    main()
