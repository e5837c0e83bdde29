"""Multi-GPU parity: megatron-core's GPTModel at TP 2 / PP 2 / EP 2 on vlconvert's output vs transformers.

Started without ``torchrun``, the script converts every tiny fixture with the ``vlconvert`` command line
(fp32, local spec, sequential experts) into a work folder, then launches itself under
``torchrun --nproc-per-node N`` (one process per GPU, NCCL). Each case builds megatron-core's ``GPTModel``
at the case's parallel sizes, fills it from one checkpoint, runs a text-only prompt and compares the
logits gathered over tensor parallelism (``parallel_output=False``) with transformers'
``Qwen3VL(Moe)ForConditionalGeneration`` on the same token ids, on the same GPU, in fp32.

Cases, for each fixture (EP only for the MoE one):

- ``legacy``: ``vlconvert convert --to megatron`` at that size; each rank loads its own
  ``mp_rank_*/model_optim_rng.pt`` (``language_model.*`` part) with ``strict=True``;
- ``torch_dist``: ``vlconvert convert --to torch_dist`` at that size, loaded with
  ``dist_checkpointing.load``;
- ``torch_dist-from-tp1``: the torch_dist checkpoint written at TP 1 (PP 1, EP 1), loaded at that size
  through ``dist_checkpointing.load`` (megatron-core reshards on load).

A control case loads the TP 2 rank files of the MoE fixture on the wrong ranks (the shapes fit): it
passes only if the comparison fails, which shows the check can fail.

Parameters are zeroed before every load, so a tensor that is not loaded shows in the logits. Pipeline
stages pass hidden states with NCCL send/recv; only the last stage has logits. Passing: relative error
(max |diff| / max |HF logit|) below 1e-5 and equal argmax on every rank that has logits.

Run (needs N >= 2 GPUs and megatron-core 0.16.1)::

    PYTHONPATH=. python bench/gpu_megatron_parity_mp.py --gpus 2 --out parity-mp.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIX = ROOT / "fixtures"
FIXTURES = ["tiny-dense-tied", "tiny-dense-untied", "tiny-moe"]
LM = "language_model."
THRESHOLD = 1e-5
CPU = os.environ.get("PARITY_CPU") == "1"  # debug the script's logic without GPUs (gloo; forward may fail)
# NVLink multicast stays off on shared hosts (device notes); torchrun's children inherit these.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def sizes(fixture: str) -> list[tuple[int, int, int]]:
    """The (tp, pp, ep) layouts checked for ``fixture`` on two processes."""
    return [(2, 1, 1), (1, 2, 1)] + ([(1, 1, 2)] if "moe" in fixture else [])


def case_name(tp: int, pp: int, ep: int) -> str:
    return f"tp{tp}-pp{pp}-ep{ep}"


# --------------------------------------------------------------------------------------- conversions
def vlconvert(*args: str) -> None:
    """Run the ``vlconvert`` command line as a user does, outside torchrun's environment."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    subprocess.run([sys.executable, "-m", "vlconvert", "convert", *args, "--spec", "local", "--experts",
                    "sequential", "--dtype", "fp32", "-q"], check=True, env=env)


def prepare(work: Path) -> list[dict]:
    """Convert every fixture into ``work``; return the cases to check."""
    from vlconvert.models.qwen3vl import load_config

    cases = []
    for fixture in FIXTURES:
        src = str(FIX / fixture)
        layers = load_config(FIX / fixture / "config.json").layers
        tp1 = work / fixture / "torch_dist-tp1-pp1-ep1"
        vlconvert(src, str(tp1), "--to", "torch_dist")
        for tp, pp, ep in sizes(fixture):
            size = ["--tp", str(tp), "--pp", str(pp), "--ep", str(ep)]
            first = None
            if layers % pp:  # uneven stages: the first one gets fewer (it also holds the embedding)
                first = layers // pp
                size += ["--pp-first-layers", str(first), "--pp-last-layers", str(layers - first * (pp - 1))]
            name = case_name(tp, pp, ep)
            for layout in ("megatron", "torch_dist"):
                dst = work / fixture / f"{layout}-{name}"
                vlconvert(src, str(dst), "--to", layout, *size)
                fmt = "legacy" if layout == "megatron" else layout
                cases.append(dict(fixture=fixture, layout=fmt, format=fmt, tp=tp, pp=pp, ep=ep, first=first,
                                  path=str(dst / "release")))
            cases.append(dict(fixture=fixture, layout="torch_dist-from-tp1", format="torch_dist", tp=tp, pp=pp,
                              ep=ep, first=first, path=str(tp1 / "release")))
    # control: the TP 2 rank files loaded by the wrong ranks (same shapes) must fail the comparison
    control = next(c for c in cases if c["fixture"] == "tiny-moe" and c["layout"] == "legacy" and c["tp"] == 2)
    cases.append(dict(control, layout="control: tp ranks swapped", swap_tp=True))
    return cases


# ---------------------------------------------------------------------------------- megatron-core side
def build_gpt(info, tp: int, pp: int, ep: int, first: int | None):
    """megatron-core GPTModel (local spec, fp32, on this rank's GPU) for ``info``'s text model; ``first``:
    decoder layers on the first pipeline stage when the stages are uneven."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    text = info.raw["text_config"]
    uneven = {} if first is None else dict(num_layers_in_first_pipeline_stage=first,
                                           num_layers_in_last_pipeline_stage=info.layers - first * (pp - 1))
    moe = dict(num_moe_experts=info.experts, moe_router_topk=info.experts_per_token,
               moe_ffn_hidden_size=info.moe_intermediate, moe_router_load_balancing_type="none",
               moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather") if info.is_moe else {}
    cfg = TransformerConfig(num_layers=info.layers, hidden_size=info.hidden, num_attention_heads=info.heads,
                            num_query_groups=info.kv_heads, kv_channels=info.head_dim,
                            ffn_hidden_size=info.intermediate, normalization="RMSNorm", gated_linear_unit=True,
                            activation_func=torch.nn.functional.silu, add_bias_linear=False, qk_layernorm=True,
                            layernorm_epsilon=text.get("rms_norm_eps", 1e-6), hidden_dropout=0.0,
                            attention_dropout=0.0, bias_dropout_fusion=False, apply_rope_fusion=False,
                            masked_softmax_fusion=False, gradient_accumulation_fusion=False,
                            params_dtype=torch.float32, pipeline_dtype=torch.float32,
                            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                            expert_model_parallel_size=ep, use_cpu_initialization=CPU, **uneven, **moe)
    spec = get_gpt_layer_local_spec(num_experts=info.experts or None, moe_grouped_gemm=False, qk_layernorm=True,
                                    normalization="RMSNorm")
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=info.vocab, max_sequence_length=4096,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(), parallel_output=False,
                     share_embeddings_and_output_weights=info.tied, position_embedding_type="rope",
                     rotary_base=int(text.get("rope_theta", 5000000)))
    return (model if CPU else model.cuda()).eval()  # some local-spec modules (RMSNorm) start on the CPU


def load_weights(model, case: dict) -> dict:
    """Zero ``model`` and fill it from the case's checkpoint; say how it loaded."""
    from megatron.core import parallel_state

    from vlconvert.layouts import megatron as mlay

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    if case["format"] == "legacy":
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        folder = mlay.rank_folder(tp_rank ^ 1 if case.get("swap_tp") else tp_rank,
                                  parallel_state.get_pipeline_model_parallel_rank(),
                                  parallel_state.get_expert_model_parallel_rank(), case["pp"], case["ep"])
        rank_file = mlay.RankFile(Path(case["path"]) / folder / mlay.RANK_FILE)
        sd = {n[len(LM):]: rank_file.read(n) for n in rank_file.tensors if n.startswith(LM)}
        result = model.load_state_dict(sd, strict=True)
        return {"file": folder, "strict": not result.missing_keys and not result.unexpected_keys}
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    # megatron-core's names: "unexpected" = asked for but absent from the checkpoint; "missing" = in the
    # checkpoint but asked for by no rank (here: the vision tower, which GPTModel does not have)
    loaded, not_asked, absent = dist_checkpointing.load(model.sharded_state_dict(prefix=LM), case["path"],
                                                        strict=StrictHandling.RETURN_ALL)
    sd = {k[len(LM):]: v for k, v in loaded.items() if k.startswith(LM) and not k.endswith("_extra_state")}
    result = model.load_state_dict(sd, strict=False)
    left = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    text_not_asked = [k for k in not_asked if k.startswith(LM)]
    return {"strict": not absent and not text_not_asked and not left and not result.unexpected_keys,
            "checkpoint_keys_not_loaded": len(not_asked), "text_keys_not_loaded": text_not_asked[:5]}


def forward(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits [b, s, vocab] on the last pipeline stage (None elsewhere); hidden states go stage to stage."""
    from megatron.core import parallel_state

    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    hidden_shape = (tokens.shape[1], tokens.shape[0], model.config.hidden_size)
    with torch.no_grad():
        if not first:
            received = torch.empty(hidden_shape, dtype=torch.float32, device=tokens.device)
            torch.distributed.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(received)
        out = model(tokens, positions, attention_mask=None)
        if not last:
            torch.distributed.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
    return out.float()


def hf_logits(fixture: str, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits for ``tokens`` (same device)."""
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(FIX / fixture, dtype=torch.float32).to(tokens.device).eval()
    with torch.no_grad():
        return hf(input_ids=tokens).logits.float()


def check(cases: list[dict], rank: int) -> list[dict]:
    """Run every case on this rank; return this rank's rows."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from vlconvert.models.qwen3vl import load_config

    device = torch.device("cpu") if CPU else torch.device("cuda", torch.cuda.current_device())
    tokens = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    reference: dict[str, torch.Tensor] = {}
    rows = []
    for case in cases:
        fixture, tp, pp, ep = case["fixture"], case["tp"], case["pp"], case["ep"]
        info = load_config(FIX / fixture / "config.json")
        if CPU and info.tied and pp > 1:
            continue  # megatron-core moves the tied output layer to CUDA when it builds the last stage
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 expert_model_parallel_size=ep)
        model_parallel_cuda_manual_seed(0)
        model = build_gpt(info, tp, pp, ep, case["first"])
        size = case_name(tp, pp, ep) + ("" if case["first"] is None else f" ({case['first']}+rest)")
        row = dict(fixture=fixture, layout=case["layout"], size=size, rank=rank,
                   **load_weights(model, case))
        logits = None if CPU else forward(model, tokens)  # megatron-core's forward needs CUDA
        if logits is not None:
            if fixture not in reference:
                reference[fixture] = hf_logits(fixture, tokens)
            want = reference[fixture]
            got = logits[..., : info.vocab]
            diff = (got - want).abs().max().item()
            rel = diff / want.abs().max().item()
            argmax = bool(torch.equal(got.argmax(-1), want.argmax(-1)))
            agrees = row["strict"] and rel < THRESHOLD and argmax
            row.update(logits_shape=list(got.shape), max_abs_diff=diff, max_rel_diff=rel, argmax_equal=argmax,
                       ok=not agrees if case.get("swap_tp") else agrees)
        else:
            row.update(ok=row["strict"], logits_shape=None)
        rows.append(row)
        del model
        torch.distributed.barrier()
    return rows


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: one GPU, NCCL."""
    warnings.filterwarnings("ignore")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if CPU:
        torch.distributed.init_process_group("gloo")
        from megatron.core.tensor_parallel import random as mrandom

        mrandom.get_cuda_rng_tracker().add = lambda *a, **k: None  # no CUDA RNG streams
        mrandom.model_parallel_cuda_manual_seed = lambda *a, **k: None
    else:
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", local))
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None  # 0.16.1 without Transformer Engine references it unguarded
    cases = json.loads(Path(args.cases).read_text())
    rows = check(cases, rank)
    gathered: list[list[dict]] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(gathered, rows)
    if rank == 0:
        import megatron.core
        import transformers

        flat = [r for per_rank in gathered for r in per_rank]
        name = "CPU" if CPU else torch.cuda.get_device_name(0)
        nccl = None if CPU else ".".join(map(str, torch.cuda.nccl.version()))
        checked = sum(r["logits_shape"] is not None for r in flat)
        summary = {"device": f"{torch.distributed.get_world_size()} x {name}", "torch": torch.__version__,
                   "cuda": torch.version.cuda, "nccl": nccl,
                   "transformers": transformers.__version__, "megatron_core": megatron.core.__version__,
                   "threshold": THRESHOLD, "rows": flat, "checked": checked,
                   "all_pass": checked > 0 and all(r["ok"] for r in flat)}
        Path(args.result).write_text(json.dumps(summary, indent=2) + "\n")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def table(summary: dict) -> str:
    """Markdown rows: one per case, the worst rank."""
    lines = ["| fixture | layout | size | strict load | max abs diff | max rel diff | argmax equal | ranks | pass |",
             "|---|---|---|---|---|---|---|---|---|"]
    seen: dict[tuple, list[dict]] = {}
    for r in summary["rows"]:
        seen.setdefault((r["fixture"], r["layout"], r["size"]), []).append(r)
    for (fixture, layout, size), rows in seen.items():
        with_logits = [r for r in rows if r["logits_shape"] is not None]
        worst = max(with_logits, key=lambda r: r["max_rel_diff"], default={"max_abs_diff": float("nan"),
                                                                           "max_rel_diff": float("nan")})
        lines.append(f"| {fixture} | {layout} | {size} | {'yes' if all(r['strict'] for r in rows) else 'NO'} | "
                     f"{worst['max_abs_diff']:.1e} | {worst['max_rel_diff']:.1e} | "
                     f"{'yes' if all(r['argmax_equal'] for r in with_logits) else 'NO'} | "
                     f"{len(with_logits)} of {len(rows)} with logits | "
                     f"{'yes' if all(r['ok'] for r in rows) else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="processes (GPUs) for torchrun")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    parser.add_argument("--work", type=Path, default=None, help="keep the conversions here")
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(SAFE_ENV)
    if "RANK" in os.environ:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        cases = prepare(work)
        (work / "cases.json").write_text(json.dumps(cases))
        result = work / "result.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(args.gpus), __file__, "--cases", str(work / "cases.json"), "--result", str(result)],
                       check=True)
        summary = json.loads(result.read_text())
    print(table(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    sys.exit(0 if summary["all_pass"] else 1)


if __name__ == "__main__":
    main()
