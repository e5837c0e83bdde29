"""``convert --workers N``: processes forked by one command split the output's bytes as torchrun's ranks do
(the output and its manifest equal one process's: tests/test_torchrun.py, for every route); a worker that
fails, is killed or is interrupted ends the command in one line with nothing published and no process left
behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import folder_digest, run_cli

from vlconvert import workers
from vlconvert.engine import Converter
from vlconvert.errors import UserError
from vlconvert.splitting import SPLIT_BYTES_ENV, assign_shares

FIX = Path(__file__).resolve().parents[1] / "fixtures"
HF = FIX / "tiny-moe"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", SPLIT_BYTES_ENV: "4096"}


def vlconvert(*argv: str | Path, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlconvert", *map(str, argv)], capture_output=True, text=True,
                          env=env or ENV, timeout=300, **kw)


def alive(pids: list[int]) -> list[int]:
    """The pids of ``pids`` that still run (zombies count as ended)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def test_one_bar_counts_every_workers_bytes(tmp_path):
    """The progress bar of rank 0 is the whole conversion's: it reaches the plan's bytes, children's included."""
    script = textwrap.dedent(f"""
        from vlconvert.engine import Converter
        seen = []
        def progress(description, total):
            seen.append((description, total))
            def advance(n):
                seen.append(n)
            return advance
        conv = Converter({str(HF)!r}, {str(tmp_path / "out")!r}, to="megatron", tp=2, workers=3)
        conv.run(progress)
        print(seen[0][0], seen[0][1], sum(seen[1:]), conv.plan().tensor_bytes)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *title, total, counted, planned = proc.stdout.split()
    assert " ".join(title) == "hf -> megatron (3 workers)"
    assert int(total) == int(counted) == int(planned)


KILL_A_WORKER = """
import os, signal, sys
from vlconvert import cli
from vlconvert.engine import Converter
write = Converter._write
def failing(self, stage, plan, advance):
    if not self.lead:  # a child: {what}
        {how}
    return write(self, stage, plan, advance)
Converter._write = failing
sys.argv = ["vlconvert", *sys.argv[1:]]
cli.main()
"""


@pytest.mark.parametrize("what, how, line", [
    ("killed, as by the OOM killer", "os.kill(os.getpid(), signal.SIGKILL)",
     "error: worker {n} stopped before finishing its share (killed by SIGKILL)"),
    ("its disk is full", "raise OSError(28, 'No space left on device')",
     "error: worker {n}: [Errno 28] No space left on device"),
])
def test_a_failing_worker_ends_the_command_in_one_line(tmp_path, what, how, line):
    script = KILL_A_WORKER.format(what=what, how=how)
    proc = subprocess.run([sys.executable, "-c", script, "convert", str(HF), str(tmp_path / "out"), "--to", "dcp",
                           "--workers", "3"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] in {line.format(n=1), line.format(n=2)}, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing published, no stage or lock left


def test_ctrl_c_stops_every_worker(tmp_path):
    """Ctrl-C reaches the whole process group: exit 130, one line, no worker left running, nothing published;
    --resume with workers then finishes the same bytes as one process writes."""
    script = KILL_A_WORKER.format(what="slow", how="import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script, "convert", str(HF), str(tmp_path / "out"), "--to",
                             "megatron", "--tp", "2", "--workers", "3"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    children: list[int] = []
    deadline = time.monotonic() + 120
    while len(children) < 2 and time.monotonic() < deadline:  # both children forked and sleeping
        time.sleep(0.2)
        try:
            children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        except OSError:
            break
    assert len(children) == 2, "the workers were not forked"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err.lower(), err
    assert alive(children) == []
    assert not (tmp_path / "out").exists()  # nothing published; the stage stays for --resume
    proc = vlconvert("convert", HF, tmp_path / "out", "--to", "megatron", "--tp", "2", "--workers", "3", "--resume",
                     "-q")
    assert proc.returncode == 0, proc.stderr
    run_cli("convert", HF, tmp_path / "one", "--to", "megatron", "--tp", "2", "-q")
    assert folder_digest(tmp_path / "out") == folder_digest(tmp_path / "one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "out"]


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_workers_that_are_not_a_count_are_refused(tmp_path, value):
    result = run_cli("convert", HF, tmp_path / "out", "--to", "dcp", "--workers", value, expect=2)
    assert f"--workers '{value}' is not a count" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["--to", "megatron", "--tp", "2"],
    ["--to", "dcp"],
])
def test_torchrun_ranks_with_workers_write_the_same_bytes(tmp_path, argv):
    """Two torchrun ranks ("nodes") with two workers each: four processes share the files, byte for byte."""
    run_cli("convert", HF, tmp_path / "one", *argv, "-q")
    plan = Converter(HF, tmp_path / "x", **({"to": "megatron", "tp": 2} if "--tp" in argv else {"to": "dcp"})).plan()
    assert any(len(owners) > 1 for owners in assign_shares(plan.files, 4, unit=4096).values())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "vlconvert",
           "convert", str(HF), str(tmp_path / "four"), *argv, "--workers", "2", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("rendezvous", "Address already in use")):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)  # the free port was taken
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "four/vlconvert-manifest.json").read_bytes() == \
        (tmp_path / "one/vlconvert-manifest.json").read_bytes()
    assert folder_digest(tmp_path / "four") == folder_digest(tmp_path / "one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["four", "one"]


def test_a_worker_of_another_rank_killed_ends_every_rank_in_one_line(tmp_path):
    """torchrun 2 x --workers 2: rank 1's worker is killed; both ranks stop at the same exchange, each with one
    line naming it (before: rank 0 waited on gloo and died of a lost connection), nothing published."""
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        from vlconvert import cli
        from vlconvert.engine import Converter
        start, write = os.getpid(), Converter._write
        def failing(self, stage, plan, advance):
            if os.environ["RANK"] == "1" and os.getpid() != start:  # the worker rank 1 forked
                os.kill(os.getpid(), signal.SIGKILL)
            return write(self, stage, plan, advance)
        Converter._write = failing
        sys.argv = ["vlconvert", *sys.argv[1:]]
        cli.main()
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           "convert", str(HF), str(tmp_path / "out"), "--to", "dcp", "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)
    if "rendezvous" in proc.stderr or "Address already in use" in proc.stderr:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    line = "worker 1 of rank 1 stopped before finishing its share (killed by SIGKILL)"
    assert proc.returncode != 0
    assert errors == [f"error: nothing was published: {line}", f"error: {line}"], proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kill.py"]


def test_auto_workers_under_torchrun(tmp_path, monkeypatch):
    """Several ranks per node already use its cores: auto stays at 1; one rank per node forks by its part."""
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda _pid: set(range(16)))
    conv = Converter(HF, tmp_path / "out", to="dcp", workers="auto")
    monkeypatch.setattr(workers, "BYTES_PER_WORKER", 2**16)  # the fixture is a few hundred KiB
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert conv.worker_count() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    total = sum(f.nbytes for f in conv.plan().files)
    assert conv.worker_count() == min(8, -(-(total // 4) // 2**16)) > 1
    monkeypatch.delenv("WORLD_SIZE")
    assert conv.worker_count() == min(8, -(-total // 2**16))


def test_a_fork_the_system_refuses_ends_in_one_line(tmp_path, monkeypatch):
    """A process limit (EAGAIN) on the second fork: the first worker is stopped, one line, nothing written."""
    forks = []

    def fork() -> int:
        forks.append(1)
        if len(forks) == 2:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork()

    real_fork = workers.os.fork
    monkeypatch.setattr(workers.os, "fork", fork)
    with pytest.raises(UserError, match=r"could not start worker 2 of 3 \(Resource temporarily unavailable\): give "
                                        "fewer --workers"):
        Converter(HF, tmp_path / "out", to="dcp", workers=3).run()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_count_of_workers_past_four_per_core_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    result = run_cli("convert", HF, tmp_path / "out", "--to", "dcp", "--workers", "17", expect=2)
    assert "--workers 17 is more than 16 (4 per core on this machine's 4)" in result.output
    assert not (tmp_path / "out").exists()
    assert Converter(HF, tmp_path / "out", to="dcp", workers=16).workers == 16


def test_auto_workers_follow_size_and_cores(monkeypatch):
    for cores, size, expected in [(2, 10 * 2**30, 2), (16, 17 * 2**30, 8), (16, 3 * 2**30 + 1, 4), (1, 5 * 2**30, 1),
                                  (16, 2**20, 1), (64, 500 * 2**30, 8), (6, 40 * 2**30, 3), (4, 40 * 2**30, 2)]:
        monkeypatch.setattr(workers.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert workers.auto_workers(size) == expected, (cores, size)


def test_max_memory_keeps_auto_at_one_process(tmp_path):
    conv = Converter(HF, tmp_path / "out", to="dcp", workers="auto", max_memory="4GiB")
    assert conv.worker_count() == 1
    assert Converter(HF, tmp_path / "out", to="dcp", workers=5).worker_count() == 5
