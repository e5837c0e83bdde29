"""Benchmark hf-to-dcp / dcp-to-hf against baselines measured in the same run.

Generates (on demand, not committed) a checkpoint with full-size Qwen3-VL-8B shapes for the
embedding, lm_head and N decoder layers, then measures wall time and peak RSS of:

* ``cp -r`` + ``sync`` of the same bytes (the disk's own speed),
* ``vlconvert hf-to-dcp`` vs the torch-only way (``safetensors.load_file`` of everything + ``dcp.save``),
* ``vlconvert dcp-to-hf`` vs ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``.

Each runs in its own process so peak RSS is its own. Usage: ``python bench/bench_dcp.py [--layers 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_source(folder: Path, layers: int) -> tuple[int, int]:
    """A Qwen3-VL-8B-shaped text model cut to ``layers`` layers (config says so), bf16, 4 shards."""
    import torch

    from fixtures.make_fixtures import released_configs, save_shards, write_tokenizer

    config = json.loads(json.dumps(released_configs()["Qwen3-VL-8B-Instruct"]))
    config["text_config"]["num_hidden_layers"] = layers
    config["vision_config"]["depth"] = 1
    config["vision_config"]["deepstack_visual_indexes"] = [0]
    from vlconvert.models.qwen3vl import build_skeleton

    skeleton = build_skeleton(config)
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name in skeleton.hf_keys():
        shape = skeleton.tensors[name].shape
        sd[name] = (torch.rand(shape, generator=gen, dtype=torch.float32) - 0.5).to(torch.bfloat16)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_shards(folder, sd, shards=4)
    write_tokenizer(folder, vocab="real", thinking=False)
    return sum(t.numel() * t.element_size() for t in sd.values()), max(t.numel() * 2 for t in sd.values())


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the running maximum
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed with {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024


TORCH_HF_TO_DCP = """
import sys, torch.distributed.checkpoint as dcp
from pathlib import Path
from safetensors.torch import load_file
sd = {}
for p in sorted(Path(sys.argv[1]).glob('*.safetensors')):
    sd.update(load_file(str(p)))
dcp.save(sd, checkpoint_id=sys.argv[2])
"""
TORCH_DCP_TO_PT = """
import sys
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
dcp_to_torch_save(sys.argv[1], sys.argv[2])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--make-source", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_source:
        print(*make_source(args.make_source, args.layers))
        return
    work = Path(tempfile.mkdtemp(prefix="vlconvert-bench-", dir=args.workdir))
    try:
        src = work / "hf"
        py = sys.executable
        # a separate process: a child inherits its parent's peak RSS across fork+exec on Linux
        made = subprocess.run([py, __file__, "--make-source", str(src), "--layers", str(args.layers)],
                              check=True, capture_output=True, text=True)
        total, largest = (int(x) for x in made.stdout.split())
        rows = []
        # cp + sync: vlconvert fsyncs what it writes, so the baseline flushes too
        cp_s, cp_rss = timed(["sh", "-c", f"cp -r --reflink=never '{src}' '{work / 'copy'}' && sync"])
        rows.append(("cp -r + sync (baseline)", cp_s, cp_rss))
        s, rss = timed([py, "-m", "vlconvert.cli", "hf-to-dcp", str(src), str(work / "dcp"), "-q"])
        rows.append(("vlconvert hf-to-dcp", s, rss))
        t_s, t_rss = timed([py, "-c", TORCH_HF_TO_DCP, str(src), str(work / "dcp-torch")])
        rows.append(("load_file + dcp.save (torch)", t_s, t_rss))
        b_s, b_rss = timed([py, "-m", "vlconvert.cli", "dcp-to-hf", str(work / "dcp"), str(work / "back"),
                            "--assets-dir", str(src), "-q"])
        rows.append(("vlconvert dcp-to-hf", b_s, b_rss))
        d_s, d_rss = timed([py, "-c", TORCH_DCP_TO_PT, str(work / "dcp"), str(work / "full.pt")])
        rows.append(("dcp_to_torch_save (torch)", d_s, d_rss))
        print(f"checkpoint: {total / 2**30:.2f} GiB in 4 shards, largest tensor {largest / 2**20:.0f} MiB")
        print(f"{'step':32s} {'seconds':>8s} {'GiB/s':>7s} {'peak RSS MiB':>13s} {'x cp time':>10s}")
        for name, sec, peak in rows:
            print(f"{name:32s} {sec:8.2f} {total / 2**30 / sec:7.2f} {peak:13.0f} {sec / cp_s:10.2f}")
        print(f"hf-to-dcp peak RSS / largest tensor: {rows[1][2] * 2**20 / largest:.2f}; "
              f"torch baseline: {t_rss * 2**20 / largest:.2f}")
        print(f"dcp-to-hf peak RSS / largest tensor: {b_rss * 2**20 / largest:.2f}; "
              f"dcp_to_torch_save: {d_rss * 2**20 / largest:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
