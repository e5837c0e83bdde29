"""Never lose a byte: overlapping outputs, racing runs, stale staging, determinism, manifests, --resume.

Every writing command is tried with the path spellings users type (relative, absolute, ``..``, a
symlink to the same folder, a trailing slash); inputs are hashed before and after.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import folder_digest, run_cli

from vlconvert import publish
from vlconvert.cli import main

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def one_error_line(*args: str, expect: int = 1) -> str:
    """Run the CLI, expect a one-line error and exit code ``expect``; return the line."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, (result.exit_code, result.output)
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output and "[/" not in lines[0] and "[bold" not in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A scratch folder holding an HF model, its DCP and its Megatron conversion."""
    root = tmp_path_factory.mktemp("reliability")
    shutil.copytree(FIX / "tiny-moe", root / "hf")
    run_cli("hf-to-dcp", root / "hf", root / "dcp", "-q")
    run_cli("hf-to-megatron", root / "hf", root / "mg", "--tp", "2", "-q")
    return root


def _snapshot(root: Path) -> dict[str, dict[str, str]]:
    return {name: folder_digest(root / name) for name in ("hf", "dcp", "mg")}


# ------------------------------------------------------------------------------------------ overlap
def _overlap_cases(w: Path) -> list[tuple[str, list[str]]]:
    """(what, argv) for every command and every way its output can overlap an input."""
    hf, dcp, mg = w / "hf", w / "dcp", w / "mg"
    rel_hf = os.path.relpath(hf)
    cases = [
        ("hf-to-dcp DST=SRC", ["hf-to-dcp", hf, hf]),
        ("hf-to-dcp DST=SRC relative, trailing slash", ["hf-to-dcp", rel_hf, rel_hf + "/"]),
        ("hf-to-dcp DST=SRC via ..", ["hf-to-dcp", hf, f"{hf}/../hf"]),
        ("hf-to-dcp DST=symlink to SRC", ["hf-to-dcp", hf, w / "link-to-hf"]),
        ("hf-to-dcp DST inside SRC", ["hf-to-dcp", hf, hf / "out"]),
        ("hf-to-dcp SRC inside DST", ["hf-to-dcp", hf, w]),
        ("hf-to-dcp SRC symlink inside DST", ["hf-to-dcp", w / "link-to-hf", w]),
        ("dcp-to-hf DST=SRC", ["dcp-to-hf", dcp, dcp, "--assets-dir", hf]),
        ("dcp-to-hf DST=assets", ["dcp-to-hf", dcp, hf, "--assets-dir", hf]),
        ("dcp-to-hf assets inside DST", ["dcp-to-hf", dcp, w, "--assets-dir", hf]),
        ("dcp-to-hf DST inside assets", ["dcp-to-hf", dcp, hf / "x", "--assets-dir", hf]),
        ("hf-to-megatron DST=SRC", ["hf-to-megatron", hf, hf]),
        ("hf-to-megatron SRC inside DST", ["hf-to-megatron", hf, w]),
        ("megatron-to-hf DST=SRC", ["megatron-to-hf", mg, mg, "--assets-dir", hf]),
        ("megatron-to-hf DST=assets", ["megatron-to-hf", mg, f"{hf}/", "--assets-dir", hf]),
        ("megatron-to-hf assets inside DST", ["megatron-to-hf", mg, w, "--assets-dir", hf]),
        ("reshard DST=SRC", ["reshard", mg, mg, "--tp", "1"]),
        ("reshard DST inside SRC", ["reshard", mg, mg / "release" / "x", "--tp", "1"]),
        ("retag-think --out=SRC", ["retag-think", hf, "--out", hf]),
        ("retag-think SRC inside --out", ["retag-think", hf, "--out", w]),
    ]
    return cases


def test_every_overlap_is_refused_before_writing(work):
    (work / "link-to-hf").unlink(missing_ok=True)
    (work / "link-to-hf").symlink_to(work / "hf")
    before = _snapshot(work)
    listing = sorted(p.name for p in work.iterdir())
    cwd = os.getcwd()
    os.chdir(work.parent)  # so the relative spellings are relative for real
    try:
        for what, argv in _overlap_cases(work):
            for extra in ([], ["--overwrite"]):
                line = one_error_line(*argv, *extra, "-q")
                assert any(word in line for word in ("is the input", "inside the input", "contains the input",
                                                     "is the source", "inside the source")), (what, line)
    finally:
        os.chdir(cwd)
    assert _snapshot(work) == before
    assert sorted(p.name for p in work.iterdir()) == listing  # no staging folder, no lock file left


def test_output_containing_the_working_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    line = one_error_line("hf-to-dcp", FIX / "tiny-dense-tied", tmp_path, "--overwrite")
    assert "current directory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


# ---------------------------------------------------------------------------------------- publishing
def test_a_second_run_on_the_same_output_stops_at_once(tmp_path):
    dst = tmp_path / "out"
    lock = publish._Lock(tmp_path / ".out.vlconvert-lock", dst)  # a run in progress holds it
    try:
        line = one_error_line("hf-to-dcp", FIX / "tiny-dense-tied", dst)
        assert "another vlconvert run" in line and f"pid {os.getpid()}" in line
    finally:
        lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    run_cli("hf-to-dcp", FIX / "tiny-dense-tied", dst, "-q")  # free again once the first run is gone


def test_two_runs_started_together_never_both_succeed(tmp_path):
    dst = tmp_path / "out"
    cmd = [sys.executable, "-m", "vlconvert.cli", "hf-to-dcp", str(FIX / "tiny-moe"), str(dst), "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    err = next(e for c, e in results if c == 1).strip()
    assert len(err.splitlines()) == 1 and ("another vlconvert run" in err or "already exists" in err), err
    run_cli("verify", "--manifest", dst, "-q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_that_appears_during_the_run_is_not_replaced(tmp_path, monkeypatch):
    dst = tmp_path / "out"
    real = publish.Stage.finish

    def intruder(self):
        real(self)
        dst.mkdir()
        (dst / "theirs.txt").write_text("someone else's")

    monkeypatch.setattr(publish.Stage, "finish", intruder)
    line = one_error_line("hf-to-dcp", FIX / "tiny-dense-tied", dst)
    assert "while this run was writing" in line
    assert [p.name for p in dst.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(publish.Stage, "finish", real)

    # with --overwrite: replaced only if DST is still the folder that was checked at the start
    def swapper(self):
        real(self)
        shutil.rmtree(dst)
        dst.mkdir()
        (dst / "new.txt").write_text("swapped in meanwhile")

    monkeypatch.setattr(publish.Stage, "finish", swapper)
    assert "while this run was writing" in one_error_line("hf-to-dcp", FIX / "tiny-dense-tied", dst, "--overwrite")
    assert [p.name for p in dst.iterdir()] == ["new.txt"]


def test_an_empty_output_folder_made_beforehand_is_filled_atomically(tmp_path, monkeypatch):
    """`mkdir out; vlconvert convert SRC out`: an empty real folder is replaced by the finished output in one
    rename; a folder holding anything, or a link to an empty folder, is refused; files that appear in the empty
    folder while the run writes stop the publishing (their files stay, nothing of the run is left)."""
    run_cli("hf-to-dcp", FIX / "tiny-dense-tied", tmp_path / "fresh", "-q")
    (tmp_path / "empty").mkdir()
    run_cli("hf-to-dcp", FIX / "tiny-dense-tied", tmp_path / "empty", "-q")
    assert folder_digest(tmp_path / "empty") == folder_digest(tmp_path / "fresh")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    assert "already exists" in one_error_line("hf-to-dcp", FIX / "tiny-dense-tied", tmp_path / "full")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert "already exists" in one_error_line("hf-to-dcp", FIX / "tiny-dense-tied", tmp_path / "link")

    dst = tmp_path / "raced"
    dst.mkdir()
    real = publish.Stage.finish

    def intruder(self):
        real(self)
        (dst / "theirs.txt").write_text("someone else's")

    monkeypatch.setattr(publish.Stage, "finish", intruder)
    line = one_error_line("hf-to-dcp", FIX / "tiny-dense-tied", dst)
    assert "while this run was writing" in line and "nothing was published" in line
    assert [p.name for p in dst.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "fresh", "full", "link", "raced", "target"]


def test_stale_staging_of_a_dead_run_is_cleaned_up(tmp_path):
    dst = tmp_path / "out"
    stale = publish.staging_path(dst)
    stale.mkdir()
    publish.journal_path(dst).write_text('{"run": {"pid": 999999999, "fingerprint": {}}}\n')
    (stale / "__0_0.distcp").write_bytes(b"half written")
    result = run_cli("hf-to-dcp", FIX / "tiny-dense-tied", dst)
    assert "interrupted run" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    run_cli("verify", "--manifest", dst, "-q")


def test_dangling_symlink_output_leaves_nothing_behind(tmp_path):
    dst = tmp_path / "out"
    dst.symlink_to(tmp_path / "missing")
    assert "symlink to a missing path" in one_error_line("hf-to-dcp", FIX / "tiny-dense-tied", dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and dst.is_symlink()
    run_cli("hf-to-dcp", FIX / "tiny-dense-tied", dst, "--overwrite", "-q")
    assert dst.is_dir() and not dst.is_symlink() and not (tmp_path / "missing").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_parent_folders_are_created_and_removed_on_failure(tmp_path):
    run_cli("hf-to-dcp", FIX / "tiny-dense-tied", tmp_path / "a" / "b" / "out", "-q")
    run_cli("verify", "--manifest", tmp_path / "a" / "b" / "out", "-q")
    one_error_line("hf-to-dcp", tmp_path / "nope", tmp_path / "c" / "d" / "out", expect=2)  # a missing SRC: usage
    assert not (tmp_path / "c").exists()


# -------------------------------------------------------------------------------- determinism, manifest
@pytest.mark.parametrize("argv", [
    ["hf-to-dcp", "{hf}"],
    ["dcp-to-hf", "{dcp}", "--assets-dir", "{hf}", "--max-shard-size", "400KB"],
    ["hf-to-megatron", "{hf}", "--tp", "2", "--ep", "2"],
    ["megatron-to-hf", "{mg}", "--assets-dir", "{hf}"],
    ["reshard", "{mg}", "--tp", "1", "--ep", "2"],
])
def test_same_input_same_bytes_and_a_manifest_that_catches_a_flipped_byte(work, tmp_path, argv):
    cmd, src, *rest = [a.format(hf=work / "hf", dcp=work / "dcp", mg=work / "mg") for a in argv]
    run_cli(cmd, src, tmp_path / "one", *rest, "-q")
    run_cli(cmd, src, tmp_path / "two", *rest, "-q")
    assert folder_digest(tmp_path / "one") == folder_digest(tmp_path / "two")
    run_cli("verify", "--manifest", tmp_path / "one", "-q")
    files = publish.read_manifest(tmp_path / "one")
    on_disk = {p.relative_to(tmp_path / "one").as_posix() for p in (tmp_path / "one").rglob("*") if p.is_file()}
    assert set(files) == on_disk - {publish.MANIFEST_NAME}
    biggest = max(files, key=lambda f: files[f]["size"])
    path = tmp_path / "one" / biggest
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", "--manifest", str(tmp_path / "one")])
    assert result.exit_code == 1 and f"{biggest}: sha256 differs" in result.output
    path.write_bytes(bytes(data[:-1]))
    result = CliRunner().invoke(main, ["verify", "--manifest", str(tmp_path / "one")])
    assert result.exit_code == 1 and "size" in result.output
    (tmp_path / "two" / "stray.txt").write_text("x")
    result = CliRunner().invoke(main, ["verify", "--manifest", str(tmp_path / "two")])
    assert result.exit_code == 1 and "stray.txt: not in the manifest" in result.output


def test_verify_manifest_errors(tmp_path):
    assert "no vlconvert-manifest.json" in one_error_line("verify", "--manifest", FIX / "tiny-moe")
    (tmp_path / publish.MANIFEST_NAME).write_text('{"files": {"../etc/passwd": {"size": 1, "sha256": "x"}}}')
    assert "outside the folder" in one_error_line("verify", "--manifest", tmp_path)
    (tmp_path / publish.MANIFEST_NAME).write_text("[1, 2]")
    assert "corrupt" in one_error_line("verify", "--manifest", tmp_path)


# --------------------------------------------------------------------------------------------- resume
_KILLER = """
import os, signal, sys
from vlconvert import publish
from vlconvert.cli import main
limit, written = int(sys.argv[1]), [0]
def counting(real):
    def write(self, *args, **kwargs):
        n = real(self, *args, **kwargs)
        written[0] += n
        if written[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)
        return n
    return write
publish.OutputFile.write = counting(publish.OutputFile.write)
publish.OutputFile.write_later = counting(publish.OutputFile.write_later)
publish.OutputFile.copy_range = counting(publish.OutputFile.copy_range)
main(sys.argv[2:], prog_name="vlconvert")
"""


def _killed_run(argv: list[str], kill_after_bytes: int) -> int:
    """Run the CLI in a child process that SIGKILLs itself once ``kill_after_bytes`` have been written."""
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(kill_after_bytes), *argv], capture_output=True,
                          timeout=300)
    return proc.returncode


@pytest.mark.parametrize("argv", [
    ["hf-to-dcp", "{hf}"],
    ["dcp-to-hf", "{dcp}", "--assets-dir", "{hf}", "--max-shard-size", "400KB"],
    ["hf-to-megatron", "{hf}", "--tp", "2", "--ep", "2"],
])
def test_resume_after_sigkill_gives_the_same_bytes(work, tmp_path, argv):
    cmd, src, *rest = [a.format(hf=work / "hf", dcp=work / "dcp", mg=work / "mg") for a in argv]
    run_cli(cmd, src, tmp_path / "clean", *rest, "-q")
    expected = folder_digest(tmp_path / "clean")
    total = sum(e["size"] for e in publish.read_manifest(tmp_path / "clean").values())
    dst = tmp_path / "out"
    for fraction in (0.001, 0.5, 0.999):  # before the first file ends, mid-way, near the end
        code = _killed_run([cmd, str(src), str(dst), *rest, "-q"], int(total * fraction))
        assert code == -signal.SIGKILL
        assert not dst.exists() and publish.staging_path(dst).is_dir()
        result = run_cli(cmd, src, dst, *rest, "--resume")
        assert "resuming" in result.output
        assert folder_digest(dst) == expected, fraction
        assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "out"]
        shutil.rmtree(dst)


def test_resume_refuses_other_options_and_starts_fresh_without_a_stage(work, tmp_path):
    dst = tmp_path / "out"
    assert _killed_run(["hf-to-dcp", str(work / "hf"), str(dst), "-q"], 300_000) == -signal.SIGKILL
    line = one_error_line("hf-to-dcp", work / "hf", dst, "--resume", "--dtype", "fp32")
    assert "other options" in line and "without --resume" in line
    assert publish.staging_path(dst).is_dir()  # kept for a correct --resume
    run_cli("hf-to-dcp", work / "hf", dst, "-q")  # a plain rerun starts over
    result = run_cli("hf-to-dcp", work / "hf", tmp_path / "fresh", "--resume")
    assert "nothing to resume" in result.output
    assert folder_digest(dst) == folder_digest(tmp_path / "fresh")


def test_resume_drops_files_whose_checksum_no_longer_matches(work, tmp_path):
    dst = tmp_path / "out"
    run_cli("hf-to-dcp", work / "hf", tmp_path / "clean", "-q")
    assert _killed_run(["hf-to-dcp", str(work / "hf"), str(dst), "-q"], 1_300_000) == -signal.SIGKILL
    stage = publish.staging_path(dst)
    finished = sorted(p for p in stage.glob("*.distcp"))
    assert finished
    data = bytearray(finished[0].read_bytes())
    data[100] ^= 0xFF
    finished[0].write_bytes(bytes(data))
    run_cli("hf-to-dcp", work / "hf", dst, "--resume", "-q")
    assert folder_digest(dst) == folder_digest(tmp_path / "clean")


# ---------------------------------------------------------------------------------------- messages
def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    import vlconvert.engine as engine

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(engine, "canonical_blocks", broken)
    line = one_error_line("hf-to-dcp", FIX / "tiny-moe", tmp_path / "out")
    assert "internal error (ZeroDivisionError: boom)" in line and "--debug" in line
    result = CliRunner().invoke(main, ["hf-to-dcp", str(FIX / "tiny-moe"), str(tmp_path / "out"), "--debug"])
    assert isinstance(result.exception, ZeroDivisionError)
    result = CliRunner().invoke(main, ["--debug", "hf-to-dcp", str(FIX / "tiny-moe"), str(tmp_path / "out")])
    assert isinstance(result.exception, ZeroDivisionError)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_os_errors_are_plain_lines(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    line = one_error_line("hf-to-dcp", FIX / "tiny-dense-tied", blocked / "out")
    assert "file" in line


class _FillingFile:
    """A raw file that fails with ENOSPC once ``room`` bytes have been written (what a full disk does)."""

    def __init__(self, f, room: list[int]):
        self._f, self._room = f, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if self._room[0] < n:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room[0] -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.mark.parametrize("target", [["--to", "dcp"], ["--to", "megatron", "--tp", "2", "--ep", "2"],
                                    ["--to", "hf"]])
def test_disk_full_in_the_write_thread_is_one_line_and_publishes_nothing(work, tmp_path, monkeypatch, target):
    """The disk fills while the background thread writes: the run stops with one line, nothing is left."""
    real_init = publish.OutputFile.__init__
    room = [600_000]  # bytes of the whole run that still fit

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._f = _FillingFile(self._f, room)

    def kernel_copy(src, dst, size, src_offset, dst_offset):  # copy_file_range fills the same disk
        if room[0] < size:
            raise OSError(errno.ENOSPC, "No space left on device")
        room[0] -= size
        return os.copy_file_range(src, dst, size, src_offset, dst_offset)

    monkeypatch.setattr(publish.OutputFile, "__init__", init)
    monkeypatch.setattr(publish, "kernel_copy", kernel_copy)
    line = one_error_line("convert", work / "hf", tmp_path / "out", *target)
    assert "disk full" in line, line
    assert list(tmp_path.iterdir()) == []


def test_a_failure_in_the_checksum_thread_reaches_the_caller(tmp_path):
    """Late bytes (a zip data descriptor) that cannot be made stop the file with the original error."""
    f = publish.OutputFile(tmp_path / "x.bin", None, "x.bin")
    f.write(b"a" * (2 << 20))
    f.write_later(16, lambda: b"too short")
    with pytest.raises(RuntimeError, match="late bytes"):
        f.close()
    assert f.closed


def test_a_file_left_by_an_exception_is_never_journaled(tmp_path):
    """``with create_file(...)`` left by an error must not record the partial file as finished."""

    class Journal:
        def __init__(self):
            self.rehashed, self.entries = [], []

        def journal(self, rel, size, sha256, state):
            self.entries.append((rel, size))

    journal = Journal()
    with pytest.raises(OSError), publish.OutputFile(tmp_path / "a.bin", journal, "a.bin") as f:
        f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")
    with publish.OutputFile(tmp_path / "b.bin", journal, "b.bin") as f:
        f.write(b"y" * 10)
    assert journal.entries == [("b.bin", 10)]


def test_every_file_is_on_disk_before_the_output_is_published(work, tmp_path, monkeypatch):
    """Each written file is fdatasynced, and each folder fsynced, before the rename that publishes them,
    and the parent folder after it: a power cut never leaves a published folder with missing bytes."""
    events: list[tuple[str, str]] = []
    real_fdatasync, real_fsync, real_rename = os.fdatasync, os.fsync, publish._rename_noreplace

    def named(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def fdatasync(fd):
        events.append(("data", named(fd)))
        return real_fdatasync(fd)

    def fsync(fd):
        events.append(("fsync", named(fd)))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(publish, "_rename_noreplace", rename)
    out = tmp_path / "out"
    run_cli("convert", work / "hf", out, "--to", "megatron", "--tp", "2", "-q")
    at = events.index(("rename", str(out)))
    stage = str(publish.staging_path(out))
    synced = {Path(p).relative_to(stage).as_posix() for kind, p in events[:at] if kind == "data"}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert synced == on_disk - {publish.MANIFEST_NAME}
    folders = {Path(p) for kind, p in events[:at] if kind == "fsync"}
    assert {Path(stage) / p.parent.relative_to(out) for p in out.rglob("*") if p.is_file()} <= folders
    assert ("fsync", str(Path(stage) / publish.MANIFEST_NAME)) in events[:at]
    assert ("fsync", str(tmp_path)) in events[at:]


def test_an_error_met_by_writeback_is_one_line_and_publishes_nothing(work, tmp_path, monkeypatch):
    """The kernel reports a full disk at fdatasync (delayed allocation): one line, nothing published."""

    def fdatasync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    line = one_error_line("convert", work / "hf", tmp_path / "out", "--to", "dcp")
    assert "disk full" in line, line
    assert list(tmp_path.iterdir()) == []


def test_an_io_error_met_by_writeback_names_the_file(work, tmp_path, monkeypatch):
    def fdatasync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    line = one_error_line("convert", work / "hf", tmp_path / "out", "--to", "dcp")
    assert "Input/output error" in line and "cannot write" in line and "nothing was published" in line, line
    assert list(tmp_path.iterdir()) == []


def test_writeback_starts_while_the_file_is_written(tmp_path, monkeypatch):
    """Every WRITEBACK_STEP written bytes (kernel copies too) the write thread asks the kernel to start
    writing them, in order and without gaps."""
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(publish, "WRITEBACK_STEP", 2**20)
    monkeypatch.setattr(publish, "_SYNC_FILE_RANGE", lambda fd, offset, size, flags: calls.append((offset, size,
                                                                                                  flags)) or 0)
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(3 << 20))
    f = publish.OutputFile(tmp_path / "x.bin", None, "x.bin")
    f.write(os.urandom(2 << 20))
    f.copy_range(src, 0, 3 << 20)
    f.write(b"tail" * 10)
    f.close()
    assert calls and all(flags == 2 for *_, flags in calls)  # SYNC_FILE_RANGE_WRITE only: never waits
    ends = [0] + [offset + size for offset, size, _ in calls]
    assert [offset for offset, _, _ in calls] == ends[:-1] and ends[-1] == 5 << 20
    assert (tmp_path / "x.bin").read_bytes()[2 << 20:5 << 20] == src.read_bytes()
