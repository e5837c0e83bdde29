"""Speed and memory of every conversion route against ``cp -r`` and PyTorch's own routes, same run.

Generates on demand (outside the repository, random bf16) one of:

* ``2B``: full-size Qwen3-VL-2B-Instruct (4.26 GB, 28 layers, 24-block ViT),
* ``8B``: full-size Qwen3-VL-8B-Instruct (17.5 GB, 36 layers, untied output layer),
* ``235B-slice``: Qwen3-VL-235B-A22B-Instruct with its real widths cut to 2 decoder layers and a 2-block
  ViT (12.2 GB: 128 experts, hidden 4096, moe_intermediate 1536; each fused ``gate_up_proj`` is 3.0 GiB),
* ``30B-slice``: Qwen3-VL-30B-A3B-Instruct cut the same way (quick runs),

then times each route in its own process (wall time including ``sync``, peak RSS of that process alone),
``--runs`` times, each run paired with a ``cp -r`` + ``sync`` of the route's input measured just before
it (the disk of a shared machine drifts; a ratio to the neighbouring copy is steadier than to one copy).
Prints medians with min-max, and ratios. Routes:

* hf->dcp, dcp->hf, hf->megatron (tp 2, and ep 4 for MoE), megatron->hf, reshard (to tp 1 / ep 2), hf->hf
  (re-shard and re-hash: transformers' peer route);
* peers: ``HuggingFaceStorageReader`` + ``dcp.save`` (hf->dcp), ``dcp.load`` + ``HuggingFaceStorageWriter``
  (dcp->hf), transformers ``from_pretrained`` + ``save_pretrained`` (hf->hf; skipped where the model does
  not fit in RAM twice);
* hf->dcp under ``torchrun --nproc-per-node N`` (``--ranks``, default 2) against one process.

Usage: ``python bench/bench_convert.py [--model 2B] [--runs 3] [--work /var/tmp/vlbench] [--keep]
[--only ROUTE,...] [--skip ROUTE,...] [--ranks 2,4,8]``.
Results and their reading are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"2B": ("Qwen3-VL-2B-Instruct", None, None),
          "8B": ("Qwen3-VL-8B-Instruct", None, None),
          "235B-slice": ("Qwen3-VL-235B-A22B-Instruct", 2, 2),
          "30B-slice": ("Qwen3-VL-30B-A3B-Instruct", 2, 2)}


def make_source(dst: Path, model: str) -> tuple[int, int]:
    """Write a random bf16 HF folder of ``model``'s real shapes, one safetensors file per ~2 GB (the
    generator holds one file's tensors); return (bytes, largest tensor bytes)."""
    import torch
    from safetensors.torch import save_file

    from fixtures.make_fixtures import write_tokenizer
    from vlconvert.models.qwen3vl import build_skeleton

    name, layers, depth = MODELS[model]
    config = json.loads((ROOT / "fixtures/configs" / f"{name}.json").read_text())
    if layers is not None:
        config["text_config"]["num_hidden_layers"] = layers
        config["vision_config"]["depth"] = depth
        config["vision_config"]["deepstack_visual_indexes"] = list(range(depth))
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(dst, vocab="real", thinking=False)
    sk = build_skeleton(config)
    shapes = {n: sk.shape_in(n, "released") for n in sk.hf_keys()}
    groups: list[list[str]] = [[]]
    size = 0
    for n, shape in shapes.items():
        nbytes = 2 * _prod(shape)
        if groups[-1] and size + nbytes > 2 * 10**9:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in group:
            bits = torch.randint(-2**15, 2**15, shapes[n], generator=gen, dtype=torch.int16)
            tensors[n] = (bits & ~0x4000).view(torch.bfloat16)  # top exponent bit clear: |x| < 2, no inf/nan
            weight_map[n] = fname
        save_file(tensors, str(dst / fname), metadata={"format": "pt"})
        del tensors
    total = sum(2 * _prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total, max(2 * _prod(s) for s in shapes.values())


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


PEER_HF_TO_DCP = """
import sys, torch, torch.distributed.checkpoint as dcp
reader = dcp.HuggingFaceStorageReader(sys.argv[1])
meta = reader.read_metadata()
sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.state_dict_metadata.items()}
dcp.load(sd, storage_reader=reader)
dcp.save(sd, checkpoint_id=sys.argv[2])
"""
PEER_DCP_TO_HF = """
import sys, torch, torch.distributed.checkpoint as dcp
meta = dcp.FileSystemReader(sys.argv[1]).read_metadata()
sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.state_dict_metadata.items()}
dcp.load(sd, checkpoint_id=sys.argv[1])
dcp.save(sd, storage_writer=dcp.HuggingFaceStorageWriter(sys.argv[2]))
"""
PEER_TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2])
"""


def timed(cmd: list[str], out: Path | None) -> tuple[float, float]:
    """(seconds including a final ``sync``, peak RSS in MiB of the child alone); ``out`` is removed first."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not a running maximum
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="2B")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/vlbench"))
    parser.add_argument("--keep", action="store_true", help="keep the generated data for another run")
    parser.add_argument("--skip", default="", help="comma-separated route names to leave out")
    parser.add_argument("--only", default="", help="comma-separated route names to run (default: all)")
    parser.add_argument("--ranks", default="2", type=lambda v: [int(x) for x in v.split(",") if x],
                        help="torchrun rank counts of the hf->dcp route (comma-separated)")
    parser.add_argument("--make-source", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_source:
        print(*make_source(args.make_source, args.model))
        return
    work = args.work / args.model
    src = work / "hf"
    py, vl = sys.executable, [sys.executable, "-m", "vlconvert"]
    if not (src / "model.safetensors.index.json").is_file():
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.perf_counter()
        # its own process: a child inherits its parent's peak RSS across fork+exec on Linux
        made = subprocess.run([py, __file__, "--make-source", str(src), "--model", args.model], check=True,
                              capture_output=True, text=True)
        total, largest = (int(x) for x in made.stdout.split()[-2:])
        (work / "source.json").write_text(json.dumps({"bytes": total, "largest": largest}))
        print(f"generated {args.model} in {time.perf_counter() - t0:.0f} s", flush=True)
    info = json.loads((work / "source.json").read_text())
    total = folder_bytes(src)
    print(f"{args.model}: {total / 1e9:.2f} GB on disk, tensors {info['bytes'] / 1e9:.2f} GB, largest tensor "
          f"{info['largest'] / 2**30:.2f} GiB; {os.cpu_count()} cores", flush=True)
    moe = "235B" in args.model or "30B" in args.model
    par = ["--tp", "2", "--ep", "4"] if moe else ["--tp", "2"]
    back = ["--tp", "1", "--ep", "2"] if moe else ["--tp", "1"]
    dcp, mg = work / "dcp", work / "mg"
    # (name, command, input folder, output folder): inputs made by earlier routes
    routes = [
        ("hf->dcp", [*vl, "convert", str(src), str(work / "o"), "--to", "dcp", "-q"], src),
        ("hf->dcp --max-memory 1GiB", [*vl, "convert", str(src), str(work / "o"), "--to", "dcp", "-q",
                                       "--max-memory", "1GiB"], src),
        ("hf->dcp (torch: HF reader + dcp.save)", [py, "-c", PEER_HF_TO_DCP, str(src), str(work / "o")], src),
        *[(f"hf->dcp torchrun {n} ranks", [py, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "-m",
                                          "vlconvert", "convert", str(src), str(work / "o"), "--to", "dcp", "-q"], src)
          for n in args.ranks],
        ("dcp->hf", [*vl, "convert", str(dcp), str(work / "o"), "--to", "hf", "--assets-dir", str(src), "-q"], dcp),
        ("dcp->hf (torch: dcp.load + HF writer)", [py, "-c", PEER_DCP_TO_HF, str(dcp), str(work / "o")], dcp),
        (f"hf->megatron {' '.join(par)}", [*vl, "convert", str(src), str(work / "o"), "--to", "megatron", *par,
                                           "-q"], src),
        ("megatron->hf", [*vl, "convert", str(mg), str(work / "o"), "--to", "hf", "--assets-dir", str(src), "-q"], mg),
        (f"reshard to {' '.join(back)}", [*vl, "convert", str(mg), str(work / "o"), "--to", "megatron", *back,
                                          "-q"], mg),
        ("hf->hf", [*vl, "convert", str(src), str(work / "o"), "--to", "hf", "-q"], src),
        ("hf->hf (transformers load + save)", [py, "-c", PEER_TRANSFORMERS, str(src), str(work / "o")], src),
    ]
    routes += [(f"fixed cost: {name} --dry-run", [*cmd, "--dry-run"], inp) for name, cmd, inp in routes
               if name in ("hf->dcp", f"hf->megatron {' '.join(par)}")]
    skip = set(filter(None, args.skip.split(",")))
    if total * 2.2 > _ram_bytes():
        skip.add("hf->hf (transformers load + save)")
    only = set(filter(None, args.only.split(",")))
    routes = [r for r in routes if r[0] not in skip and (not only or r[0] in only)]
    routes.sort(key=lambda r: (r[2] == dcp, r[2] == mg))  # one intermediate on disk at a time: HF inputs first
    results = []
    for name, cmd, inp in routes:
        # the inputs of later routes, made when first needed (not timed); only one is kept, so that the
        # source, one intermediate, one copy and one output fit the disk (8B: 4 x 17.5 GB)
        if inp == dcp and not (dcp / ".metadata").is_file():
            shutil.rmtree(mg, ignore_errors=True)
            subprocess.run([*vl, "convert", str(src), str(dcp), "--to", "dcp", "-q", "--overwrite"], check=True)
        if inp == mg and not (mg / "latest_checkpointed_iteration.txt").is_file():
            shutil.rmtree(dcp, ignore_errors=True)
            subprocess.run([*vl, "convert", str(src), str(mg), "--to", "megatron", *par, "-q", "--overwrite"],
                           check=True)
        pairs = []
        for _ in range(args.runs):
            cp_s, _ = timed(["cp", "-r", "--reflink=never", str(inp), str(work / "cp")], work / "cp")
            shutil.rmtree(work / "cp")  # the disk holds the source, the route inputs and one output
            s, rss = timed(cmd, work / "o")
            pairs.append((s, cp_s, rss))
        moved = folder_bytes(inp)
        row = {"route": name, "bytes": moved, "seconds": [p[0] for p in pairs], "cp_seconds": [p[1] for p in pairs],
               "ratios": [p[0] / p[1] for p in pairs], "peak_rss_mib": max(p[2] for p in pairs)}
        results.append(row)
        print(_line(row), flush=True)
        shutil.rmtree(work / "o", ignore_errors=True)
    print(json.dumps({"model": args.model, "bytes": total, "largest_tensor": info["largest"], "runs": args.runs,
                      "results": results}, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _line(row: dict) -> str:
    med = statistics.median
    s, c, r = row["seconds"], row["cp_seconds"], row["ratios"]
    return (f"{row['route']:42s} {med(s):7.2f} s [{min(s):.2f}-{max(s):.2f}]  cp {med(c):6.2f} s  "
            f"x cp {med(r):5.2f} [{min(r):.2f}-{max(r):.2f}]  {row['bytes'] / med(s) / 1e9:5.2f} GB/s  "
            f"peak RSS {row['peak_rss_mib']:6.0f} MiB")


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


if __name__ == "__main__":
    main()
