"""Helpers shared by tests: read whole (small) HF folders, hash folders, run the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors import safe_open

from vlconvert.cli import main

_ROOT = Path(__file__).resolve().parents[1]  # the checkout: relative fixture paths resolve from it

# Runs the CLI in-process in a fresh interpreter (`python -c CLI_PROBE ARGS`), then prints its exit code and the
# modules it loaded: transformers, torch.distributed.checkpoint, torch.
CLI_PROBE = """
import sys
from vlconvert.cli import main
code = 0
try:
    main(sys.argv[1:], prog_name="vlconvert", standalone_mode=False)
except SystemExit as exc:
    code = exc.code or 0
print("EXIT:", code)
print("TRANSFORMERS:", ",".join(sorted(m for m in sys.modules if m.split(".")[0] == "transformers")))
print("DCP:", ",".join(sorted(m for m in sys.modules if m.startswith("torch.distributed.checkpoint"))))
print("TORCH:", "torch" in sys.modules)
"""

# Put before CLI_PROBE, it switches every reader's byte path off, so rows are put together (and cast) by the torch
# operations the byte path replaces: a route run both ways must write the same files.
TORCH_PATH = """
from vlconvert.sources.base import Source
from vlconvert.sources.dcp import DCPSource
from vlconvert.sources.hf import HFSource
from vlconvert.sources.megatron import MegatronSource
from vlconvert.sources.torch_dist import TorchDistSource
from vlconvert.sources.verl import VerlSource
for cls in (Source, DCPSource, HFSource, MegatronSource, TorchDistSource, VerlSource):
    cls.row_bytes = lambda self, *args: None
    cls.expert_bytes = lambda self, *args: None
"""


def assert_byte_path_writes_the_torch_paths_files(argv: Callable[[Path], list[str]], tmp_path: Path) -> None:
    """Run the CLI twice in fresh interpreters, ``argv(out)`` plus ``-q``: with the byte path (torch must never be
    imported) and with :data:`TORCH_PATH` first. Both outputs must hold the same files with the same bytes."""
    outs = {}
    for label, prelude in (("bytes", ""), ("torch", TORCH_PATH)):
        out = tmp_path / label
        result = subprocess.run([sys.executable, "-c", prelude + CLI_PROBE, *argv(out), "-q"], cwd=_ROOT,
                                capture_output=True, text=True, timeout=300, check=False)
        assert "EXIT: 0" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
        if label == "bytes":
            assert "TORCH: False" in result.stdout
        outs[label] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert sorted(outs["bytes"]) == sorted(outs["torch"]) and len(outs["torch"]) > 3
    assert outs["bytes"] == outs["torch"]


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


def cpu_save_patches() -> None:
    """Make megatron-core's ``dist_checkpointing.save`` run on a CPU-only torch: no CUDA calls (synchronize,
    current_device, the RNG state), and its forked writer processes run in-process (they die silently here)."""
    import queue
    import types

    import torch.cuda as tc
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    class _Inline:
        def __init__(self, target, kwargs):
            self.target, self.kwargs = target, kwargs

        def start(self) -> None:
            self.target(**self.kwargs)

        def join(self, *_a) -> None:
            pass

    ctx = types.SimpleNamespace(Queue=queue.Queue, JoinableQueue=queue.Queue, Process=_Inline)
    tc.synchronize = lambda *a, **k: None
    tc.current_device = lambda: "cpu"
    tc.get_rng_state = lambda *a, **k: torch.zeros(16, dtype=torch.uint8)
    fa.mp = types.SimpleNamespace(get_context=lambda _m: ctx, Queue=queue.Queue, SimpleQueue=queue.Queue,
                                  JoinableQueue=queue.Queue)
    fa._results_queue = queue.Queue()


def init_gloo(rank: int = 0, world: int = 1, port: int = 29511, tp: int = 1, ep: int = 1) -> None:
    """A gloo process group and megatron-core's model-parallel groups on the CPU (no CUDA RNG streams)."""
    import os

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.add = lambda *a, **k: None
    tracker.get_states = lambda: {}
    torch.manual_seed(0)
