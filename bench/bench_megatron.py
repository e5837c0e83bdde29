"""Benchmark the Megatron converters on full-size-shaped data: peak RSS vs the largest tensor, and
throughput vs ``cp`` of the same bytes, measured in the same run.

Generates (on demand, streamed) a Hugging Face folder with the real shapes of a released model but
fewer layers (default: Qwen3-VL-30B-A3B with 2 decoder layers and 2 ViT blocks: 128 experts,
``gate_up_proj`` [128, 2048, 1536], vocab 151936), then times, each in a fresh process:

* ``cp -r`` of the HF folder (the I/O floor),
* hf -> megatron at TP1/EP1 and at TP2/PP2/EP4,
* megatron -> hf (from the TP2/PP2/EP4 output),
* reshard TP2/PP2/EP4 -> TP1/EP8.

Usage: ``python bench/bench_megatron.py [--model 30B-A3B] [--layers 2] [--work /tmp/vlbench] [--keep]``.
Not run in tests.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_source(dst: Path, model: str, layers: int, vision_depth: int) -> tuple[int, int]:
    """Write a random bf16 HF folder of the model's real shapes (streamed); return (bytes, largest tensor)."""
    import torch

    from fixtures.make_fixtures import write_tokenizer  # noqa: F401 - only to prove the fixtures import
    from vlconvert.layouts.hf import PlannedTensor, SafetensorsFileWriter, plan_shards, shard_file_names, write_index
    from vlconvert.models.qwen3vl import build_skeleton

    config = json.loads((ROOT / "fixtures/configs" / f"Qwen3-VL-{model}-Instruct.json").read_text())
    config["text_config"]["num_hidden_layers"] = layers
    config["vision_config"]["depth"] = vision_depth
    config["vision_config"]["deepstack_visual_indexes"] = list(range(min(vision_depth, 3)))
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    sk = build_skeleton(config)
    planned = [PlannedTensor(n, torch.bfloat16, sk.shape_in(n, "released")) for n in sk.hf_keys()]
    shards = plan_shards(planned, 2 * 10**9)
    names = shard_file_names(len(shards))
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    for fname, shard in zip(names, shards, strict=True):
        w = SafetensorsFileWriter(dst / fname, shard)
        for t in shard:
            weight_map[t.name] = fname
            rows = t.shape[0] if t.shape else 1
            step = max(1, (64 * 2**20) // max(1, t.nbytes // max(rows, 1)))
            for a in range(0, rows, step):
                b = min(rows, a + step)
                block = (torch.randn((b - a, *t.shape[1:]), generator=gen) * 0.02).to(torch.bfloat16)
                w.write(t.name, block, row_offset=a)
        w.close()
    if len(names) > 1:
        write_index(dst, weight_map, sum(t.nbytes for t in planned))
    return sum(t.nbytes for t in planned), max(t.nbytes for t in planned)


def _child(step: str, args: list[str]) -> None:
    """Run one conversion in this (fresh) process and print its peak RSS."""
    from vlconvert import megatron_convert as mc

    t0 = time.perf_counter()
    if step == "hf2mg":
        src, dst, tp, pp, ep = args
        res = mc.hf_to_megatron(src, dst, tp=int(tp), pp=int(pp), ep=int(ep))
    elif step == "mg2hf":
        src, dst, assets = args
        res = mc.megatron_to_hf(src, dst, assets_dir=assets)
    else:
        src, dst, tp, pp, ep = args
        res = mc.reshard(src, dst, tp=int(tp), pp=int(pp), ep=int(ep))
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": dt, "peak_rss": rss, "bytes": res.bytes, "files": res.files}))


def run_step(name: str, step: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", step, *args], check=True, capture_output=True,
                         text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["step"] = name
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="30B-A3B")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlbench"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--make-source", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1:])
        return
    if args.make_source:
        print(*make_source(args.make_source, args.model, args.layers, args.vision_depth))
        return
    shutil.rmtree(args.work, ignore_errors=True)
    src = args.work / "hf"
    t0 = time.perf_counter()
    # generated in its own process: a child inherits its parent's peak RSS across fork+exec on Linux,
    # so the parent stays small and each measured child reports only its own peak
    made = subprocess.run([sys.executable, __file__, "--make-source", str(src), "--model", args.model,
                           "--layers", str(args.layers), "--vision-depth", str(args.vision_depth)],
                          check=True, capture_output=True, text=True)
    total, largest = (int(x) for x in made.stdout.split()[-2:])
    print(f"generated {total / 1e9:.2f} GB ({args.model} shapes, {args.layers} layers) in "
          f"{time.perf_counter() - t0:.1f} s; largest tensor {largest / 2**20:.0f} MiB", flush=True)
    subprocess.run(["sync"], check=False)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", "--reflink=never", str(src), str(args.work / "cp")], check=True)
    subprocess.run(["sync"], check=False)
    cp_s = time.perf_counter() - t0
    rows = [{"step": "cp -r (HF folder)", "seconds": cp_s, "bytes": total, "peak_rss": 0, "files": 0}]
    print(f"cp: {cp_s:.2f} s, {total / cp_s / 1e9:.2f} GB/s", flush=True)
    steps = [("hf->megatron tp1 ep1", "hf2mg", str(src), str(args.work / "mg111"), "1", "1", "1"),
             ("hf->megatron tp2 pp2 ep4", "hf2mg", str(src), str(args.work / "mg224"), "2", "2", "4"),
             ("megatron(tp2 pp2 ep4)->hf", "mg2hf", str(args.work / "mg224"), str(args.work / "hf2"), str(src)),
             ("reshard tp2pp2ep4->tp1ep8", "reshard", str(args.work / "mg224"), str(args.work / "mg118"), "1", "1",
              "8")]
    for name, step, *rest in steps:
        row = run_step(name, step, *rest)
        rows.append(row)
        print(f"{name}: {row['seconds']:.2f} s, {row['bytes'] / row['seconds'] / 1e9:.2f} GB/s "
              f"(cp {total / cp_s / 1e9:.2f} GB/s), peak RSS {row['peak_rss'] / 2**20:.0f} MiB "
              f"= {row['peak_rss'] / largest:.2f} x largest tensor", flush=True)
    print(json.dumps({"model": args.model, "layers": args.layers, "bytes": total, "largest_tensor": largest,
                      "rows": rows}, indent=2))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    assert math.isfinite(cp_s)


if __name__ == "__main__":
    main()
