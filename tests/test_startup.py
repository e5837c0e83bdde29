"""Start-up path: ``python -m vlconvert`` works, and the metadata commands never import transformers.

No timing assertions here: ``bench/bench_startup.py`` measures the time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlconvert.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI in-process in a fresh interpreter, then reports the exit code and the transformers modules loaded.
_PROBE = """
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
"""


def test_python_m_vlconvert_help() -> None:
    result = subprocess.run([sys.executable, "-m", "vlconvert", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: vlconvert ")
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("launcher", ["python -m", "torchrun -m"])
def test_python_m_from_the_folder_holding_a_clone_named_vlconvert(launcher: str, tmp_path: Path) -> None:
    """Issue 22 item 2: the clone's root (no __init__.py) on sys.path[0] would make ``vlconvert`` a namespace
    package ("cannot import name '__version__' from 'vlconvert' (unknown location)")."""
    (tmp_path / "vlconvert").symlink_to(ROOT, target_is_directory=True)
    args = ["inspect", "vlconvert/fixtures/tiny-moe", "--json"]
    head = [sys.executable, "-m"] if launcher == "python -m" else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m"]
    result = subprocess.run([*head, "vlconvert", *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    assert "ImportError" not in result.stderr
    assert '"layout"' in result.stdout


@pytest.mark.parametrize("args", [
    ["inspect", "fixtures/tiny-moe"],
    ["plan", "--config", "fixtures/configs/Qwen3-VL-235B-A22B-Instruct.json", "--to", "megatron",
     "--tp", "4", "--pp", "2", "--ep", "16"],
    ["verify", "fixtures/tiny-moe", "fixtures/tiny-moe"],
], ids=["inspect", "plan", "verify"])
def test_metadata_commands_do_not_import_transformers(args: list[str]) -> None:
    lines = _probe(args)
    assert lines["TRANSFORMERS"] == ""


def _probe(args: list[str]) -> dict[str, str]:
    result = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "")
                 for line in result.stdout.splitlines() if line.startswith(("EXIT:", "TRANSFORMERS:", "DCP:")))
    assert lines["EXIT"] == "0", result.stdout + result.stderr
    return lines


@pytest.mark.parametrize("to", [["megatron", "--tp", "2"], ["hf"], ["dcp"]])
def test_only_dcp_routes_import_torch_distributed_checkpoint(tmp_path, to: list[str]) -> None:
    """``torch.distributed.checkpoint`` costs most of a second to import: routes without a DCP skip it."""
    lines = _probe(["convert", "fixtures/tiny-dense-tied", str(tmp_path / "out"), "--to", *to, "-q"])
    assert (lines["DCP"] != "") == (to[0] == "dcp"), lines["DCP"][:200]
