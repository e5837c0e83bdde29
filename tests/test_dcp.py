"""hf-to-dcp and dcp-to-hf: bit-exact round trips, loading with DCP/FSDP2, logits, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import folder_digest, load_hf_tensors, run_cli, run_cli_json, tensor_bytes
from transformers import AutoConfig, AutoModelForImageTextToText

from vlconvert.dcp_convert import dcp_to_hf, hf_to_dcp
from vlconvert.errors import UserError
from vlconvert.layouts.hf import asset_files
from vlconvert.models.qwen3vl import runtime_experts_layout

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
ALL = ["tiny-dense-tied", "tiny-dense-untied", "tiny-moe", "tiny-moe-tf5"]
WORKER = Path(__file__).resolve().parent / "dist" / "fsdp2_worker.py"
IDS = torch.randint(0, 2000, (2, 9), generator=torch.Generator().manual_seed(7))


def released(tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Experts of ``tensors`` (stored in ``layout``) in the released orientation."""
    if layout == "released":
        return tensors
    return {k: (v.transpose(1, 2).contiguous() if k.endswith(("gate_up_proj", "down_proj")) else v)
            for k, v in tensors.items()}


def fixture_layout(name: str) -> str:
    return "transformers5" if name.endswith("tf5") else "released"


def logits(folder: Path) -> torch.Tensor:
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def torchrun(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("rendezvous", "Address already in use", "Connection")):
        # the standalone rendezvous picks a free port that another process can take first: run once more
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def dcps(tmp_path_factory) -> dict[str, Path]:
    """Every fixture converted to DCP once with default options."""
    base = tmp_path_factory.mktemp("dcp")
    out = {}
    for name in ALL:
        hf_to_dcp(FIX / name, base / name)
        out[name] = base / name
    return out


@pytest.mark.parametrize("name", ALL)
def test_round_trip_is_bit_exact_and_assets_are_copied(name, dcps, tmp_path):
    source_digest = folder_digest(FIX / name)
    out = tmp_path / "hf"
    summary = dcp_to_hf(dcps[name], out, assets_dir=FIX / name, max_shard_size="400KB")
    original = released(load_hf_tensors(FIX / name), fixture_layout(name))
    result = load_hf_tensors(out)
    assert set(result) == set(original)
    for key, tensor in original.items():
        assert result[key].dtype == tensor.dtype and result[key].shape == tensor.shape, key
        assert tensor_bytes(result[key]) == tensor_bytes(tensor), key
    # tied models get no lm_head, untied ones keep theirs
    assert ("lm_head.weight" in result) == (name != "tiny-dense-tied")
    # every non-weight file copied byte for byte, and reported
    for path in asset_files(FIX / name):
        rel = path.relative_to(FIX / name)
        assert (out / rel).read_bytes() == path.read_bytes(), rel
    assert sorted(summary["assets_copied"]) == sorted(str(p.relative_to(FIX / name)) for p in asset_files(FIX / name))
    # a correct index: every tensor listed in the file that holds it, total_size = tensor bytes
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(summary["files"]) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in result.values())
    for key, fname in index["weight_map"].items():
        assert key in load_hf_tensors_file(out / fname)
    assert folder_digest(FIX / name) == source_digest  # input untouched


def load_hf_tensors_file(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("name", ALL)
def test_round_trip_loads_with_from_pretrained_and_gives_identical_logits(name, dcps, tmp_path):
    dcp_to_hf(dcps[name], tmp_path / "hf", assets_dir=FIX / name)
    assert torch.equal(logits(tmp_path / "hf"), logits(FIX / name))


@pytest.mark.parametrize("name", ALL)
def test_dcp_loads_into_meta_built_model_state_dict_with_exact_logits(name, dcps):
    config = AutoConfig.from_pretrained(FIX / name)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    reference = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    for buf, ref in zip(model.buffers(), reference.buffers(), strict=True):
        buf.copy_(ref)  # non-persistent rotary buffers are never in a checkpoint
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(dcps[name]))  # strict: every model key must be in the DCP
    if config.tie_word_embeddings:
        model.tie_weights()
    hf = AutoModelForImageTextToText.from_pretrained(FIX / name, dtype=torch.bfloat16)
    for key, tensor in hf.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=IDS).logits, hf.eval()(input_ids=IDS).logits)


def test_dcp_is_readable_by_torch_format_utils(dcps, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(dcps["tiny-moe"]), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    runtime = released(load_hf_tensors(FIX / "tiny-moe"), "released")
    if runtime_experts_layout() == "transformers5":
        runtime = released(runtime, "transformers5")  # transposing twice is the identity
    assert set(full) == set(runtime)
    for key, tensor in runtime.items():
        assert torch.equal(full[key], tensor), key


def test_fsdp2_two_ranks_load_dcp_and_match_logits(dcps, tmp_path):
    for name in ("tiny-dense-tied", "tiny-moe"):
        torchrun(2, "load", str(FIX / name), str(dcps[name]), str(tmp_path / f"{name}.pt"))
        got = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        hf = AutoModelForImageTextToText.from_pretrained(FIX / name, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            assert torch.equal(got, hf(input_ids=IDS).logits.float()), name


def test_fsdp2_training_checkpoint_three_ranks_to_hf(tmp_path):
    """A real FSDP2 save (3 ranks: uneven chunks, fp32 master weights, optimizer state,
    torch.compile's _orig_mod. prefix, nested {"model", "optimizer"}) back to the original bf16."""
    train = tmp_path / "train"
    torchrun(3, "save", str(FIX / "tiny-moe"), str(train))
    summary = run_cli_json("dcp-to-hf", train, tmp_path / "hf", "--assets-dir", FIX / "tiny-moe")
    assert summary["prefix"] == "model."  # after stripping "_orig_mod."
    assert summary["dropped_non_model_tensors"] > 0 and summary["dtype"] == "bfloat16"
    original = load_hf_tensors(FIX / "tiny-moe")
    result = load_hf_tensors(tmp_path / "hf")
    assert set(result) == set(original)
    for key, tensor in original.items():
        assert tensor_bytes(result[key]) == tensor_bytes(tensor), key


def test_fsdp2_row_chunks_put_together_as_bytes_equal_the_torch_path(tmp_path, monkeypatch):
    """A real FSDP2 save cuts each tensor in row chunks, one per rank: rows that cross chunks, a TP rank's columns
    and experts turned from [in, out] to [out, in] are put together as bytes (``Source.row_bytes`` over the chunks'
    spans, no torch); every file written equals what torch's operations write (the byte path switched off)."""
    from vlconvert.sources.base import Source
    from vlconvert.sources.dcp import DCPSource
    from vlconvert.sources.hf import HFSource
    from vlconvert.sources.megatron import MegatronSource

    train = tmp_path / "train"
    torchrun(3, "save", str(FIX / "tiny-moe"), str(train))
    routes = {"megatron": ["--to", "megatron", "--tp", "2", "--ep", "2"],
              "hf": ["--to", "hf", "--experts-layout", "transformers5"]}
    taken: list[bool] = []
    chunked = Source.row_bytes  # what the DCP reader uses

    def spy(self, *args):
        rows = chunked(self, *args)
        taken.append(rows is not None)
        return rows

    monkeypatch.setattr(Source, "row_bytes", spy)
    for name, args in routes.items():
        run_cli("convert", train, tmp_path / f"{name}-bytes", *args, "--dtype", "keep", "--assets-dir",
                FIX / "tiny-moe", "-q")
    assert any(taken)
    for cls in (Source, DCPSource, HFSource, MegatronSource):
        monkeypatch.setattr(cls, "row_bytes", lambda self, *args: None)
        monkeypatch.setattr(cls, "expert_bytes", lambda self, *args: None)
    for name, args in routes.items():
        run_cli("convert", train, tmp_path / f"{name}-torch", *args, "--dtype", "keep", "--assets-dir",
                FIX / "tiny-moe", "-q")
        assert folder_digest(tmp_path / f"{name}-bytes") == folder_digest(tmp_path / f"{name}-torch"), name


def test_prefix_and_dtype_and_experts_layout_options(tmp_path):
    out = tmp_path / "dcp"
    hf_to_dcp(FIX / "tiny-moe", out, prefix="model.model.", dtype="fp32", experts_layout="released")
    sd = {"model": {}}
    meta = dcp.FileSystemReader(str(out)).read_metadata()
    assert all(k.startswith("model.model.") for k in meta.state_dict_metadata)
    original = load_hf_tensors(FIX / "tiny-moe")
    sd = {"model": {k[len("model."):]: torch.empty(v.size, dtype=v.properties.dtype)
                    for k, v in meta.state_dict_metadata.items()}}
    dcp.load(sd, checkpoint_id=str(out))  # nested state dict: DCP's planner_data unflattens it
    for key, tensor in original.items():
        got = sd["model"]["model." + key]
        assert got.dtype == torch.float32 and torch.equal(got, tensor.float()), key
    back = dcp_to_hf(out, tmp_path / "hf", assets_dir=FIX / "tiny-moe", experts_layout="transformers5")
    assert back["prefix"] == "model.model." and back["dtype"] == "bfloat16"
    tf5 = load_hf_tensors(FIX / "tiny-moe-tf5")
    result = load_hf_tensors(tmp_path / "hf")
    for key, tensor in tf5.items():
        assert tensor_bytes(result[key]) == tensor_bytes(tensor), key


def test_dcp_with_checkpoint_wrapper_keys_and_fp32(tmp_path):
    """Raw state dicts of activation-checkpointed layers carry _checkpoint_wrapped_module."""
    original = load_hf_tensors(FIX / "tiny-dense-untied")
    wrapped = {}
    for key, tensor in original.items():
        key = key.replace("layers.0.", "layers.0._checkpoint_wrapped_module.")
        wrapped[key] = tensor.float()
    dcp.save({"model": wrapped}, checkpoint_id=str(tmp_path / "dcp"))
    summary = dcp_to_hf(tmp_path / "dcp", tmp_path / "hf", assets_dir=FIX / "tiny-dense-untied", dtype="keep")
    assert summary["dtype"] == "keep"
    result = load_hf_tensors(tmp_path / "hf")
    for key, tensor in original.items():
        assert result[key].dtype == torch.float32 and torch.equal(result[key], tensor.float()), key


# ----------------------------------------------------------------------------------------- errors
def test_cli_json_quiet_and_progress(tmp_path):
    summary = run_cli_json("hf-to-dcp", FIX / "tiny-dense-tied", tmp_path / "a")
    assert summary["tensors"] == len(load_hf_tensors(FIX / "tiny-dense-tied")) + 1  # + tied lm_head
    quiet = run_cli("hf-to-dcp", FIX / "tiny-dense-tied", tmp_path / "b", "--quiet")
    assert quiet.output == f"{(tmp_path / 'b').absolute()}\n"  # -q: only the result's path (issue 22, item 11)
    loud = run_cli("dcp-to-hf", tmp_path / "a", tmp_path / "c", "--assets-dir", FIX / "tiny-dense-tied", "-v")
    assert "copied tokenizer.json" in loud.output and "tensors" in loud.output
    plain = run_cli("dcp-to-hf", tmp_path / "a", tmp_path / "d", "--assets-dir", FIX / "tiny-dense-tied")
    assert "copied tokenizer.json" not in plain.output and "assets copied" in plain.output  # the list with -v only


def error_line(*args: str) -> str:
    result = run_cli(*args, expect=1)
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_existing_output_refused_then_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "already exists" in error_line("hf-to-dcp", FIX / "tiny-dense-tied", out)
    assert (out / "keep.txt").exists()
    run_cli("hf-to-dcp", FIX / "tiny-dense-tied", out, "--overwrite", "-q")
    assert (out / ".metadata").exists() and not (out / "keep.txt").exists()


def test_bad_inputs_give_one_clear_line(tmp_path):
    assert "no such folder" in run_cli("hf-to-dcp", tmp_path / "nope", tmp_path / "o", expect=2).output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no safetensors" in error_line("hf-to-dcp", empty, tmp_path / "o")
    assert "not a DCP" in error_line("dcp-to-hf", FIX / "tiny-moe", tmp_path / "o", "--assets-dir", FIX / "tiny-moe")

    broken = tmp_path / "missing-shard"
    shutil.copytree(FIX / "tiny-moe", broken)
    (broken / "model-00002-of-00003.safetensors").unlink()
    assert "missing shard" in error_line("hf-to-dcp", broken, tmp_path / "o")

    truncated = tmp_path / "truncated"
    shutil.copytree(FIX / "tiny-moe", truncated)
    shard = truncated / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert "truncated" in error_line("hf-to-dcp", truncated, tmp_path / "o")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(FIX / "tiny-moe", corrupt)
    shard = corrupt / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\xff" * 12
    shard.write_bytes(bytes(data))
    assert "corrupt" in error_line("hf-to-dcp", corrupt, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_mismatched_config_and_corrupt_dcp(dcps, tmp_path):
    # DCP of the MoE model with the dense model's assets: one line saying they are different models (issue 22
    # item 6: the model is compared before any key or shape), nothing written
    line = error_line("dcp-to-hf", dcps["tiny-moe"], tmp_path / "o", "--assets-dir", FIX / "tiny-dense-untied")
    assert "different models" in line and "MoE" in line and "dense" in line
    assert not (tmp_path / "o").exists()
    wrong = tmp_path / "wrong-config"
    shutil.copytree(FIX / "tiny-dense-untied", wrong)
    shutil.copyfile(FIX / "tiny-dense-tied" / "config.json", wrong / "config.json")
    assert "config" in error_line("hf-to-dcp", wrong, tmp_path / "o")

    bad = tmp_path / "bad-dcp"
    shutil.copytree(dcps["tiny-dense-untied"], bad)
    data = next(bad.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert "truncated" in error_line("dcp-to-hf", bad, tmp_path / "o", "--assets-dir", FIX / "tiny-dense-untied")
    (bad / ".metadata").write_bytes(b"\x80\x04garbage")
    assert "corrupt" in error_line("dcp-to-hf", bad, tmp_path / "o", "--assets-dir", FIX / "tiny-dense-untied")
    assert not (tmp_path / "o").exists()


def test_missing_and_unexpected_keys(tmp_path):
    original = load_hf_tensors(FIX / "tiny-dense-untied")
    partial = {k: v for k, v in original.items() if k != "model.language_model.norm.weight"}
    partial["model.extra.weight"] = torch.zeros(3)
    dcp.save(partial, checkpoint_id=str(tmp_path / "dcp"))
    assets = FIX / "tiny-dense-untied"
    assert "lacks 1 tensors" in error_line("dcp-to-hf", tmp_path / "dcp", tmp_path / "o", "--assets-dir", assets)
    line = error_line("dcp-to-hf", tmp_path / "dcp", tmp_path / "o", "--assets-dir", assets, "--allow-missing")
    assert "model.extra.weight" in line
    summary = run_cli_json("dcp-to-hf", tmp_path / "dcp", tmp_path / "o", "--assets-dir", assets,
                           "--allow-missing", "--allow-unexpected")
    assert summary["missing"] == ["model.language_model.norm.weight"]
    assert summary["dropped_unexpected"] == ["model.extra.weight"]
    no_head = {k: v for k, v in original.items() if k != "lm_head.weight"}
    dcp.save(no_head, checkpoint_id=str(tmp_path / "dcp2"))
    assert "untied" in error_line("dcp-to-hf", tmp_path / "dcp2", tmp_path / "o2", "--assets-dir", assets,
                                  "--allow-missing")


def test_interrupted_run_and_full_disk_publish_nothing(tmp_path, monkeypatch):
    import vlconvert.layouts.dcp as conv
    import vlconvert.publish as publish

    calls = {"n": 0}
    real_write = conv.DCPWriter.write

    def failing_write(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(conv.DCPWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        hf_to_dcp(FIX / "tiny-moe", tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(conv.DCPWriter, "write", real_write)

    class Usage:
        free = 1000

    monkeypatch.setattr(publish.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(UserError, match="not enough disk space"):
        hf_to_dcp(FIX / "tiny-moe", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_id_from_local_hf_cache(tmp_path, monkeypatch):
    """SRC may be a model id resolved offline from the Hugging Face cache."""
    cache = tmp_path / "hub"
    snap = cache / "models--Qwen--Tiny-VL" / "snapshots" / "0123abcd"
    shutil.copytree(FIX / "tiny-dense-tied", snap)
    (cache / "models--Qwen--Tiny-VL" / "refs").mkdir()
    (cache / "models--Qwen--Tiny-VL" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    summary = hf_to_dcp("Qwen/Tiny-VL", tmp_path / "out")
    assert summary["source"] == str(snap)
    dcp_to_hf(tmp_path / "out", tmp_path / "back", assets_dir="Qwen/Tiny-VL")  # assets from the cache too
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (snap / "tokenizer.json").read_bytes()
    with pytest.raises(UserError, match="local Hugging Face cache"):
        hf_to_dcp("Qwen/Not-There", tmp_path / "out2")


def test_metadata_with_foreign_pickle_is_refused(tmp_path):
    import pickle

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(os.system))  # would run code if unpickled freely
    line = error_line("dcp-to-hf", folder, tmp_path / "o", "--assets-dir", FIX / "tiny-moe")
    assert "refusing to load posix.system" in line


def test_mindspeed_style_dcp_with_2d_expert_views(tmp_path):
    """MindSpeed-MM keeps HF keys under 'model.model.' and views fused experts as 2-D (E*in, out)."""
    original = load_hf_tensors(FIX / "tiny-moe")  # released orientation [E, H, 2I] / [E, I, H]
    state = {}
    for key, tensor in original.items():
        if key.endswith(("gate_up_proj", "down_proj")):
            tensor = tensor.reshape(-1, tensor.shape[-1])
        state["model." + key] = tensor.float()
    dcp.save({"model": state}, checkpoint_id=str(tmp_path / "dcp"))
    summary = dcp_to_hf(tmp_path / "dcp", tmp_path / "hf", assets_dir=FIX / "tiny-moe")
    assert summary["prefix"] == "model.model."
    result = load_hf_tensors(tmp_path / "hf")
    for key, tensor in original.items():
        assert tensor_bytes(result[key]) == tensor_bytes(tensor), key


def test_disk_full_mid_write_publishes_nothing(tmp_path, monkeypatch):
    import errno

    import vlconvert.layouts.hf as conv

    calls = {"n": 0}
    real_write = conv.SafetensorsFileWriter.write_blocks

    def full_disk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    hf_to_dcp(FIX / "tiny-dense-tied", tmp_path / "dcp")
    monkeypatch.setattr(conv.SafetensorsFileWriter, "write_blocks", full_disk)
    line = error_line("dcp-to-hf", tmp_path / "dcp", tmp_path / "out", "--assets-dir", FIX / "tiny-dense-tied")
    assert "disk full" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcp"]


def test_row_reads_take_only_their_rows_from_dcp_save_records(tmp_path, monkeypatch):
    """Row ranges of a ``dcp.save`` record come straight from its storage bytes (no whole-tensor load),
    equal to the saved tensor's rows; a source over it gives the same bytes for any row range."""
    from vlconvert.layouts.dcp import DCPReader

    gen = torch.Generator().manual_seed(3)
    saved = {"w": torch.randn(97, 40, generator=gen).to(torch.bfloat16),
             "e": torch.randn(4, 6, 10, generator=gen), "s": torch.tensor(2.5)}
    dcp.save(saved, checkpoint_id=str(tmp_path / "c"))
    reader = DCPReader(tmp_path / "c")

    def no_whole_loads(*_args, **_kwargs):
        raise AssertionError("a row read loaded a whole record")

    monkeypatch.setattr(torch, "load", no_whole_loads)
    for key, (a, b) in (("w", (0, 97)), ("w", (13, 14)), ("w", (50, 97)), ("e", (1, 3)), ("w", (5, 5))):
        (chunk,) = reader.tensors[key].chunks
        got = reader.read_chunk_rows(chunk, a, b)
        assert got.dtype == saved[key].dtype and torch.equal(got, saved[key][a:b]), (key, a, b)
    monkeypatch.undo()
    assert torch.equal(reader.read("s"), saved["s"])
    reader.close()
