"""The committed fixtures are what the script makes, and are structurally faithful."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import folder_digest
from transformers import AutoModelForImageTextToText, AutoTokenizer

from fixtures.make_fixtures import build_checkpoint, released_configs

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def test_script_reproduces_committed_fixtures(tmp_path):
    for name, experts in (("tiny-dense-tied", "released"), ("tiny-moe", "released")):
        build_checkpoint(tmp_path / name, name, experts=experts)
        assert folder_digest(tmp_path / name) == folder_digest(FIX / name), name
    for name, cfg in released_configs().items():
        assert json.loads((FIX / "configs" / f"{name}.json").read_text()) == cfg


def test_moe_fixture_orientations_and_non_square_sizes():
    from safetensors import safe_open

    def shapes(folder: Path) -> dict[str, list[int]]:
        out = {}
        for path in folder.glob("*.safetensors"):
            with safe_open(str(path), "pt") as f:
                out.update({k: f.get_slice(k).get_shape() for k in f.keys()})
        return out

    released, tf5 = shapes(FIX / "tiny-moe"), shapes(FIX / "tiny-moe-tf5")
    key = "model.language_model.layers.0.mlp.experts."
    assert released[key + "gate_up_proj"] == [8, 64, 96] and released[key + "down_proj"] == [8, 48, 64]
    assert tf5[key + "gate_up_proj"] == [8, 96, 64] and tf5[key + "down_proj"] == [8, 64, 48]
    ids = torch.arange(0, 40).reshape(2, 20)
    a = AutoModelForImageTextToText.from_pretrained(FIX / "tiny-moe").eval()
    b = AutoModelForImageTextToText.from_pretrained(FIX / "tiny-moe-tf5").eval()
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_fixture_tokenizer_has_the_qwen3_vl_added_token_table():
    tok = AutoTokenizer.from_pretrained(FIX / "tiny-dense-tied")
    assert len(tok) == 2026
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|image_pad|>", "<think>", "</think>"])
    assert ids == [2000, 2012, 2024, 2025]
    cfg = json.loads((FIX / "tiny-dense-tied" / "config.json").read_text())
    assert cfg["image_token_id"] == 2012 and cfg["text_config"]["vocab_size"] == 2048
    text = "Hello, 世界! def f(x): return x**2"
    assert tok.decode(tok.encode(text)) == text
