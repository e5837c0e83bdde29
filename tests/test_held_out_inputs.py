"""Issue 19: inputs that a held-out check still caught.

A. A published ``config.json`` describes the weights beside it, whatever the route and wherever it came from:
   an FP8 release given as ``--assets-dir`` (or ``--config``) of a DCP, Megatron, torch_dist or HF source no
   longer leaves its ``quantization_config`` in the bf16 output, and an HF output names the dtype written.
B. ``--merge-lora`` works on every older spelling (``hf-to-dcp``, ``dcp-to-hf``, ``hf-to-megatron``,
   ``megatron-to-hf``, ``reshard``) exactly as on ``convert``: same option, same help, same bytes.

FP8 releases are made as in ``test_fp8.py`` (block-quantized fixture, exact dequantized reference); adapters
with ``peft`` as in ``test_lora.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
import torch
from helpers import folder_digest, load_hf_tensors, run_cli, run_cli_json, tensor_bytes
from test_fp8 import assert_equal, make_fp8
from transformers import AutoConfig, AutoModelForImageTextToText

from vlconvert.cli import main

FIX = Path(__file__).resolve().parents[1] / "fixtures"
DENSE = "tiny-dense-untied"


# ------------------------------------------------------------------------ A. config.json of FP8 assets
@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> tuple[dict[str, Path], dict[str, torch.Tensor], dict[str, str]]:
    """An FP8 release of the dense fixture in every layout (made from it), its dequantized reference and the
    release's digest."""
    root = tmp_path_factory.mktemp("fp8")
    reference = make_fp8(root / "fp8", DENSE)
    paths = {"fp8": root / "fp8"}
    for layout, extra in (("dcp", []), ("megatron", ["--tp", "2"]), ("torch_dist", []), ("hf", [])):
        paths[layout] = root / layout
        run_cli("convert", root / "fp8", paths[layout], "--to", layout, *extra, "-q")
    # an HF folder of the dequantized weights whose own config still says FP8 (what the bug published)
    paths["stale"] = root / "stale"
    shutil.copytree(paths["hf"], paths["stale"])
    (paths["stale"] / "vlconvert-manifest.json").unlink()
    shutil.copy(root / "fp8" / "config.json", paths["stale"] / "config.json")
    return paths, reference, folder_digest(root / "fp8")


def assert_plain_checkpoint(out: Path, reference: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """``out`` is an unquantized ``dtype`` checkpoint of ``reference`` for its config and for transformers."""
    name = str(dtype).removeprefix("torch.")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == name and config["text_config"]["dtype"] == name
    assert getattr(AutoConfig.from_pretrained(out), "quantization_config", None) is None
    want = {k: v.to(dtype) for k, v in reference.items()}
    assert_equal(load_hf_tensors(out), want)
    model = AutoModelForImageTextToText.from_pretrained(out)  # dtype "auto": the config's
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert model.dtype == dtype
    state = model.state_dict()
    for k, v in want.items():
        assert state[k].dtype == dtype and tensor_bytes(state[k]) == tensor_bytes(v), k


@pytest.mark.parametrize("argv", [
    ["convert", "{dcp}", "--to", "hf", "--assets-dir", "{fp8}"],
    ["dcp-to-hf", "{dcp}", "--assets-dir", "{fp8}"],
    ["convert", "{megatron}", "--to", "hf", "--assets-dir", "{fp8}"],
    ["megatron-to-hf", "{megatron}", "--assets-dir", "{fp8}"],
    ["convert", "{torch_dist}", "--to", "hf", "--assets-dir", "{fp8}"],
    ["convert", "{hf}", "--to", "hf", "--assets-dir", "{fp8}"],
    ["convert", "{stale}", "--to", "hf"],
    ["convert", "{hf}", "--to", "hf", "--config", "{fp8}/config.json"],
    ["convert", "{megatron}", "--to", "hf", "--assets-dir", "{fp8}", "--dtype", "fp32"],
    ["dcp-to-hf", "{dcp}", "--assets-dir", "{fp8}", "--dtype", "fp32"],
], ids=lambda a: " ".join(a).replace("{", "").replace("}", ""))
def test_hf_output_with_fp8_assets_is_a_plain_checkpoint(fp8, tmp_path, argv):
    paths, reference, digest = fp8
    values = {k: str(v) for k, v in paths.items()}
    args = [a.format(**values) for a in argv]
    run_cli(args[0], args[1], tmp_path / "out", *args[2:], "-q")
    dtype = torch.float32 if "fp32" in argv else torch.bfloat16
    assert_plain_checkpoint(tmp_path / "out", reference, dtype)
    assert folder_digest(paths["fp8"]) == digest  # the release itself is untouched


def test_dcp_output_with_fp8_assets_or_config_is_not_quantized(fp8, tmp_path):
    paths, reference, _ = fp8
    runs = {"assets": ["convert", paths["dcp"], tmp_path / "assets", "--to", "dcp", "--assets-dir", paths["fp8"]],
            "config": ["convert", paths["megatron"], tmp_path / "config", "--to", "dcp",
                       "--config", paths["fp8"] / "config.json"],
            "fp32": ["convert", paths["megatron"], tmp_path / "fp32", "--to", "dcp", "--assets-dir", paths["fp8"],
                     "--dtype", "fp32"]}
    for name, argv in runs.items():
        run_cli(*argv, "-q")
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert "quantization_config" not in config, name
        # a DCP's config names the model's dtype (what --dtype auto writes back), not the stored one
        assert config["text_config"]["dtype"] == "bfloat16", name
    run_cli("dcp-to-hf", tmp_path / "fp32", tmp_path / "hf", "--assets-dir", paths["fp8"], "-q")
    assert_plain_checkpoint(tmp_path / "hf", reference, torch.bfloat16)


def test_hf_output_names_the_dtype_written(tmp_path):
    run_cli("convert", FIX / DENSE, tmp_path / "f32", "--to", "hf", "--dtype", "fp32", "-q")
    assert_plain_checkpoint(tmp_path / "f32", load_hf_tensors(FIX / DENSE), torch.float32)
    # a config that already describes the weights is still copied byte for byte
    run_cli("convert", FIX / DENSE, tmp_path / "same", "--to", "hf", "-q")
    assert (tmp_path / "same" / "config.json").read_bytes() == (FIX / DENSE / "config.json").read_bytes()


# ------------------------------------------------------------------- B. --merge-lora on older spellings
OLDER = ["hf-to-dcp", "dcp-to-hf", "hf-to-megatron", "megatron-to-hf", "reshard"]


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict[str, Path]:
    """A real PEFT adapter of the dense fixture (language model and vision tower) and the fixture as a DCP
    and as Megatron rank files."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(FIX / DENSE, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                                            target_modules=["q_proj", "v_proj", "down_proj", "qkv", "linear_fc1"]))
    model.save_pretrained(root / "adapter")
    run_cli("convert", FIX / DENSE, root / "dcp", "--to", "dcp", "-q")
    run_cli("convert", FIX / DENSE, root / "megatron", "--to", "megatron", "--tp", "2", "-q")
    return {"adapter": root / "adapter", "hf": FIX / DENSE, "dcp": root / "dcp", "megatron": root / "megatron"}


def _option(command: str):
    cmd = main.get_command(click.Context(main), command)
    found = [p for p in cmd.params if p.name == "merge_lora"]
    assert len(found) == 1, f"{command} has no --merge-lora"
    return found[0]


@pytest.mark.parametrize("command", OLDER)
def test_older_spellings_have_the_same_merge_lora_option(command):
    ours, theirs = _option(command), _option("convert")
    assert (ours.opts, ours.metavar, ours.default, ours.help) == (theirs.opts, theirs.metavar, theirs.default,
                                                                  theirs.help)


@pytest.mark.parametrize("older,newer", [
    (["hf-to-dcp", "{hf}"], ["convert", "{hf}", "--to", "dcp"]),
    (["dcp-to-hf", "{dcp}", "--assets-dir", "{hf}"], ["convert", "{dcp}", "--to", "hf", "--assets-dir", "{hf}"]),
    (["hf-to-megatron", "{hf}", "--tp", "2"], ["convert", "{hf}", "--to", "megatron", "--tp", "2"]),
    (["megatron-to-hf", "{megatron}", "--assets-dir", "{hf}"],
     ["convert", "{megatron}", "--to", "hf", "--assets-dir", "{hf}"]),
    (["reshard", "{megatron}", "--tp", "1"], ["convert", "{megatron}", "--to", "megatron", "--tp", "1"]),
], ids=lambda a: a[0])
def test_merge_lora_on_older_spellings_gives_the_bytes_of_convert(lora, tmp_path, older, newer):
    values = {k: str(v) for k, v in lora.items()}

    def run(template: list[str], out: Path, *extra: str) -> dict[str, str]:
        args = [a.format(**values) for a in template]
        run_cli(args[0], args[1], out, *args[2:], *extra, "-q")
        return folder_digest(out)

    merged = run(older, tmp_path / "older", "--merge-lora", values["adapter"])
    assert merged == run(newer, tmp_path / "newer", "--merge-lora", values["adapter"])  # manifest included
    plain = run(older, tmp_path / "plain")
    changed = [f for f in plain if f != "vlconvert-manifest.json" and merged[f] != plain[f]]
    assert changed, "--merge-lora changed no weight file"
    plan = run_cli_json(*[a.format(**values) for a in older[:2]], tmp_path / "dry",
                        *[a.format(**values) for a in older[2:]], "--merge-lora", values["adapter"], "--dry-run")
    assert any("LoRA adapter" in n and "merged" in n for n in plan["notes"]), plan["notes"]
    assert not (tmp_path / "dry").exists()


def test_merge_lora_on_older_spelling_refuses_a_bad_adapter_in_one_line(lora, tmp_path):
    result = run_cli("hf-to-dcp", lora["hf"], tmp_path / "out", "--merge-lora", tmp_path / "nowhere", expect=2)
    assert result.output.startswith("error:") and "nowhere" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------- noticed on the way (B's code path)
def test_hf_to_megatron_honours_padded_vocab_size(tmp_path):
    """The command used to drop --padded-vocab-size when converting (its --dry-run kept it)."""
    run_cli("hf-to-megatron", FIX / DENSE, tmp_path / "older", "--tp", "2", "--padded-vocab-size", "2304", "-q")
    run_cli("convert", FIX / DENSE, tmp_path / "newer", "--to", "megatron", "--tp", "2",
            "--padded-vocab-size", "2304", "-q")
    assert folder_digest(tmp_path / "older") == folder_digest(tmp_path / "newer")
