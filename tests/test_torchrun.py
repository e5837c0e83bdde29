"""``torchrun -m vlconvert convert ...``: files split over ranks (and "nodes"), output byte-identical to one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import folder_digest, run_cli

from vlconvert.engine import PlannedFile
from vlconvert.splitting import SPLIT_BYTES_ENV, assign_shares

FIX = Path(__file__).resolve().parents[1] / "fixtures"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(launcher_args: list[str], argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "vlconvert", *argv, "-q"]
    env = {**ENV, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("rendezvous", "Address already in use")):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)  # the free port was taken
    return proc


@pytest.mark.parametrize("argv", [
    ["{hf}", "--to", "dcp"],
    ["{dcp}", "--to", "hf", "--assets-dir", "{hf}", "--max-shard-size", "300KB"],
    ["{hf}", "--to", "megatron", "--tp", "2", "--ep", "2"],
])
def test_two_ranks_write_the_same_bytes_as_one_process(tmp_path, argv):
    hf = FIX / "tiny-moe"
    run_cli("convert", hf, tmp_path / "dcp", "--to", "dcp", "-q")
    args = [a.format(hf=hf, dcp=tmp_path / "dcp") for a in argv]
    run_cli("convert", args[0], tmp_path / "one", *args[1:], "-q")
    proc = torchrun(["--standalone", "--nproc-per-node=2"], ["convert", args[0], str(tmp_path / "two"), *args[1:]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert folder_digest(tmp_path / "two") == folder_digest(tmp_path / "one")
    run_cli("verify", "--manifest", tmp_path / "two", "-q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcp", "one", "two"]  # no stage, lock or journal left


@pytest.mark.parametrize("argv", [
    ["{hf}", "--to", "dcp"],
    ["{dcp}", "--to", "hf", "--assets-dir", "{hf}", "--max-shard-size", "700KB"],
    ["{hf}", "--to", "megatron", "--tp", "2"],
    ["{hf}", "--to", "torch_dist"],
])
@pytest.mark.parametrize("launch", ["torchrun", "workers"])
def test_three_ranks_share_files_byte_for_byte(tmp_path, argv, launch):
    """With shares of a few KiB (VLCONVERT_SPLIT_BYTES), three ranks of torchrun, or three processes of
    ``convert --workers 3``, write parts of the same files: zip records and pieces cross the boundaries;
    the output and its manifest equal one process's."""
    from vlconvert.engine import Converter

    hf = FIX / "tiny-moe"
    run_cli("convert", hf, tmp_path / "dcp", "--to", "dcp", "-q")
    args = [a.format(hf=hf, dcp=tmp_path / "dcp") for a in argv]
    run_cli("convert", args[0], tmp_path / "one", *args[1:], "-q")
    options = {"to": args[2], **({"tp": 2} if "--tp" in args else {}),
               **({"assets_dir": hf, "max_shard_size": "700KB"} if "--assets-dir" in args else {})}
    plan = Converter(args[0], tmp_path / "x", **options).plan()
    shares = assign_shares(plan.files, 3, unit=4096)
    assert any(len(owners) > 1 for owners in shares.values())  # files really are shared
    argv = ["convert", args[0], str(tmp_path / "three"), *args[1:]]
    if launch == "torchrun":
        proc = torchrun(["--standalone", "--nproc-per-node=3"], argv, env={SPLIT_BYTES_ENV: "4096"})
    else:
        proc = subprocess.run([sys.executable, "-m", "vlconvert", *argv, "--workers", "3", "-q"], capture_output=True,
                              text=True, env={**ENV, SPLIT_BYTES_ENV: "4096"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(tmp_path / "three")  # rank 0 alone prints
    assert folder_digest(tmp_path / "three") == folder_digest(tmp_path / "one")
    assert (tmp_path / "three/vlconvert-manifest.json").read_bytes() == \
        (tmp_path / "one/vlconvert-manifest.json").read_bytes()
    run_cli("verify", "--manifest", tmp_path / "three", "-q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcp", "one", "three"]  # no stage, lock or journal left


def shared_files(to: list[str], ranks: int, unit: int) -> int:
    """How many of the output files of tiny-moe ``to`` the ranks share at shares of ``unit`` bytes."""
    from vlconvert.engine import Converter

    options = {"tp": 2, "ep": 2} if "--tp" in to else {}
    plan = Converter(FIX / "tiny-moe", Path("/nonexistent/out"), to=to[1], **options).plan()
    return sum(len(owners) > 1 for owners in assign_shares(plan.files, ranks, unit=unit).values())


MG = ["--to", "megatron", "--tp", "2", "--ep", "2"]


@pytest.mark.parametrize(("to", "split"), [(MG, None), (["--to", "dcp"], "4096")])
def test_two_nodes_with_a_rendezvous_endpoint(tmp_path, to, split):
    """Two launchers (one per "node", one rank each) on a shared folder; with ``split``, they share a file."""
    if split:
        assert shared_files(to, 2, int(split)) >= 1
    env = {**ENV, **({SPLIT_BYTES_ENV: split} if split else {})}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["convert", str(FIX / "tiny-moe"), str(tmp_path / "out"), *to]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=vlconvert-test"]
    nodes = [subprocess.Popen([*launch, f"--node-rank={i}", "-m", "vlconvert", *argv, "-q"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [(n.wait(timeout=600), n.stderr.read()) for n in nodes]
    assert all(code == 0 for code, _ in results), [e[-2000:] for _, e in results]
    run_cli("convert", FIX / "tiny-moe", tmp_path / "one", *to, "-q")
    assert folder_digest(tmp_path / "out") == folder_digest(tmp_path / "one")


def test_nodes_that_plan_differently_are_refused(tmp_path):
    """A node launched with another VLCONVERT_SPLIT_BYTES would write other byte ranges than rank 0 expects:
    gaps or overlaps no checksum catches. Every rank stops with one line; nothing is published."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["convert", str(FIX / "tiny-moe"), str(tmp_path / "out"), "--to", "dcp"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=vlconvert-differ"]
    envs = [ENV, {**ENV, SPLIT_BYTES_ENV: "4096"}]
    nodes = [subprocess.Popen([*launch, f"--node-rank={i}", "-m", "vlconvert", *argv, "-q"], env=envs[i],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [(n.wait(timeout=600), n.stderr.read()) for n in nodes]
    assert all(code != 0 for code, _ in results)
    assert all("planned another output than rank 0" in err for _, err in results), [e[-1500:] for _, e in results]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_refusal_reaches_every_rank_and_nothing_is_published(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("not theirs")  # an empty folder would be filled (issue 22)
    proc = torchrun(["--standalone", "--nproc-per-node=2"],
                    ["convert", str(FIX / "tiny-moe"), str(tmp_path / "out"), "--to", "dcp"])
    assert proc.returncode != 0 and "already exists" in proc.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_a_failure_under_json_is_one_record_on_stdout(tmp_path):
    """Every rank fails together; rank 0 alone prints the --json record, so stdout holds one JSON object."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("not theirs")
    proc = torchrun(["--standalone", "--nproc-per-node=2"],
                    ["convert", str(FIX / "tiny-moe"), str(tmp_path / "out"), "--to", "dcp", "--json"])
    assert proc.returncode != 0
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(records) == 1 and records[0]["ok"] is False and "already exists" in records[0]["error"], proc.stdout


def test_files_are_split_by_bytes():
    """Files laid end to end, cut into runs of equal bytes: a cut near a file boundary keeps the file whole,
    another splits the file at a multiple of the unit; the last share of a file runs to its real end."""
    files = [PlannedFile(f"f{i}", [("t", (n,), torch.uint8)]) for i, n in enumerate([5000, 5000, 5000, 2500])]
    assert assign_shares(files, 1) == {f"f{i}": [(0, 0, None)] for i in range(4)}
    two = assign_shares(files, 2, unit=64)
    assert two == {"f0": [(0, 0, None)], "f1": [(0, 0, 3776), (1, 3776, None)], "f2": [(1, 0, None)],
                   "f3": [(1, 0, None)]}
    eight = assign_shares(files, 8, unit=64)
    load = [0] * 8
    for f in files:
        owners = eight[f.name]
        for (rank, start, stop), nxt in zip(owners, [*owners[1:], None], strict=True):
            assert stop == (nxt[1] if nxt else None) and start % 64 == 0
            load[rank] += (stop or f.nbytes) - start
    assert max(load) - min(load) <= 2 * 64 and sum(load) == 17500
    # two equal files over two ranks stay whole; over three, each is cut once
    same = [PlannedFile(n, [("t", (8000,), torch.uint8)]) for n in "ab"]
    assert assign_shares(same, 2, unit=64) == {"a": [(0, 0, None)], "b": [(1, 0, None)]}
    assert assign_shares(same, 3, unit=64) == {"a": [(0, 0, 5312), (1, 5312, None)],
                                               "b": [(1, 0, 2688), (2, 2688, None)]}


@pytest.mark.parametrize(("to", "split"), [(["--to", "dcp"], None), (MG, None), (["--to", "dcp"], "4096")])
def test_torchrun_resumes_a_killed_run_with_the_same_bytes(tmp_path, to, split):
    """A run killed half-way (SIGKILL) is finished by ``torchrun --resume`` on 2 ranks: the journaled files
    are kept (rank 0 tells the other rank which), the rest are written (``split``: the ranks share them, the
    partial files the killed run left are discarded), and the bytes equal a clean run."""
    import signal

    from test_reliability import _killed_run

    from vlconvert import publish

    out = tmp_path / "out"
    argv = ["convert", str(FIX / "tiny-moe"), str(out), *to]
    run_cli(*argv[:2], tmp_path / "one", *to, "-q")
    total = sum(e["size"] for e in publish.read_manifest(tmp_path / "one").values())
    assert _killed_run([*argv, "-q"], total // 2) == -signal.SIGKILL
    journaled = publish.staging_path(out).parent / f".{out.name}.vlconvert-journal"
    kept = len(journaled.read_text().splitlines()) - 1  # the first line is the run header
    assert kept > 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "vlconvert",
           *argv, "--resume"]
    if split:  # the file the killed run left half written is one the ranks share now
        from vlconvert.engine import Converter

        plan = Converter(FIX / "tiny-moe", tmp_path / "x", to=to[1]).plan()
        assert any(len(owners) > 1 for owners in assign_shares(plan.files, 2, unit=int(split)).values())
    if split:  # the file the killed run left half written is one the ranks share now
        assert shared_files(to, 2, int(split)) >= 1
    env = {**ENV, **({SPLIT_BYTES_ENV: split} if split else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{kept} finished files kept" in proc.stdout + proc.stderr
    assert folder_digest(out) == folder_digest(tmp_path / "one")
    run_cli("verify", "--manifest", out, "-q")
