"""Start-up cost of ``vlconvert`` commands against the cost of ``import torch`` alone.

Each case runs ``--runs`` times (default 5), every time in a fresh subprocess, after one uncounted
warm-up run; the table shows the median wall time and the median CPU time (user + system, steadier
on a shared machine) in seconds, each with its ratio to the ``import torch`` baseline. The commands
run in the repository root (they use ``fixtures/``)::

    python bench/bench_startup.py [--runs 5] [--json] [--no-bytecode-cache]

Bytecode: by default the subprocesses cache compiled modules in a private temporary folder
(``PYTHONPYCACHEPREFIX``; the warm-up run fills it), as an installed package would, even when the
environment sets ``PYTHONDONTWRITEBYTECODE``; nothing is written into the source tree.
``--no-bytecode-cache`` keeps the environment as it is (then every run may recompile sources).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAN_CONFIG = "fixtures/configs/Qwen3-VL-235B-A22B-Instruct.json"


def vlconvert_command() -> list[str]:
    """The installed ``vlconvert`` console script next to this interpreter (no pyenv shim in between), else this
    interpreter's ``-m vlconvert`` (another environment's script on PATH would time another torch)."""
    script = Path(sys.executable).parent / "vlconvert"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vlconvert"]


def cases(manifest_folder: Path) -> list[tuple[str, list[str]]]:
    """(label, argv) of every case, the torch-import baseline first; ``manifest_folder``: a conversion output."""
    vlc = vlconvert_command()
    return [
        ("python -c 'import torch'", [sys.executable, "-c", "import torch"]),
        ("vlconvert --help", [*vlc, "--help"]),
        ("vlconvert inspect tiny-moe", [*vlc, "inspect", "fixtures/tiny-moe"]),
        ("vlconvert plan 235B megatron", [*vlc, "plan", "--config", PLAN_CONFIG, "--to", "megatron",
                                          "--tp", "4", "--pp", "2", "--ep", "16"]),
        ("vlconvert verify tiny-moe x2", [*vlc, "verify", "fixtures/tiny-moe", "fixtures/tiny-moe"]),
        ("vlconvert verify --manifest", [*vlc, "verify", "--manifest", str(manifest_folder)]),
        ("vlconvert verify hf dcp (dense)", [*vlc, "verify", "fixtures/tiny-dense-tied",
                                             str(manifest_folder.parent / "dense")]),
        ("convert hf->megatron --dry-run", [*vlc, "convert", "fixtures/tiny-moe", str(manifest_folder.parent / "no"),
                                            "--to", "megatron", "--tp", "2", "--dry-run"]),
        ("convert dcp->hf --dry-run", [*vlc, "convert", str(manifest_folder), str(manifest_folder.parent / "no"),
                                       "--to", "hf", "--assets-dir", "fixtures/tiny-moe", "--dry-run"]),
        ("vlconvert inspect dcp", [*vlc, "inspect", str(manifest_folder)]),
        ("convert hf->dcp tiny dense (copies)", [*vlc, "convert", "fixtures/tiny-dense-tied",
                                                 str(manifest_folder.parent / "w1"), "--to", "dcp", "--overwrite"]),
        ("convert hf->megatron tp2 tiny dense", [*vlc, "convert", "fixtures/tiny-dense-tied",
                                                 str(manifest_folder.parent / "w2"), "--to", "megatron", "--tp", "2",
                                                 "--overwrite"]),
        ("convert hf->megatron tp2 ep2 tiny MoE", [*vlc, "convert", "fixtures/tiny-moe",
                                                   str(manifest_folder.parent / "w3"), "--to", "megatron", "--tp", "2",
                                                   "--ep", "2", "--overwrite"]),
        ("convert megatron tp2->hf tiny dense", [*vlc, "convert", str(manifest_folder.parent / "mg"),
                                                 str(manifest_folder.parent / "w4"), "--to", "hf", "--assets-dir",
                                                 "fixtures/tiny-dense-tied", "--overwrite"]),
        ("convert hf->torch_dist tiny MoE (bridge)", [*vlc, "convert", "fixtures/tiny-moe",
                                                      str(manifest_folder.parent / "w6"), "--to", "torch_dist",
                                                      "--tp", "2", "--ep", "2", "--overwrite"]),
        ("convert hf->megatron --dtype fp16 (cast)", [*vlc, "convert", "fixtures/tiny-dense-tied",
                                                       str(manifest_folder.parent / "w5"), "--to", "megatron",
                                                       "--tp", "2", "--dtype", "fp16", "--overwrite"]),
        ("vlconvert doctor", [*vlc, "doctor"]),
    ]


def time_once(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and exit code of one fresh run (output discarded).

    CPU time is much less disturbed than wall time by other work on a shared machine.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def run_cases(runs: int, env: dict[str, str]) -> list[dict]:
    """Every case, with a small conversion output made first for ``verify --manifest``."""
    with tempfile.TemporaryDirectory(prefix="vlconvert-bench-out-") as out:
        folder = Path(out) / "dcp"
        subprocess.run([*vlconvert_command(), "convert", "fixtures/tiny-moe", str(folder), "--to", "dcp", "-q"],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*vlconvert_command(), "convert", "fixtures/tiny-dense-tied", str(Path(out) / "dense"),
                        "--to", "dcp", "-q"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*vlconvert_command(), "convert", "fixtures/tiny-dense-tied", str(Path(out) / "mg"),
                        "--to", "megatron", "--tp", "2", "-q"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        return _run_cases(cases(folder), runs, env)


def _run_cases(all_cases: list[tuple[str, list[str]]], runs: int, env: dict[str, str]) -> list[dict]:
    """Median wall and CPU seconds of ``runs`` timed runs per case, after one warm-up run each."""
    results: list[dict] = []
    for label, argv in all_cases:
        time_once(argv, env)  # warm-up: page cache and bytecode; not counted
        timed = [time_once(argv, env) for _ in range(runs)]
        results.append({"case": label, "median_s": statistics.median(t[0] for t in timed),
                        "min_s": min(t[0] for t in timed), "cpu_s": statistics.median(t[1] for t in timed),
                        "exit_codes": sorted({t[2] for t in timed})})
    return results


def main() -> None:
    """Time every case and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh subprocesses per case (median taken)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="keep the environment's bytecode settings instead of a private cache folder")
    args = parser.parse_args()

    if args.no_bytecode_cache:
        results = run_cases(args.runs, dict(os.environ))
    else:
        with tempfile.TemporaryDirectory(prefix="vlconvert-bench-pyc-") as cache:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            results = run_cases(args.runs, {**env, "PYTHONPYCACHEPREFIX": cache})
    base, base_cpu = results[0]["median_s"], results[0]["cpu_s"]
    width = max(len(r["case"]) for r in results)
    print(f"{'case':<{width}}  {'wall s':>6}  {'min s':>6}  {'x torch':>7}  {'cpu s':>6}  {'x torch':>7}  exit")
    for r in results:
        print(f"{r['case']:<{width}}  {r['median_s']:6.2f}  {r['min_s']:6.2f}  {r['median_s'] / base:7.2f}  "
              f"{r['cpu_s']:6.2f}  {r['cpu_s'] / base_cpu:7.2f}  {','.join(map(str, r['exit_codes']))}")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
