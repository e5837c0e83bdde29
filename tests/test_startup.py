"""Start-up path: ``python -m vlconvert`` works, the metadata commands never import transformers, and no route
imports ``torch.distributed.checkpoint`` (DCP ``.metadata`` goes through ``vlconvert.layouts.dcp_pickle``).

No timing assertions here: ``bench/bench_startup.py`` measures the time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CLI_PROBE

from vlconvert.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]



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


def test_verify_manifest_does_not_import_torch(tmp_path) -> None:
    """Checking a folder against its manifest reads files and hashes them: no torch (3.5-4 s of start-up with
    the CUDA build of torch), and a tampered file is still found."""
    subprocess.run([sys.executable, "-m", "vlconvert", "convert", "fixtures/tiny-moe", str(tmp_path / "out"), "--to",
                    "dcp", "-q"], cwd=ROOT, capture_output=True, check=True, timeout=300)
    assert _probe(["verify", "--manifest", str(tmp_path / "out")])["TORCH"] == "False"
    shard = next((tmp_path / "out").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    result = subprocess.run([sys.executable, "-c", CLI_PROBE, "verify", "--manifest", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert "EXIT: 1" in result.stdout and "TORCH: False" in result.stdout, result.stdout + result.stderr
    assert shard.name in result.stdout, result.stdout


def _probe(args: list[str]) -> dict[str, str]:
    result = subprocess.run([sys.executable, "-c", CLI_PROBE, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "")
                 for line in result.stdout.splitlines()
                 if line.startswith(("EXIT:", "TRANSFORMERS:", "DCP:", "TORCH:")))
    assert lines["EXIT"] == "0", result.stdout + result.stderr
    return lines


@pytest.fixture(scope="module")
def dcp_sources(tmp_path_factory) -> dict[str, Path]:
    """A DCP, a torch_dist and a Megatron checkpoint of tiny-dense-tied, to convert from."""
    from helpers import run_cli

    base = tmp_path_factory.mktemp("startup-sources")
    for to in ("dcp", "torch_dist"):
        run_cli("convert", ROOT / "fixtures" / "tiny-dense-tied", base / to, "--to", to, "-q")
    run_cli("convert", ROOT / "fixtures" / "tiny-dense-tied", base / "megatron", "--to", "megatron", "--tp", "2", "-q")
    return {"dcp": base / "dcp", "torch_dist": base / "torch_dist", "megatron": base / "megatron"}


TIED = str(ROOT / "fixtures" / "tiny-dense-tied")
ROUTES = {  # {dcp} / {torch_dist}: the sources above; {out}: a new folder
    "hf-to-dcp": ["convert", TIED, "{out}", "--to", "dcp"],
    "hf-to-dcp-dry-run": ["convert", TIED, "{out}", "--to", "dcp", "--dry-run"],
    "hf-to-torch_dist": ["convert", TIED, "{out}", "--to", "torch_dist"],
    "hf-to-megatron": ["convert", TIED, "{out}", "--to", "megatron", "--tp", "2"],
    "hf-to-hf": ["convert", TIED, "{out}", "--to", "hf"],
    "dcp-to-hf": ["convert", "{dcp}", "{out}", "--to", "hf", "--assets-dir", TIED],
    "dcp-to-hf-dry-run": ["convert", "{dcp}", "{out}", "--to", "hf", "--assets-dir", TIED, "--dry-run"],
    "dcp-to-megatron": ["convert", "{dcp}", "{out}", "--to", "megatron", "--assets-dir", TIED],
    "torch_dist-to-hf": ["convert", "{torch_dist}", "{out}", "--to", "hf", "--assets-dir", TIED],
    "inspect-dcp": ["inspect", "{dcp}"],
}


def _route(name: str, sources: dict[str, Path], out: Path) -> list[str]:
    return [a.format(out=out, **sources) for a in ROUTES[name]]


@pytest.mark.parametrize("route", list(ROUTES))
def test_no_route_imports_torch_distributed_checkpoint(tmp_path, dcp_sources, route: str) -> None:
    """``torch.distributed.checkpoint`` costs 1 s of start-up here, 3-4 s with the CUDA build of torch: DCP
    ``.metadata`` is written and read through vlconvert's stand-ins for its classes (same bytes)."""
    lines = _probe([*_route(route, dcp_sources, tmp_path / "out"), "-q"])
    assert lines["DCP"] == "", lines["DCP"][:200]
    if "dry-run" not in route and route != "inspect-dcp":
        assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize("route", ["hf-to-dcp", "dcp-to-hf"])
def test_python_m_vlconvert_import_log_has_no_torch_distributed_checkpoint(tmp_path, dcp_sources,
                                                                         route: str) -> None:
    """The real entry point, ``python -X importtime -m vlconvert convert ...``: the import log names every
    module the run imported: never ``torch.distributed.checkpoint``, and for these routes of a dense model, which
    copy every tensor's bytes, not torch either."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "vlconvert", *_route(route, dcp_sources, out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:") and line.count("|") == 2}
    assert "vlconvert.layouts.dcp" in imported and "vlconvert.engine" in imported
    assert "torch" not in imported
    assert not {m for m in imported if m.startswith("torch.distributed.checkpoint")}
    assert (out / ".metadata").is_file() if route == "hf-to-dcp" else (out / "config.json").is_file()


PLAN_ONLY = {  # commands that read headers and configs only: each must run without importing torch
    **{name: ROUTES[name] for name in ("hf-to-dcp-dry-run", "dcp-to-hf-dry-run", "inspect-dcp")},
    "hf-to-megatron-dry-run": [*ROUTES["hf-to-megatron"], "--dry-run"],
    "hf-to-hf-dry-run": [*ROUTES["hf-to-hf"], "--dry-run"],
    "hf-to-torch_dist-dry-run": [*ROUTES["hf-to-torch_dist"], "--dry-run"],
    "megatron-to-hf-dry-run": ["convert", "{megatron}", "{out}", "--to", "hf", "--assets-dir", TIED, "--dry-run"],
    "torch_dist-to-hf-dry-run": [*ROUTES["torch_dist-to-hf"], "--dry-run"],
    "dcp-to-megatron-dry-run": [*ROUTES["dcp-to-megatron"], "--dry-run"],
    "inspect-hf": ["inspect", TIED],
    "verify-hf-dcp": ["verify", TIED, "{dcp}"],  # every tensor stored verbatim on both sides: compared as bytes
    "inspect-megatron": ["inspect", "{megatron}"],
    "plan-235B-megatron": ["plan", "--config", str(ROOT / "fixtures/configs/Qwen3-VL-235B-A22B-Instruct.json"),
                           "--to", "megatron", "--tp", "4", "--pp", "2", "--ep", "16"],
    "plan-8B-torch_dist": ["plan", "--config", str(ROOT / "fixtures/configs/Qwen3-VL-8B-Instruct.json"),
                           "--to", "torch_dist", "--tp", "2"],
}


@pytest.mark.parametrize("name", list(PLAN_ONLY))
def test_plans_and_metadata_do_not_import_torch(tmp_path, dcp_sources, name: str) -> None:
    """``import torch`` is 1.5 s here and 3.5-4 s with the CUDA build: a plan is made of headers and configs
    (dtypes are :class:`vlconvert.dtypes.DType`), so ``--dry-run``, ``plan`` and ``inspect`` never import it;
    and what they print is what they print once torch is imported (same plan either way)."""
    argv = [a.format(out=tmp_path / "out", **dcp_sources) for a in PLAN_ONLY[name]]
    json_flag = ["--json"]
    result = subprocess.run([sys.executable, "-c", CLI_PROBE, *argv, *json_flag], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, check=False)
    assert "EXIT: 0" in result.stdout and "TORCH: False" in result.stdout, result.stdout[-2000:] + result.stderr
    with_torch = subprocess.run([sys.executable, "-c", "import torch\n" + CLI_PROBE, *argv, *json_flag], cwd=ROOT,
                                capture_output=True, text=True, timeout=300, check=False)
    assert "TORCH: True" in with_torch.stdout
    assert _report(result.stdout) == _report(with_torch.stdout)
    assert not (tmp_path / "out").exists()


def _report(stdout: str) -> str:
    """The command's own output: the probe's lines removed."""
    return "\n".join(line for line in stdout.splitlines()
                     if not line.startswith(("EXIT:", "TRANSFORMERS:", "DCP:", "TORCH:")))


BYTE_ONLY = {  # routes that copy or cast bytes and compute nothing else: they need no torch at all
    "hf-to-dcp": ROUTES["hf-to-dcp"],
    "hf-to-dcp-moe-tf5": ["convert", str(ROOT / "fixtures" / "tiny-moe-tf5"), "{out}", "--to", "dcp"],
    "hf-to-hf-reshard": ["convert", TIED, "{out}", "--to", "hf", "--max-shard-size", "200KB"],
    "dcp-to-hf": ROUTES["dcp-to-hf"],
    "hf-to-dcp-workers": [*ROUTES["hf-to-dcp"], "--workers", "2"],
    # rows cut and put together as bytes (vlconvert.rowbytes); common.pt, extra states and train state written by
    # vlconvert's own torch.save writer (layouts.megatron.torch_save_bytes)
    "hf-to-megatron-tp2": ROUTES["hf-to-megatron"],
    "hf-to-torch_dist-megatron-lm": [*ROUTES["hf-to-torch_dist"], "--tp", "2", "--for", "megatron-lm"],
    "hf-to-torch_dist-bridge": [*ROUTES["hf-to-torch_dist"], "--for", "megatron-bridge"],
    "megatron-to-hf": ["convert", "{megatron}", "{out}", "--to", "hf", "--assets-dir", TIED],
    "hf-to-megatron-tp2-fp16": [*ROUTES["hf-to-megatron"], "--dtype", "fp16"],  # rowbytes.cast
    "dcp-to-hf-fp32": [*ROUTES["dcp-to-hf"], "--dtype", "fp32"],
}


@pytest.mark.parametrize("name", list(BYTE_ONLY))
def test_byte_only_routes_never_import_torch_and_write_the_same_bytes(tmp_path, dcp_sources, name: str) -> None:
    """Copied tensors, DCP records (their data.pkl) and ``.metadata`` are written with torch's names but
    without torch (:mod:`vlconvert.layouts.torch_names`): every file, manifest included, is the one a run
    with torch imported writes."""
    outs = {}
    for label, prelude in (("without", ""), ("with", "import torch\n")):
        out = tmp_path / label
        argv = [a.format(out=out, **dcp_sources) for a in BYTE_ONLY[name]]
        result = subprocess.run([sys.executable, "-c", prelude + CLI_PROBE, *argv, "-q"], cwd=ROOT,
                                capture_output=True, text=True, timeout=300, check=False)
        assert "EXIT: 0" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"TORCH: {label == 'with'}" in result.stdout
        outs[label] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert sorted(outs["without"]) == sorted(outs["with"]) and len(outs["with"]) > 3
    assert outs["without"] == outs["with"]


_NO_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):  # as in an environment without torch installed
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
"""


def test_without_torch_installed_plans_and_copies_work_and_tensor_work_is_one_line(tmp_path) -> None:
    """Plans, routes that move bytes (hf->megatron at tp 2 included) and casts between float dtypes need no torch at
    all; a command that computes (new embeddings as means of others) says in one line that it needs torch (exit 1,
    nothing published) instead of a traceback."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _NO_TORCH + CLI_PROBE, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, check=False)

    assert "EXIT: 0" in run("convert", TIED, str(tmp_path / "a"), "--to", "megatron", "--dry-run").stdout
    assert "EXIT: 0" in run("convert", TIED, str(tmp_path / "dcp"), "--to", "dcp", "-q").stdout
    assert (tmp_path / "dcp" / ".metadata").is_file()
    assert "EXIT: 0" in run("convert", TIED, str(tmp_path / "mg"), "--to", "megatron", "--tp", "2", "-q").stdout
    assert (tmp_path / "mg" / "latest_checkpointed_iteration.txt").is_file()  # columns and padding: bytes
    assert "EXIT: 0" in run("convert", TIED, str(tmp_path / "fp16"), "--to", "megatron", "--tp", "2", "--dtype", "fp16",
                            "-q").stdout  # a cast between bf16, fp16 and fp32: rowbytes.cast
    assert (tmp_path / "fp16" / "latest_checkpointed_iteration.txt").is_file()
    result = run("retag-think", TIED, "--out", str(tmp_path / "retag"), "--strategy", "special")  # embedding means
    lines = result.stderr.strip().splitlines()
    assert "EXIT: 1" in result.stdout and len(lines) == 1, result.stdout + result.stderr
    assert lines[0] == "error: this command works on tensors and needs torch, which is not installed: pip install torch"
    assert not (tmp_path / "retag").exists()
