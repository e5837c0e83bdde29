"""Where one conversion spends its time: per-thread CPU, the main thread's profile, and the primitives.

Runs one route in this process (``vlconvert.Converter``) under ``cProfile`` (main thread) while a
sampler reads every thread's CPU time from ``/proc/self/task/*/stat`` every 0.25 s; then prints the
wall time of the phases (import, plan, stream, publish), each thread's CPU seconds, the top functions of
the main thread, and the speed of the primitives on this machine (sha256, CRC-32, a parallel sha256 over
N threads, ``cp -r`` + ``sync`` of the same input)::

    python bench/profile_route.py SRC DST --to dcp [--tp 2] [--json OUT.json]

The input is not generated here: ``bench/bench_convert.py --make-source`` writes one.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


class Sampler(threading.Thread):
    """Keeps the last CPU time seen for every thread (threads that ended keep their final sample)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.seen.update(thread_cpu())
            self.names.update({t.native_id: t.name for t in threading.enumerate() if t.native_id})


def primitives(path: Path, threads: int) -> dict[str, float]:
    """GB/s of sha256 and CRC-32 on one core, and of sha256 over ``threads`` files' worth in parallel."""
    data = os.urandom(256 * 2**20)
    out = {}
    t = time.perf_counter()
    hashlib.sha256(data).digest()
    out["sha256_GBps_1core"] = len(data) / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    zlib.crc32(data)
    out["crc32_GBps_1core"] = len(data) / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: hashlib.sha256(data).digest(), range(threads)))
    out[f"sha256_GBps_{threads}threads"] = threads * len(data) / (time.perf_counter() - t) / 1e9
    return out


def timed_cp(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", "--reflink=never", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    took = time.perf_counter() - t
    shutil.rmtree(dst)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--to", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--assets-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--keep", action="store_true", help="keep DST (the input of a later route)")
    args = parser.parse_args()

    cp_seconds = timed_cp(args.src, args.dst.with_name(args.dst.name + ".cp"))
    shutil.rmtree(args.dst, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    sampler = Sampler()
    sampler.start()
    phases: dict[str, float] = {}
    start = t = time.perf_counter()  # the route's wall time starts here, after the copy it is paired with
    import torch  # noqa: F401 - timed on purpose

    phases["import torch"] = time.perf_counter() - t
    t = time.perf_counter()
    from vlconvert import Converter

    phases["import vlconvert"] = time.perf_counter() - t
    options = {"tp": args.tp, "ep": args.ep} if args.to in ("megatron", "torch_dist") else {}
    if args.assets_dir:
        options["assets_dir"] = args.assets_dir
    profile = cProfile.Profile()
    t = time.perf_counter()
    profile.enable()
    conv = Converter(args.src, args.dst, to=args.to, **options)
    conv.plan()
    phases["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    conv.run()
    phases["run (stream + publish)"] = time.perf_counter() - t
    profile.disable()
    t = time.perf_counter()
    subprocess.run(["sync"], check=True)
    phases["final sync"] = time.perf_counter() - t
    sampler.stop.set()
    sampler.join()
    sampler.seen.update(thread_cpu())
    wall = time.perf_counter() - start
    nbytes = sum(p.stat().st_size for p in args.src.rglob("*") if p.is_file())
    main_tid = threading.get_native_id()
    sampler.names[main_tid] = "main"
    names = {tid: sampler.names.get(tid, f"thread {tid}") for tid in sampler.seen}
    threads = sorted(((names[tid], s) for tid, s in sampler.seen.items()), key=lambda x: -x[1])
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
    report = {"route": f"{args.src.name} -> {args.to}", "bytes": nbytes, "wall_s": wall, "cp_s": cp_seconds,
              "x_cp": wall / cp_seconds, "phases_s": phases, "thread_cpu_s": threads[:12],
              "process_cpu_s": sum(s for _, s in threads), "cores": os.cpu_count(),
              "primitives": primitives(args.src, min(8, os.cpu_count() or 1))}
    print(json.dumps(report, indent=1))
    print(text.getvalue()[-6000:])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n" + text.getvalue())
    if not args.keep:
        shutil.rmtree(args.dst, ignore_errors=True)


if __name__ == "__main__":
    main()
