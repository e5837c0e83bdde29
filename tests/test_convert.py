"""``vlconvert convert``: every layout into every layout, byte for byte equal to the route through HF.

Each fixture is converted to a DCP and to Megatron rank files; each of the three is then converted to
each target directly and through a Hugging Face folder, and the two outputs must be the same bytes
(manifest included). The older spellings and the Python API must give the same bytes as ``convert``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import folder_digest, load_hf_tensors, run_cli, tensor_bytes

from vlconvert import Converter
from vlconvert.engine import ConversionPlan

FIX = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = ["tiny-dense-tied", "tiny-dense-untied", "tiny-moe", "tiny-moe-tf5"]


def megatron_sizes(fixture: str) -> list[str]:
    if "moe" in fixture:
        return ["--tp", "2", "--ep", "2"]
    if "untied" in fixture:  # 3 layers: an uneven pipeline
        return ["--tp", "2", "--pp", "2", "--pp-first-layers", "1", "--pp-last-layers", "2"]
    return ["--tp", "2"]


def target_args(target: str, fixture: str) -> list[str]:
    return {"hf": [], "dcp": [], "megatron": megatron_sizes(fixture)}[target]


@pytest.fixture(scope="module", params=FIXTURES)
def sources(request, tmp_path_factory) -> tuple[str, dict[str, Path]]:
    """A fixture in all three layouts."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    run_cli("convert", FIX / name, root / "dcp", "--to", "dcp", "-q")
    run_cli("convert", FIX / name, root / "megatron", "--to", "megatron", *megatron_sizes(name), "-q")
    return name, {"hf": FIX / name, "dcp": root / "dcp", "megatron": root / "megatron"}


@pytest.mark.parametrize("source_layout", ["dcp", "megatron"])
@pytest.mark.parametrize("target", ["dcp", "megatron"])
def test_direct_equals_the_route_through_hf(sources, tmp_path, source_layout, target):
    fixture, paths = sources
    assets = ["--assets-dir", str(FIX / fixture)]
    src = paths[source_layout]
    run_cli("convert", src, tmp_path / "direct", "--to", target, *target_args(target, fixture), *assets, "-q")
    run_cli("convert", src, tmp_path / "hf", "--to", "hf", *assets, "-q")
    run_cli("convert", tmp_path / "hf", tmp_path / "via-hf", "--to", target, *target_args(target, fixture), "-q")
    assert folder_digest(tmp_path / "direct") == folder_digest(tmp_path / "via-hf")


@pytest.mark.parametrize("source_layout", ["hf", "dcp", "megatron"])
def test_every_layout_back_to_hf_is_bit_exact(sources, tmp_path, source_layout):
    fixture, paths = sources
    run_cli("convert", paths[source_layout], tmp_path / "out", "--to", "hf", "--assets-dir", FIX / fixture, "-q")
    want, got = load_hf_tensors(FIX / fixture), load_hf_tensors(tmp_path / "out")
    if "tf5" in fixture:  # the fixture stores experts as transformers 5 does; HF output is released
        want = {k: (v.transpose(1, 2) if k.endswith(("gate_up_proj", "down_proj")) else v) for k, v in want.items()}
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and tensor_bytes(got[k]) == tensor_bytes(want[k]), k
    for asset in ("tokenizer.json", "config.json", "chat_template.json"):
        assert (tmp_path / "out" / asset).read_bytes() == (FIX / fixture / asset).read_bytes()
    run_cli("verify", FIX / fixture, tmp_path / "out", "-q")


@pytest.mark.parametrize("older,newer", [
    (["hf-to-dcp", "{hf}"], ["convert", "{hf}", "--to", "dcp"]),
    (["dcp-to-hf", "{dcp}", "--assets-dir", "{hf}"], ["convert", "{dcp}", "--to", "hf", "--assets-dir", "{hf}"]),
    (["hf-to-megatron", "{hf}", "{mp}"], ["convert", "{hf}", "--to", "megatron", "{mp}"]),
    (["megatron-to-hf", "{mg}", "--assets-dir", "{hf}"], ["convert", "{mg}", "--to", "hf", "--assets-dir", "{hf}"]),
    (["reshard", "{mg}", "--tp", "1"], ["convert", "{mg}", "--to", "megatron", "--tp", "1"]),
])
def test_older_spellings_are_convert(sources, tmp_path, older, newer):
    fixture, paths = sources
    values = {"hf": str(paths["hf"]), "dcp": str(paths["dcp"]), "mg": str(paths["megatron"])}

    def argv(template: list[str], out: Path) -> list[str]:
        args: list[str] = []
        for a in template:
            args += megatron_sizes(fixture) if a == "{mp}" else [a.format(**values)]
        return [args[0], args[1], str(out), *args[2:]]

    run_cli(*argv(older, tmp_path / "older"), "-q")
    run_cli(*argv(newer, tmp_path / "newer"), "-q")
    assert folder_digest(tmp_path / "older") == folder_digest(tmp_path / "newer")


def test_older_spellings_refuse_other_layouts(tmp_path):
    result = run_cli("dcp-to-hf", FIX / "tiny-moe", tmp_path / "o", "--assets-dir", FIX / "tiny-moe", expect=1)
    assert "not a DCP" in result.output


def test_python_api_mirrors_the_cli(sources, tmp_path):
    fixture, paths = sources
    sizes = dict(ep=2) if "moe" in fixture else dict(pp=2, pp_first_layers=1, pp_last_layers=2) \
        if "untied" in fixture else {}
    conv = Converter(paths["dcp"], tmp_path / "api", to="megatron", tp=2, assets_dir=FIX / fixture, **sizes)
    plan = conv.plan()
    assert isinstance(plan, ConversionPlan) and plan.source_layout == "dcp" and plan.target == "megatron"
    data = plan.to_dict()
    assert data["megatron"]["tp"] == 2 and len(data["files"]) == len(plan.megatron.ranks)
    assert sum(f["bytes"] for f in data["files"]) == plan.tensor_bytes
    assert not (tmp_path / "api").exists()  # planning writes nothing
    seen = []

    def progress(description, total):
        from contextlib import contextmanager

        @contextmanager
        def bar():
            yield seen.append
        seen.append(("total", total))
        return bar()

    result = conv.run(progress=progress)
    assert seen[0] == ("total", plan.tensor_bytes) and sum(n for n in seen[1:]) == plan.tensor_bytes
    run_cli("convert", paths["dcp"], tmp_path / "cli", "--to", "megatron", *megatron_sizes(fixture),
            "--assets-dir", FIX / fixture, "-q")
    assert folder_digest(result.output) == folder_digest(tmp_path / "cli")


def test_dry_run_writes_nothing(tmp_path):
    result = run_cli("convert", FIX / "tiny-moe", tmp_path / "out", "--to", "megatron", "--tp", "2", "--ep", "4",
                     "--dry-run", "--json")
    import json

    data = json.loads(result.stdout)
    assert data["dry_run"] and data["files"] == len(data["file_list"]) == 8 and data["megatron"]["ep"] == 4
    assert list(tmp_path.iterdir()) == []


def test_python_dash_m_runs_convert():
    out = subprocess.run([sys.executable, "-m", "vlconvert", "convert", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--to" in out.stdout and "megatron" in out.stdout


def test_negative_iteration_is_refused_before_writing(tmp_path):
    result = run_cli("convert", FIX / "tiny-moe", tmp_path / "out", "--to", "megatron", "--iteration", "-3", expect=2)
    assert "--iteration -3 is negative" in result.output and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["hf", "dcp", "megatron", "torch_dist"])
def test_block_size_never_changes_the_bytes(tmp_path, monkeypatch, target):
    """Every target streams row blocks and experts; 1 KiB blocks (many per tensor) give the same bytes."""
    from vlconvert import engine

    sizes = {"megatron": {"tp": 2, "ep": 2}, "torch_dist": {}}.get(target, {})
    Converter(FIX / "tiny-moe", tmp_path / "default", to=target, **sizes).run()
    monkeypatch.setattr(engine, "ROW_BLOCK", 1024)
    small = Converter(FIX / "tiny-moe", tmp_path / "small", to=target, **sizes)
    small.run()
    assert small.block_bytes == 1024
    assert folder_digest(tmp_path / "small") == folder_digest(tmp_path / "default")


def test_max_memory_shrinks_blocks_and_keeps_the_bytes(tmp_path):
    from vlconvert.engine import resident_bytes
    from vlconvert.plan import IN_FLIGHT

    Converter(FIX / "tiny-dense-untied", tmp_path / "default", to="megatron", tp=2).run()
    conv = Converter(FIX / "tiny-dense-untied", tmp_path / "tight", to="megatron", tp=2)
    conv.plan()
    # room for 256 KiB blocks (x tp 2 for row-parallel reads), not for 1 MiB ones
    conv.max_memory = resident_bytes() + IN_FLIGHT * 2 * 2**18 + 3 * 2**20
    conv.run()
    assert conv.block_bytes == 2**18
    assert folder_digest(tmp_path / "tight") == folder_digest(tmp_path / "default")
    # the buffers waiting for the hashing threads are part of the plan: 4 pieces of 2 x 256 KiB here
    from vlconvert import hashing
    from vlconvert.plan import HASH_PIECES

    assert conv.hash_queue_bytes == hashing.QUEUED_BYTES == HASH_PIECES * 2 * 2**18


def test_max_memory_too_small_or_not_a_size_is_one_line(tmp_path):
    from click.testing import CliRunner

    from vlconvert.cli import main

    for budget, words, code in (("50MB", ("--max-memory", "too small", "start-up"), 1), ("lots", ("not a size",), 2),
                                ("0", ("not a positive size",), 2)):
        result = CliRunner().invoke(main, ["convert", str(FIX / "tiny-moe"), str(tmp_path / "out"), "--to", "dcp",
                                           "--max-memory", budget])
        lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
        assert result.exit_code == code and len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert all(w in lines[0] for w in words), lines[0]
        assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
