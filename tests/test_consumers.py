"""``convert --to torch_dist --for FRAMEWORK``: each framework's own save, and back, bit for bit.

What each framework's loader accepts is checked with the frameworks themselves in ``tests/frameworks``
(Megatron-Bridge 0.6.2, megatron-core 0.19.2; Python 3.12). Here, on the suite's Python: the files and keys
each flavour writes, every flavour back to HF bit for bit, megatron-core 0.16.1's GPTModel loading the
``megatron-lm`` flavour at default strictness, and the common state read from inside the DCP (megatron-core
>= 0.17 saves) when there is no ``common.pt``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_hf_tensors, run_cli, tensor_bytes

from vlconvert.layouts import torch_dist as tdl
from vlconvert.layouts.dcp import DCPReader
from vlconvert.models.qwen3vl import load_config
from vlconvert.sources import open_source

FIX = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = ["tiny-dense-tied", "tiny-dense-untied", "tiny-moe", "tiny-moe-tf5"]
FOLDERS = {"megatron-bridge": "iter_0000000", "megatron-bridge-0.3": "iter_0000000", "mbridge": "release",
           "ms-swift": "iter_0000001", "megatron-lm": "release"}


def _released(fixture: str) -> dict[str, torch.Tensor]:
    want = load_hf_tensors(FIX / fixture)
    if "tf5" in fixture:
        want = {k: (v.transpose(1, 2) if k.endswith(("gate_up_proj", "down_proj")) else v) for k, v in want.items()}
    return want


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("flavour", list(FOLDERS))
def test_each_flavour_round_trips_bit_exact(tmp_path: Path, fixture: str, flavour: str) -> None:
    run_cli("convert", FIX / fixture, tmp_path / "td", "--to", "torch_dist", "--for", flavour, "-q")
    folder = tmp_path / "td" / FOLDERS[flavour]
    tracker = (tmp_path / "td/latest_checkpointed_iteration.txt").read_text()
    assert tracker == {"iter_0000000": "0", "iter_0000001": "1", "release": "release"}[FOLDERS[flavour]]
    assert (folder / "common.pt").is_file() and (folder / "metadata.json").is_file()
    keys = set(DCPReader(folder).tensors)
    info = load_config(FIX / fixture / "config.json")
    if flavour == "megatron-lm":
        assert "embedding.word_embeddings.weight" in keys and not any(k.startswith(("language_model.", "vision"))
                                                                       for k in keys)
    else:
        assert "language_model.embedding.word_embeddings.weight" in keys
    if flavour == "ms-swift":  # the HF vision tower as a plain module, HF shapes, one key per block
        shape = DCPReader(folder).tensors[f"visual.visual.blocks.{info.vision_depth - 1}.attn.qkv.weight"].shape
        assert tuple(shape) == (3 * info.vision_hidden, info.vision_hidden)
        assert not any(k.startswith("vision_model.") for k in keys)
    if flavour in ("megatron-bridge", "mbridge"):
        assert "vision_model.decoder.layers.self_attention.linear_qkv.weight" in keys
    if flavour == "megatron-bridge-0.3":  # HF's tower under vision_model., as Bridge 0.3 keeps it
        assert "vision_model.blocks.0.attn.qkv.weight" in keys and not any(".decoder." in k for k in keys
                                                                             if k.startswith("vision_model."))
    back = ["--allow-missing"] if flavour == "megatron-lm" else []
    run_cli("convert", tmp_path / "td", tmp_path / "hf", "--to", "hf", "--assets-dir", FIX / fixture, *back, "-q")
    want = _released(fixture)
    if flavour == "megatron-lm":
        want = {k: v for k, v in want.items() if not k.startswith("model.visual.")}
    got = load_hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and tensor_bytes(got[k]) == tensor_bytes(want[k]), k


def test_extra_state_for_every_te_module_of_the_full_model(tmp_path: Path) -> None:
    """The entries megatron-core's default load asks for: vision blocks, patch mergers, and TE's norms."""
    run_cli("convert", FIX / "tiny-moe", tmp_path / "td", "--to", "torch_dist", "-q")
    reader = DCPReader(tmp_path / "td/iter_0000000")
    info = load_config(FIX / "tiny-moe/config.json")
    d, k = info.vision_depth, len(info.deepstack)
    want = {f"vision_model.decoder.layers.{m}._extra_state/shard_{i}_{d}" for i in range(d)
            for m in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")}
    want |= {f"vision_model.decoder.deepstack_merger_list.{m}._extra_state/shard_{i}_{k}" for i in range(k)
             for m in ("patch_norm", "linear_fc1", "linear_fc2")}
    want |= {f"vision_model.merger.{m}._extra_state/shard_0_1" for m in ("patch_norm", "linear_fc1", "linear_fc2")}
    want |= {f"language_model.decoder.layers.self_attention.{m}._extra_state/shard_{i}_{info.layers}"
             for i in range(info.layers) for m in ("q_layernorm", "k_layernorm", "linear_qkv", "linear_proj")}
    want |= {"language_model.decoder.final_layernorm._extra_state/shard_0_1", tdl.COMMON_STATE_KEY}
    assert want <= set(reader.non_tensors), sorted(want - set(reader.non_tensors))[:5]
    assert not any("core_attention" in n or "output_layer._extra" in n for n in reader.non_tensors)


def test_bridge_files_and_run_config(tmp_path: Path) -> None:
    run_cli("convert", FIX / "tiny-moe", tmp_path / "td", "--to", "torch_dist", "--tp", "2", "-q")
    state = torch.load(tmp_path / "td/latest_train_state.pt", weights_only=True)
    assert int(state["step"]) == 0
    assert torch.load(tmp_path / "td/iter_0000000/train_state.pt", weights_only=True).keys() == state.keys()
    config = yaml.safe_load((tmp_path / "td/iter_0000000/run_config.yaml").read_text())
    model, info = config["model"], load_config(FIX / "tiny-moe/config.json")
    assert model["_target_"].endswith("Qwen3VLMoEModelProvider")
    assert (model["num_layers"], model["hidden_size"], model["num_moe_experts"], model["tensor_model_parallel_size"]) \
        == (info.layers, info.hidden, info.experts, 2)
    assert isinstance(model["layernorm_epsilon"], float)  # YAML 1.1 reads 1e-06 as a string
    # left out, Bridge's loader builds megatron-core's default activation (gelu) for a silu model
    assert info.raw["text_config"]["hidden_act"] == "silu"
    assert model["activation_func"] == {"_target_": "torch.nn.functional.silu", "_call_": False}
    assert model["hf_model_id"] == str((FIX / "tiny-moe").resolve())
    # Bridge builds Qwen3-VL unpadded: the embedding keeps the vocabulary's rows whatever --tp
    emb = DCPReader(tmp_path / "td/iter_0000000").tensors["language_model.embedding.word_embeddings.weight"]
    assert emb.shape[0] == info.vocab


def test_megatron_lm_args_and_padding(tmp_path: Path) -> None:
    run_cli("convert", FIX / "tiny-dense-untied", tmp_path / "td", "--to", "torch_dist", "--for", "megatron-lm",
            "--tp", "2", "--padded-vocab-size", "2304", "-q")
    common = torch.load(tmp_path / "td/release/common.pt", weights_only=False)
    args, info = common["args"], load_config(FIX / "tiny-dense-untied/config.json")
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_query_groups) == \
        (info.layers, info.hidden, info.heads, info.kv_heads)
    assert args.padded_vocab_size == 2304 and args.tensor_model_parallel_size == 2
    assert args.untie_embeddings_and_output_weights and common["checkpoint_version"] == 3.0
    emb = DCPReader(tmp_path / "td/release").tensors["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 2304


def test_common_state_inside_the_checkpoint_is_read(tmp_path: Path) -> None:
    """megatron-core >= 0.17 saves keep the common state in a ``common_state`` entry and no common.pt."""
    run_cli("convert", FIX / "tiny-moe", tmp_path / "td", "--to", "torch_dist", "--tp", "2", "-q")
    (tmp_path / "td/iter_0000000/common.pt").unlink()
    source = open_source(tmp_path / "td")
    assert source.common["iteration"] == 0 and source.saved_from["tp"] == 2
    assert source.consumer == "megatron-bridge"


def test_for_is_refused_for_other_targets(tmp_path: Path) -> None:
    res = run_cli("convert", FIX / "tiny-moe", tmp_path / "out", "--to", "dcp", "--for", "ms-swift", expect=2)
    assert "--for ms-swift applies to --to torch_dist" in res.output
    assert not (tmp_path / "out").exists()


def _gpt_worker(fixture: str, legacy: str, written: str, port: int) -> None:
    from test_megatron_core import _init, _lm_part, assert_torch_dist_loads_as, build_gpt

    _init(0, 1, port, 1)
    model = build_gpt(fixture)
    model.load_state_dict(_lm_part(Path(legacy) / "release/mp_rank_00/model_optim_rng.pt"), strict=False)
    assert_torch_dist_loads_as(model, lambda: build_gpt(fixture), written)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("fixture", ["tiny-dense-tied", "tiny-moe"])
def test_megatron_core_016_gptmodel_loads_megatron_lm_flavour(tmp_path: Path, fixture: str) -> None:
    pytest.importorskip("megatron.core")
    from test_megatron_core import _free_port

    from vlconvert.megatron_convert import hf_to_megatron

    hf_to_megatron(FIX / fixture, tmp_path / "legacy", spec="local", experts="sequential")
    run_cli("convert", FIX / fixture, tmp_path / "td", "--to", "torch_dist", "--for", "megatron-lm", "--spec",
            "local", "-q")
    ctx = torch.multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_gpt_worker, args=(fixture, str(tmp_path / "legacy"), str(tmp_path / "td/release"),
                                                  _free_port()))
    proc.start()
    proc.join(240)
    assert proc.exitcode == 0, "megatron-core GPTModel did not load the megatron-lm flavour (see stderr)"


def test_bridge_checkpoint_back_to_hf_finds_its_hf_folder(tmp_path: Path) -> None:
    """No --assets-dir: Bridge's run_config.yaml names the HF model (hf_model_id); config and tokenizer files
    come from there, and the result equals the source byte for byte, assets included."""
    run_cli("convert", FIX / "tiny-dense-untied", tmp_path / "td", "--to", "torch_dist", "-q")
    res = run_cli("convert", tmp_path / "td", tmp_path / "hf", "--to", "hf")
    assert "hf_model_id in run_config.yaml" in res.output
    for name in ("tokenizer.json", "config.json", "preprocessor_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (FIX / "tiny-dense-untied" / name).read_bytes(), name
    want, got = _released("tiny-dense-untied"), load_hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want) and all(tensor_bytes(got[k]) == tensor_bytes(want[k]) for k in want)


@pytest.mark.parametrize("flavour", list(FOLDERS))
def test_plan_from_config_matches_the_conversion(tmp_path: Path, flavour: str) -> None:
    """``plan --to torch_dist --for X`` (config alone) lists the files and bytes ``convert`` writes."""
    from helpers import run_cli_json

    planned = run_cli_json("plan", "--config", FIX / "tiny-moe/config.json", "--to", "torch_dist", "--for", flavour,
                           "--tp", "2")
    run_cli("convert", FIX / "tiny-moe", tmp_path / "td", "--to", "torch_dist", "--for", flavour, "--tp", "2", "-q")
    data = next(f for f in planned["file_list"] if f["name"].endswith(".distcp"))
    reader = DCPReader(tmp_path / "td" / FOLDERS[flavour])
    assert data["name"] == f"{FOLDERS[flavour]}/__0_0.distcp"
    assert data["bytes"] == sum(t.nbytes for t in reader.tensors.values())
    assert {f["name"] for f in planned["file_list"]} <= {str(p.relative_to(tmp_path / "td"))
                                                     for p in (tmp_path / "td").rglob("*") if p.is_file()}


@pytest.mark.parametrize("edit", [None, "swap", "cut"])
def test_resume_keeps_the_data_file_only_if_its_journal_holds_up(tmp_path: Path, edit: str | None) -> None:
    """A torch_dist data file --resume kept is skipped only if its journaled records are the planned ones,
    laid end to end, each a whole archive; an edited journal gets the file written again, same bytes."""
    import json as _json
    import signal

    from helpers import folder_digest
    from test_reliability import _killed_run

    from vlconvert import publish

    argv = ["convert", str(FIX / "tiny-moe"), str(tmp_path / "out"), "--to", "torch_dist", "-q"]
    run_cli(*argv[:2], tmp_path / "clean", *argv[3:])
    total = sum(e["size"] for e in publish.read_manifest(tmp_path / "clean").values())
    data = next(e["size"] for n, e in publish.read_manifest(tmp_path / "clean").items() if n.endswith(".distcp"))
    assert _killed_run(argv, data + (total - data) // 2) == -signal.SIGKILL  # the data file is finished
    journal = publish.journal_path(tmp_path / "out")
    lines = journal.read_text().splitlines()
    entry = next(i for i, ln in enumerate(lines) if ".distcp" in ln)
    if edit is not None:
        record = _json.loads(lines[entry])
        records = record["state"]["records"]
        if edit == "swap":
            records[0]["key"], records[1]["key"] = records[1]["key"], records[0]["key"]
        else:
            records.pop()
        lines[entry] = _json.dumps(record)
        journal.write_text("\n".join(lines) + "\n")
    out = run_cli(*argv[:-1], "--resume").output
    assert folder_digest(tmp_path / "out") == folder_digest(tmp_path / "clean")
    assert ("redone: the journaled state of 'iter_0000000/__0_0.distcp'" in out) == (edit is not None), out


def test_run_config_yaml_reads_back_equal_whatever_the_config_holds() -> None:
    """JSON configs may hold NaN/Infinity and floats like 1e-06 (a string to YAML 1.1): written so that
    ``yaml.safe_load`` (what Bridge reads run_config.yaml with) gives the same values back."""
    import math

    value = {"eps": 1e-06, "big": 1e20, "nan": float("nan"), "inf": float("inf"), "ninf": -float("inf"),
             "s": "1e-06", "n": None, "b": True, "l": [1, 2.5, "x", {}], "d": {"k": 0.1}}
    back = yaml.safe_load(tdl.yaml_text(value))
    assert math.isnan(back.pop("nan")) and back == {k: v for k, v in value.items() if k != "nan"}
