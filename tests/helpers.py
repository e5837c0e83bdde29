"""Helpers shared by tests: read whole (small) HF folders, hash folders, run the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors import safe_open

from vlconvert.cli import main


def load_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) safetensors folder."""
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (for bit-exact comparisons)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (to prove an input was not modified)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def run_cli(*args: str, expect: int = 0):
    """Invoke ``vlconvert`` in-process; assert the exit code; return the result."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, (result.exit_code, result.output)
    return result


def run_cli_json(*args: str) -> dict:
    """Invoke ``vlconvert ... --json`` and parse its summary."""
    return json.loads(run_cli(*args, "--json").stdout)
