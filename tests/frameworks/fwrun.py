"""What the framework tests share: vlconvert and a worker script, each in a child process of this Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
_PORT = [29600 + os.getpid() % 200 * 10]


def vlconvert(*args: object) -> str:
    """``python -m vlconvert ARGS`` with this checkout on the path; its stdout (asserts exit 0)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "vlconvert", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def worker(script: Path, *args: object, python: str | None = None) -> dict:
    """Run one job of a worker script (with this Python, or ``python``); its ``RESULT {...}`` line (asserts
    exit 0)."""
    _PORT[0] += 1
    env = {**os.environ, "PORT": str(_PORT[0]), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([python or sys.executable, str(script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-1500:], proc.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors files."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def same_as_fixture(folder: Path, fixture: str) -> None:
    """``folder`` holds exactly the fixture's tensors, bit for bit."""
    want, have = hf_tensors(FIX / fixture), hf_tensors(folder)
    assert set(have) == set(want), sorted(set(have) ^ set(want))[:5]
    bad = [k for k in want if not torch.equal(want[k], have[k])]
    assert not bad, bad[:5]
