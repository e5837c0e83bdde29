"""The inputs of a run are every file and folder it reads, after resolving every symlink on the way.

Issue 20, items 1-5, 10 and 12: `--merge-lora`, a Hugging Face cache snapshot's blobs, Megatron / verl / DCP
files behind symlinks, `retag-think --data` / `--data-out`, `plan --target`, and asset files that link out
of the checkpoint. Each output that equals, contains or lies inside an input is refused with one line
before anything is written, with or without `--overwrite`; the inputs are left byte for byte as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from helpers import folder_digest, load_hf_tensors, run_cli

from vlconvert.cli import main

FIX = Path(__file__).resolve().parents[1] / "fixtures"
TIED = FIX / "tiny-dense-tied"


def one_error_line(*args: str, expect: int = 1) -> str:
    """Run the CLI, expect exactly one `error:` line and exit code ``expect``; return the line."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, (result.exit_code, result.output)
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output and "internal error" not in lines[0]
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (links as their target, files as their sha256): proves nothing moved."""
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def refused(argv: list, *watched: Path, words: tuple[str, ...] = ("input",)) -> None:
    """``argv`` is refused with one line, with and without --overwrite; ``watched`` stay as they were."""
    before = {p: tree(p) if p.is_dir() else p.read_bytes() for p in watched}
    for extra in ([], ["--overwrite"]):
        if "--overwrite" in argv and extra:
            continue
        line = one_error_line(*argv, *extra, "-q")
        assert any(w in line for w in words), (argv, line)
    for p in watched:
        assert (tree(p) if p.is_dir() else p.read_bytes()) == before[p], p


# ------------------------------------------------------------------------------------ 1. --merge-lora
@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A real PEFT adapter of the tied dense fixture."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    folder = tmp_path_factory.mktemp("lora") / "adapter"
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(TIED, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                                            target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(folder)
    return folder


def test_merge_lora_adapter_is_an_input(adapter, tmp_path):
    ad = tmp_path / "adapter"
    shutil.copytree(adapter, ad)
    refused(["convert", TIED, ad, "--to", "hf", "--merge-lora", ad, "--overwrite"], ad)
    refused(["convert", TIED, ad, "--to", "hf", "--merge-lora", ad], ad)
    refused(["convert", TIED, ad / "out", "--to", "hf", "--merge-lora", ad], ad)  # inside the adapter
    project = tmp_path / "P"
    shutil.copytree(adapter, project / "adapter")
    refused(["convert", TIED, project, "--to", "hf", "--merge-lora", project / "adapter", "--overwrite"], project)
    # through a symlink to the adapter: the same folder
    (tmp_path / "link").symlink_to(ad)
    refused(["convert", TIED, ad, "--to", "dcp", "--merge-lora", tmp_path / "link", "--overwrite"], ad)
    run_cli("convert", TIED, tmp_path / "merged", "--to", "hf", "--merge-lora", ad, "-q")  # still merges


# ------------------------------------------------------------------------------- 2. HF cache snapshot
def make_cache(root: Path, source: Path = TIED) -> Path:
    """An HF-cache-style repository: snapshots/REV/* are relative links into ../../blobs/<sha256>."""
    repo = root / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, repo / "blobs" / digest)
        (snap / path.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snap


def test_cache_snapshot_blobs_are_inputs(tmp_path):
    snap = make_cache(tmp_path)
    repo = snap.parents[1]
    refused(["convert", snap, repo / "blobs", "--to", "hf", "--overwrite"], repo)
    refused(["convert", snap, repo / "blobs" / "new", "--to", "hf"], repo)
    refused(["convert", snap, repo, "--to", "dcp", "--overwrite"], repo)
    refused(["convert", TIED, repo / "blobs", "--to", "hf", "--assets-dir", snap, "--overwrite"], repo)
    # links inside the repository are read as usual, assets included
    run_cli("convert", snap, tmp_path / "out", "--to", "hf", "-q")
    assert load_hf_tensors(tmp_path / "out").keys() == load_hf_tensors(TIED).keys()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (TIED / "tokenizer.json").read_bytes()


# ---------------------------------------------------------------- 3. Megatron, verl and DCP behind links
@pytest.fixture(scope="module")
def megatron(tmp_path_factory) -> Path:
    mg = tmp_path_factory.mktemp("mg") / "mg"
    run_cli("convert", TIED, mg, "--to", "megatron", "--tp", "2", "-q")
    return mg


def test_megatron_release_behind_a_link_is_an_input(megatron, tmp_path):
    mg, elsewhere = tmp_path / "mg", tmp_path / "elsewhere"
    shutil.copytree(megatron, mg)
    elsewhere.mkdir()
    (mg / "release").rename(elsewhere / "rel")
    (mg / "release").symlink_to(elsewhere / "rel")
    refused(["convert", mg, elsewhere / "rel", "--to", "hf", "--assets-dir", TIED, "--overwrite"], elsewhere)
    refused(["convert", mg, elsewhere, "--to", "hf", "--assets-dir", TIED, "--overwrite"], elsewhere)
    refused(["convert", mg, elsewhere / "rel" / "x", "--to", "hf", "--assets-dir", TIED], elsewhere)
    run_cli("convert", mg, tmp_path / "hf", "--to", "hf", "--assets-dir", TIED, "-q")  # read through the link


def test_megatron_rank_folder_behind_a_link_is_an_input(megatron, tmp_path):
    mg, elsewhere = tmp_path / "mg", tmp_path / "elsewhere"
    shutil.copytree(megatron, mg)
    elsewhere.mkdir()
    rank = mg / "release" / "mp_rank_01"
    rank.rename(elsewhere / "rank1")
    rank.symlink_to(elsewhere / "rank1")
    refused(["convert", mg, elsewhere / "rank1", "--to", "hf", "--assets-dir", TIED, "--overwrite"], elsewhere)
    refused(["reshard", mg, elsewhere, "--tp", "1", "--overwrite"], elsewhere)


def test_dcp_metadata_behind_a_link_is_an_input(tmp_path):
    d, elsewhere = tmp_path / "dcp", tmp_path / "elsewhere"
    dcp.save({k: v.float() for k, v in load_hf_tensors(TIED).items()}, checkpoint_id=str(d))
    elsewhere.mkdir()
    (d / ".metadata").rename(elsewhere / "meta")
    (d / ".metadata").symlink_to(elsewhere / "meta")
    refused(["convert", d, elsewhere, "--to", "hf", "--assets-dir", TIED, "--overwrite"], elsewhere)


def test_verl_rank_file_behind_a_link_is_an_input(tmp_path):
    actor, elsewhere = tmp_path / "global_step_1" / "actor", tmp_path / "elsewhere"
    actor.mkdir(parents=True)
    elsewhere.mkdir()
    torch.save(load_hf_tensors(TIED), elsewhere / "rank0.pt")
    (actor / "model_world_size_1_rank_0.pt").symlink_to(elsewhere / "rank0.pt")
    shutil.copytree(TIED, actor / "huggingface", ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    refused(["convert", actor, elsewhere, "--to", "hf", "--overwrite"], elsewhere)


# -------------------------------------------------------------------------------- 4-5. retag-think data
@pytest.fixture()
def retag_src(tmp_path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(TIED, src)
    return src


def test_retag_data_inside_out_is_an_input(retag_src, tmp_path):
    out = tmp_path / "out"
    run_cli("retag-think", retag_src, "--out", out, "-q")
    data = out / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "assistant", "content": "<think>a</think>b"}]}) + "\n")
    before = tree(out)
    line = one_error_line("retag-think", retag_src, "--out", out, "--overwrite", "--data", data,
                          "--data-out", tmp_path / "x.jsonl", "-q")
    assert "--data" in line
    assert tree(out) == before and not (tmp_path / "x.jsonl").exists()


def test_retag_data_out_is_checked_against_src_and_out(retag_src, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "assistant", "content": "<think>a</think>b"}]}) + "\n")
    shard = retag_src / "model-00001-of-00003.safetensors"
    before = tree(retag_src)
    for argv in (["--in-place", "--overwrite", "--data-out", shard],
                 ["--in-place", "--data-out", retag_src / "new.jsonl"],
                 ["--out", tmp_path / "out", "--data-out", retag_src / "new.jsonl"],
                 ["--out", tmp_path / "out", "--data-out", tmp_path / "out" / "new.jsonl"]):
        line = one_error_line("retag-think", retag_src, "--data", data, *argv, "-q")
        assert "--data-out" in line, line
        assert tree(retag_src) == before and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- 10. plan
def test_plan_target_equal_to_source_is_an_input_and_not_probed(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(TIED, src)
    before = tree(src)
    result = CliRunner().invoke(main, ["plan", "--source", str(src), "--target", str(src), "--to", "hf", "--json"])
    assert result.exit_code == 1, result.output  # a failed check
    data = json.loads(result.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    target = [c for c in checks.values() if "input" in c["message"]]
    assert target and not target[0]["ok"], data["checks"]
    assert "unless --overwrite" not in json.dumps(data["checks"])  # it would not proceed with --overwrite
    assert tree(src) == before  # no disk probe written into the input


# ------------------------------------------------------------------------------------- 12. assets
def test_asset_symlink_leaving_the_checkpoint_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    secret.chmod(0o600)
    for flag in ("SRC", "--assets-dir"):
        src = tmp_path / f"src-{flag}"
        shutil.copytree(TIED, src)
        (src / "merges.txt").unlink()
        (src / "merges.txt").symlink_to(secret)
        argv = ["convert", src, tmp_path / "out", "--to", "hf"] if flag == "SRC" else \
            ["convert", TIED, tmp_path / "out", "--to", "hf", "--assets-dir", src]
        line = one_error_line(*argv, "-q")
        assert "merges.txt" in line and "outside" in line, line
        assert not (tmp_path / "out").exists()


def test_output_files_are_never_wider_than_their_source(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(TIED, src)
    (src / "vocab.json").chmod(0o600)
    run_cli("convert", src, tmp_path / "out", "--to", "hf", "-q")
    assert stat.S_IMODE((tmp_path / "out" / "vocab.json").stat().st_mode) & 0o077 == 0
    assert folder_digest(tmp_path / "out")["vocab.json"] == folder_digest(TIED)["vocab.json"]


def test_doctor_target_holding_the_config_fails(tmp_path):
    shutil.copytree(TIED, tmp_path / "m")
    result = CliRunner().invoke(main, ["doctor", "--target", str(tmp_path / "m"), "--config",
                                       str(tmp_path / "m" / "config.json"), "--json"])
    assert result.exit_code == 1, result.output
    assert "contains the input --config" in result.output


# ------------------------------------------------------- 1. the readers record what they open
def test_an_input_no_option_names_is_still_an_input(tmp_path, monkeypatch):
    """The readers record every file and folder they open, and publishing refuses a DST overlapping any of them
    whatever the command declared: with ``Converter.inputs`` naming SRC alone (a command that forgets an
    input), a Bridge checkpoint's hf_model_id folder (its config and tokenizer) and a ``--config`` reached
    through a symlink are still refused as outputs, and left as they were."""
    from vlconvert.engine import Converter

    hfm = tmp_path / "hfm"
    shutil.copytree(FIX / "tiny-dense-untied", hfm)
    run_cli("convert", hfm, tmp_path / "td", "--to", "torch_dist", "-q")
    monkeypatch.setattr(Converter, "inputs", lambda self: {"SRC": self.source.folder})
    refused(["convert", tmp_path / "td", hfm, "--to", "hf", "--overwrite"], hfm, words=("this run reads",))
    refused(["convert", tmp_path / "td", hfm / "out", "--to", "dcp"], hfm, words=("this run reads",))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(TIED / "config.json", elsewhere / "config.json")
    (tmp_path / "cfg.json").symlink_to(elsewhere / "config.json")
    refused(["convert", TIED, elsewhere, "--to", "dcp", "--config", tmp_path / "cfg.json", "--overwrite"],
            elsewhere, words=("this run reads",))
    run_cli("convert", tmp_path / "td", tmp_path / "hf", "--to", "hf", "-q")  # still converts
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (hfm / "tokenizer.json").read_bytes()


def test_publishing_checks_again_what_was_read_while_writing(tmp_path):
    """The overlap check runs again just before publishing, over every file read by then: a file of the old
    DST opened by a reader during the run stops ``--overwrite`` from replacing it; nothing is published."""
    from vlconvert import publish
    from vlconvert.errors import UserError
    from vlconvert.sources import open_source

    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    source = open_source(TIED)
    try:
        with pytest.raises(UserError) as caught:
            with publish.staged_output(dst, inputs={"SRC": TIED}, overwrite=True) as stage:
                publish.write_bytes(stage.path / "a", b"x")
                with publish.open_input(dst / "notes.txt") as f:  # a reader opens it mid-run
                    f.read()
        assert "this run reads" in str(caught.value) and "notes.txt" in str(caught.value), caught.value
    finally:
        source.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dst / "notes.txt").read_text() == "mine"
