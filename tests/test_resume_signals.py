"""--resume keeps only what would be written the same way now; Ctrl-C and SIGTERM keep finished work and
tell the truth about what was published; sync errors name the file; hostile adapter configs and config
sizes end in one line (issue 20, items 6-9, 11, 13, 14).

Runs are real: the CLI in-process (``run_cli``) or as a child process that signals itself after a byte
count (as ``test_reliability._killed_run`` does with SIGKILL), adapters made with peft.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import folder_digest, run_cli
from safetensors.torch import load_file, save_file

from vlconvert import publish
from vlconvert.cli import main

FIX = Path(__file__).resolve().parents[1] / "fixtures"

_SIGNALLER = """
import os, signal, sys
from vlconvert import publish
from vlconvert.cli import main
limit, sig, written = int(sys.argv[1]), getattr(signal, sys.argv[2]), [0]
def counting(real):
    def write(self, *args, **kwargs):
        if written[0] == 0:
            sys.stderr.write("WORK-STARTED\\n"); sys.stderr.flush()
        n = real(self, *args, **kwargs)
        written[0] += n
        if limit >= 0 and written[0] >= limit:
            written[0] = -10**18
            os.kill(os.getpid(), sig)
        return n
    return write
publish.OutputFile.write = counting(publish.OutputFile.write)
publish.OutputFile.write_later = counting(publish.OutputFile.write_later)
publish.OutputFile.copy_range = counting(publish.OutputFile.copy_range)
if limit == -2:  # the signal arrives just after the publishing rename
    real = publish._rename_noreplace
    def rename(src, dst):
        real(src, dst)
        os.kill(os.getpid(), sig)
    publish._rename_noreplace = rename
main(sys.argv[3:], prog_name="vlconvert")
"""


def _signalled_run(argv: list, after_bytes: int, sig: str = "SIGKILL") -> subprocess.CompletedProcess:
    """The CLI in a child process that sends itself ``sig`` once ``after_bytes`` are written (-1: never,
    -2: just after the publishing rename)."""
    return subprocess.run([sys.executable, "-c", _SIGNALLER, str(after_bytes), sig, *map(str, argv)],
                          capture_output=True, text=True, timeout=300)


def one_error_line(*args, expect: int = 1) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, (result.exit_code, result.output)
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "internal error" not in lines[0] and "Traceback" not in result.output, lines[0]
    return lines[0]


def _total(folder: Path) -> int:
    return sum(e["size"] for e in publish.read_manifest(folder).values())


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("signals")
    shutil.copytree(FIX / "tiny-moe", root / "hf")
    return root / "hf"


def _journal(dst: Path) -> list[dict]:
    return [json.loads(line) for line in publish.journal_path(dst).read_text().splitlines()]


# ------------------------------------------------------------------------ 6: the inputs' identity
def _rewrite_values(shard: Path) -> None:
    """Same names, shapes and size; other values; a new mtime."""
    tensors = load_file(str(shard))
    save_file({k: (v + 1 if v.is_floating_point() else v) for k, v in tensors.items()}, str(shard),
              metadata={"format": "pt"})
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_resume_after_a_source_shard_changed_does_not_mix_old_and_new(hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf, src)
    run_cli("hf-to-dcp", src, tmp_path / "clean", "-q")
    dst = tmp_path / "out"
    proc = _signalled_run(["hf-to-dcp", src, dst, "-q"], _total(tmp_path / "clean") // 2)
    assert proc.returncode == -signal.SIGKILL
    kept = [line["file"] for line in _journal(dst)[1:]]
    assert "__0_0.distcp" in kept  # made from the first shard, which now changes
    size = (src / "model-00001-of-00003.safetensors").stat().st_size
    _rewrite_values(src / "model-00001-of-00003.safetensors")
    assert (src / "model-00001-of-00003.safetensors").stat().st_size == size
    run_cli("hf-to-dcp", src, tmp_path / "new", "-q")
    result = CliRunner().invoke(main, ["hf-to-dcp", str(src), str(dst), "--resume"])
    if result.exit_code == 0:  # redone from the new bytes
        assert folder_digest(dst) == folder_digest(tmp_path / "new")
    else:
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert "changed" in lines[0] and "model-00001-of-00003.safetensors" in lines[0], lines[0]
        assert not dst.exists() and publish.staging_path(dst).is_dir()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A real PEFT adapter (random B) for tiny-dense-tied."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    folder = tmp_path_factory.mktemp("lora") / "adapter"
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(FIX / "tiny-dense-tied", dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    model.save_pretrained(folder)
    return folder


def test_resume_after_the_adapter_changed_does_not_mix_old_and_new(adapter, tmp_path):
    lora = tmp_path / "adapter"
    shutil.copytree(adapter, lora)
    argv = ["convert", FIX / "tiny-dense-tied", None, "--to", "hf", "--merge-lora", lora, "--max-shard-size", "20KB"]
    run_cli(*[a if a is not None else tmp_path / "clean" for a in argv], "-q")
    dst = tmp_path / "out"
    proc = _signalled_run([a if a is not None else dst for a in argv] + ["-q"], _total(tmp_path / "clean") * 9 // 10)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    weights = lora / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * 2 for k, v in tensors.items()}, str(weights))
    run_cli(*[a if a is not None else tmp_path / "new" for a in argv], "-q")
    assert folder_digest(tmp_path / "new") != folder_digest(tmp_path / "clean")
    result = CliRunner().invoke(main, [str(a if a is not None else dst) for a in argv] + ["--resume"])
    if result.exit_code == 0:
        assert folder_digest(dst) == folder_digest(tmp_path / "new")
    else:
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert "changed" in lines[0] and "adapter_model.safetensors" in lines[0], lines[0]


# ------------------------------------------------------------------------ 7: hostile adapter configs
@pytest.mark.parametrize(("field", "value"), [
    ("lora_alpha", float("nan")), ("lora_alpha", float("inf")), ("lora_alpha", "x"), ("r", "4"), ("r", 0),
    ("r", True), ("rank_pattern", [1]), ("alpha_pattern", {"q_proj": "big"}), ("rank_pattern", {"q_proj": -1}),
    ("alpha_pattern", {"q_proj": float("nan")}), ("target_modules", 5), ("modules_to_save", "lm_head"),
    ("use_rslora", "yes"), ("fan_in_fan_out", 1), ("peft_type", 3), ("rank_pattern", {"(": 4}),
])
def test_a_hostile_adapter_config_is_one_line(adapter, tmp_path, field, value):
    lora = tmp_path / "adapter"
    shutil.copytree(adapter, lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    config[field] = value
    (lora / "adapter_config.json").write_text(json.dumps(config))  # NaN / Infinity as Python writes them
    line = one_error_line("convert", FIX / "tiny-dense-tied", tmp_path / "out", "--to", "hf", "--merge-lora", lora)
    assert field in line and "adapter_config.json" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ------------------------------------------------------------------------ 8: the journal is untrusted
def _kill_dcp_half_way(hf: Path, tmp_path: Path) -> Path:
    run_cli("hf-to-dcp", hf, tmp_path / "clean", "-q")
    dst = tmp_path / "out"
    proc = _signalled_run(["hf-to-dcp", hf, dst, "-q"], _total(tmp_path / "clean") // 2)
    assert proc.returncode == -signal.SIGKILL
    return dst


def _edit_journal(dst: Path, edit) -> None:
    lines = _journal(dst)
    for line in lines[1:]:
        if line["file"] == "__0_0.distcp":
            edit(line)
    publish.journal_path(dst).write_text("".join(json.dumps(r) + "\n" for r in lines))


def _swap_same_shaped(line: dict) -> None:
    records = line["state"]["records"]
    for i, a in enumerate(records):
        for b in records[i + 1:]:
            if a["shape"] == b["shape"] and a["dtype"] == b["dtype"] and a["length"] == b["length"]:
                a["key"], b["key"] = b["key"], a["key"]
                a["nesting"], b["nesting"] = b["nesting"], a["nesting"]
                return
    raise AssertionError("no two records of the same shape")


def _swap_starts(line: dict) -> None:
    records = line["state"]["records"]
    for i, a in enumerate(records):
        for b in records[i + 1:]:
            if a["length"] == b["length"]:
                a["start"], b["start"] = b["start"], a["start"]
                return
    raise AssertionError("no two records of the same length")


@pytest.mark.parametrize("edit", [
    _swap_same_shaped, _swap_starts,
    lambda line: line.update(state={"records": [{"oops": 1}]}),
    lambda line: line.update(state={"records": "x"}),
    lambda line: line.update(state=[1, 2]),
    lambda line: line["state"]["records"][0].update(dtype="torch.complex128"),
    lambda line: line["state"]["records"][0].update(shape=[-1, 2**70]),
    lambda line: line["state"]["records"][-1].update(length=line["state"]["records"][-1]["length"] + 1),
], ids=["keys-swapped", "starts-swapped", "no-key", "records-not-list", "state-not-object", "bad-dtype",
        "bad-shape", "length-off"])
def test_an_edited_journal_never_publishes_a_wrong_metadata(hf, tmp_path, edit):
    dst = _kill_dcp_half_way(hf, tmp_path)
    _edit_journal(dst, edit)
    result = CliRunner().invoke(main, ["hf-to-dcp", str(hf), str(dst), "--resume"])
    if result.exit_code == 0:  # the file was redone (or its records re-derived)
        assert folder_digest(dst) == folder_digest(tmp_path / "clean")
    else:
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert "internal error" not in lines[0], lines[0]
        assert not dst.exists()


# ------------------------------------------------------------------------ 9: sync errors
def _is_dir(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def test_an_io_error_syncing_the_staging_folder_is_one_line_and_publishes_nothing(hf, tmp_path, monkeypatch):
    real = os.fsync
    stage = publish.staging_path(tmp_path / "out")

    def fsync(fd):
        if _is_dir(fd) and os.readlink(f"/proc/self/fd/{fd}") == str(stage):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    line = one_error_line("convert", hf, tmp_path / "out", "--to", "dcp")
    assert str(stage) in line and "Input/output error" in line and "nothing was published" in line, line
    assert list(tmp_path.iterdir()) == []


def test_an_io_error_syncing_the_manifest_names_it(hf, tmp_path, monkeypatch):
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(publish.MANIFEST_NAME):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    line = one_error_line("convert", hf, tmp_path / "out", "--to", "dcp")
    assert publish.MANIFEST_NAME in line and "Input/output error" in line, line
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ 11, 14: Ctrl-C, SIGTERM
@pytest.mark.parametrize(("sig", "code", "word"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_signal_keeps_finished_files_for_resume(hf, tmp_path, sig, code, word):
    run_cli("hf-to-dcp", hf, tmp_path / "clean", "-q")
    dst = tmp_path / "out"
    proc = _signalled_run(["hf-to-dcp", hf, dst, "-q"], _total(tmp_path / "clean") // 2, sig)
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and ln != "WORK-STARTED"]
    assert len(lines) == 1, proc.stderr
    kept = len(_journal(dst)) - 1
    assert kept >= 1
    assert lines[0] == f"{word}: nothing was published; rerun with --resume to keep {kept} finished files", lines
    assert not dst.exists() and publish.staging_path(dst).is_dir()
    assert not (tmp_path / ".out.vlconvert-lock").exists()
    result = run_cli("hf-to-dcp", hf, dst, "--resume")
    assert f"{kept} finished files kept" in result.output
    assert folder_digest(dst) == folder_digest(tmp_path / "clean")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "out"]


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_just_after_publishing_says_it_was_published(hf, tmp_path, sig, code):
    dst = tmp_path / "out"
    proc = _signalled_run(["hf-to-dcp", hf, dst, "-q"], -2, sig)
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and ln != "WORK-STARTED"]
    assert len(lines) == 1, proc.stderr
    assert "nothing was published" not in lines[0] and f"'{dst}' was published" in lines[0], lines[0]
    run_cli("verify", "--manifest", dst, "-q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no journal, lock or stage left


def test_a_rerun_without_resume_says_first_that_it_discards_finished_files(hf, tmp_path):
    run_cli("hf-to-dcp", hf, tmp_path / "clean", "-q")
    dst = tmp_path / "out"
    assert _signalled_run(["hf-to-dcp", hf, dst, "-q"], _total(tmp_path / "clean") // 2).returncode == \
        -signal.SIGKILL
    kept = len(_journal(dst)) - 1
    assert kept >= 1
    proc = _signalled_run(["hf-to-dcp", hf, dst], -1)
    assert proc.returncode == 0, proc.stderr
    said = [i for i, ln in enumerate(proc.stderr.splitlines()) if "discard" in ln]
    assert said, proc.stderr
    line = proc.stderr.splitlines()[said[0]]
    assert f"{kept} finished file" in line and "--resume" in line, line
    assert said[0] < proc.stderr.splitlines().index("WORK-STARTED"), proc.stderr
    assert folder_digest(dst) == folder_digest(tmp_path / "clean")


@pytest.mark.parametrize("flag", ["-q", "--json"])
def test_discarding_finished_files_is_said_even_under_quiet_and_json(hf, tmp_path, flag):
    """A warning that finished work is thrown away reaches the user whatever the output flags: on stderr,
    and in the --json record (its notes and its warnings, the stderr lines word for word)."""
    run_cli("hf-to-dcp", hf, tmp_path / "clean", "-q")
    dst = tmp_path / "out"
    assert _signalled_run(["hf-to-dcp", hf, dst, "-q"], _total(tmp_path / "clean") // 2).returncode == \
        -signal.SIGKILL
    kept = len(_journal(dst)) - 1
    assert kept >= 1
    proc = _signalled_run(["hf-to-dcp", hf, dst, flag], -1)
    assert proc.returncode == 0, proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: discarding")]
    assert len(warned) == 1 and f"{kept} finished file" in warned[0] and "--resume" in warned[0], proc.stderr
    if flag == "--json":
        record = json.loads(proc.stdout)
        assert record["ok"] and any(f"discarded {kept} finished file" in n for n in record["notes"]), record
        assert [f"warning: {w}" for w in record["warnings"]] == warned, record
    assert folder_digest(dst) == folder_digest(tmp_path / "clean")


def test_resume_covers_a_file_the_reader_opened_that_no_option_names(tmp_path):
    """--resume's fingerprint holds the identity of every file the readers opened, also one no option of the
    command names: a Bridge checkpoint's config read from its hf_model_id folder, rewritten between the
    interrupted run and --resume, is refused in one line naming it."""
    from vlconvert.sources import open_source

    hfm = tmp_path / "hfm"
    shutil.copytree(FIX / "tiny-dense-untied", hfm)
    run_cli("convert", hfm, tmp_path / "td", "--to", "torch_dist", "-q")
    dst = tmp_path / "out"
    source = open_source(tmp_path / "td")  # its config comes from hfm (hf_model_id in run_config.yaml)
    try:
        assert source.assets == hfm.resolve() or source.assets == hfm
        with pytest.raises(KeyboardInterrupt):
            with publish.staged_output(dst, inputs={"SRC": tmp_path / "td"}, fingerprint={"cmd": 1}) as stage:
                publish.write_bytes(stage.path / "a", b"finished")
                raise KeyboardInterrupt
        assert (publish.staging_path(dst) / "a").is_file()  # kept for --resume
        st = os.stat(hfm / "config.json")
        os.utime(hfm / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place
        with pytest.raises(publish.UserError) as caught:
            with publish.staged_output(dst, inputs={"SRC": tmp_path / "td"}, fingerprint={"cmd": 1}, resume=True):
                pass
        assert "config.json" in str(caught.value) and "changed" in str(caught.value), caught.value
    finally:
        source.close()


def test_a_config_that_does_not_fit_a_torch_dist_checkpoint_ends_in_one_line_before_planning(tmp_path):
    """Within the fixed bounds, a config of 4000 layers of 16000 experts would make the torch_dist reader
    plan 64 million tensors: its sizes are compared with the tensors present first (issue 20 item 13)."""
    run_cli("convert", FIX / "tiny-moe", tmp_path / "td", "--to", "torch_dist", "--tp", "2", "--ep", "2", "-q")
    for changes, field in [({"num_hidden_layers": 4000, "num_experts": 16000}, "num_hidden_layers"),
                           ({"num_experts": 16000}, "num_experts"), ({"hidden_size": 128}, "hidden_size")]:
        config = json.loads((FIX / "tiny-moe" / "config.json").read_text())
        config["text_config"].update(changes)
        (tmp_path / "config.json").write_text(json.dumps(config))
        argv = ["convert", tmp_path / "td", tmp_path / "out", "--to", "dcp", "--config", tmp_path / "config.json"]
        code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30)); "
                "from vlconvert.cli import main; main(sys.argv[1:], prog_name='vlconvert')")
        proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                              timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
        assert field in lines[0] and str(tmp_path / "td") in lines[0] and "config.json" in lines[0], lines[0]
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ 13: absurd config sizes
@pytest.mark.parametrize(("section", "field"), [("text_config", "num_hidden_layers"), ("vision_config", "depth"),
                                                ("text_config", "hidden_size"), ("text_config", "num_experts"),
                                                ("text_config", "vocab_size")])
@pytest.mark.parametrize("command", ["convert", "plan", "inspect"])
def test_absurd_config_sizes_end_in_one_line_quickly(tmp_path, section, field, command):
    src = tmp_path / "src"
    shutil.copytree(FIX / "tiny-moe", src)
    config = json.loads((src / "config.json").read_text())
    config[section][field] = 10**12
    (src / "config.json").write_text(json.dumps(config))
    argv = {"convert": ["convert", src, tmp_path / "out", "--to", "dcp"],
            "plan": ["plan", "--source", src, "--to", "dcp"], "inspect": ["inspect", src]}[command]
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "vlconvert", *map(str, argv)], capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{command} with {field}=1e12 still running after 60 s")
    assert time.monotonic() - started < 60
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert field in lines[0] and "internal error" not in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
