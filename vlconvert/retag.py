"""Retag the Qwen3 ``<think>``/``</think>`` added tokens consistently across tokenizer, templates and weights.

Qwen3-VL Instruct checkpoints carry ``<think>`` (151667) and ``</think>`` (151668) as added tokens whose
embedding rows were never trained. Two repairs:

* ``plain``: retire both added tokens from every tokenizer file, so the new tags (and any stray old tag
  text) tokenize into ordinary, trained BPE ids. No id moves and no weight changes; the two old rows stay
  in the matrix, unused, like the padding rows after them.
* ``special``: rename the two added tokens to the new tags at the same ids and set their embedding rows
  (and untied ``lm_head`` rows) to the mean of the rows of the pieces the new tag splits into with the
  ordinary vocabulary. Every other row and tensor stays bit-identical.

Both rewrite every chat template so it emits and parses the new tags, and write :data:`RECORD_NAME`.
The tokenizer-file and template rewrites are pure functions over JSON dicts and strings; the folder
layer (:func:`retag_folder`, :func:`retag_jsonl`, :func:`think_tag_report`) does the I/O.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlconvert import __version__, publish
from vlconvert.dtypes import to_torch
from vlconvert.errors import UsageError, UserError
from vlconvert.errors import one_line as _one_line
from vlconvert.layouts.hf import (
    INDEX_NAME,
    WEIGHT_SUFFIXES,
    HFCheckpoint,
    PlannedTensor,
    SafetensorsFileWriter,
    read_header,
    resolve_source,
)
from vlconvert.lazy import torch
from vlconvert.models.registry import FAMILIES, guess_family
from vlconvert.progress import progress_bar

OLD_OPEN = "<think>"
OLD_CLOSE = "</think>"
DEFAULT_OPEN = "<thinking>"
DEFAULT_CLOSE = "</thinking>"
STRATEGIES = ("plain", "special")
RECORD_NAME = "vlconvert_retag.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
ADDED_TOKENS_JSON = "added_tokens.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TEMPLATE_JSON_FILES = ("chat_template.json", "processor_config.json")
NAMED_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
LIST_SPECIAL_KEYS = ("additional_special_tokens", "extra_special_tokens")
LOW_NORM_RATIO = 0.25  # a row under this fraction of the median trained-row norm looks untrained
_ROW_BLOCK_BYTES = 256 * 2**20
_OLD_TAG_RE = re.compile(r"</?think>")
_ANGLE_OPEN = re.compile(r"^<([^<>/\s][^<>]*)>$")
_ANGLE_CLOSE = re.compile(r"^</([^<>/\s][^<>]*)>$")
_MEDIA_KEYS = frozenset({"images", "image", "videos", "video", "audios", "audio", "image_url", "video_url",
                         "path", "url"})


# ------------------------------------------------------------------------------------------- tags
@dataclass(frozen=True)
class Tags:
    """The new opening and closing tags that replace ``<think>`` and ``</think>``."""

    open: str
    close: str

    def mapping(self) -> dict[str, str]:
        """Old tag text -> new tag text."""
        return {OLD_OPEN: self.open, OLD_CLOSE: self.close}


def _brackets_balanced(text: str) -> bool:
    for left, right in ("<>", "[]", "()", "{}"):
        depth = 0
        for ch in text:
            depth += (ch == left) - (ch == right)
            if depth < 0:
                return False
        if depth:
            return False
    return True


def resolve_tags(open_tag: str | None = None, close_tag: str | None = None) -> Tags:
    """Validate (and, from one ``<name>``-style tag, complete) the new tag pair; UsageError if unusable.

    Rules: non-empty, no surrounding whitespace or line breaks, brackets balanced inside each tag, the two
    tags differ and neither contains the other or an old tag, and an ``<x>`` opening closes with ``</x>``.
    """
    if open_tag is None and close_tag is None:
        open_tag, close_tag = DEFAULT_OPEN, DEFAULT_CLOSE
    elif close_tag is None:
        m = _ANGLE_OPEN.match(open_tag or "")
        if not m:
            raise UsageError(f"--open '{open_tag}' is not of the form <name>: give --close as well")
        close_tag = f"</{m.group(1)}>"
    elif open_tag is None:
        m = _ANGLE_CLOSE.match(close_tag)
        if not m:
            raise UsageError(f"--close '{close_tag}' is not of the form </name>: give --open as well")
        open_tag = f"<{m.group(1)}>"
    assert open_tag is not None and close_tag is not None
    for flag, tag in (("--open", open_tag), ("--close", close_tag)):
        if not tag or tag != tag.strip() or "\n" in tag or "\r" in tag:
            raise UsageError(f"{flag} '{tag}' must be non-empty, without surrounding spaces or line breaks")
        if _OLD_TAG_RE.search(tag):
            raise UsageError(f"{flag} '{tag}' contains an old tag ({OLD_OPEN} or {OLD_CLOSE}): choose another tag")
        if not _brackets_balanced(tag):
            raise UsageError(f"{flag} '{tag}' is not balanced: its brackets do not pair up")
    if open_tag == close_tag or open_tag in close_tag or close_tag in open_tag:
        raise UsageError(f"--open '{open_tag}' and --close '{close_tag}' must differ and not contain each other")
    m = _ANGLE_OPEN.match(open_tag)
    if m and close_tag != f"</{m.group(1)}>":
        raise UsageError(f"tags are not balanced: --open '{open_tag}' closes with '</{m.group(1)}>', "
                        f"not '{close_tag}'")
    m = _ANGLE_CLOSE.match(close_tag)
    if m and open_tag != f"<{m.group(1)}>":
        raise UsageError(f"tags are not balanced: --close '{close_tag}' opens with '<{m.group(1)}>', "
                        f"not '{open_tag}'")
    return Tags(open_tag, close_tag)


def retag_text(text: str, tags: Tags) -> tuple[str, int, int]:
    """Replace ``<think>``/``</think>`` in ``text``; return (new text, openings replaced, closings replaced)."""
    counts = [0, 0]

    def sub(m: re.Match) -> str:
        if m.group(0) == OLD_OPEN:
            counts[0] += 1
            return tags.open
        counts[1] += 1
        return tags.close

    return _OLD_TAG_RE.sub(sub, text), counts[0], counts[1]


# ------------------------------------------------------------------------- tokenizer JSON (pure)
def _content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _renamed(value: Any, new: str) -> Any:
    if isinstance(value, dict):
        return {**value, "content": new}
    return new


def added_token_ids(tok_json: dict) -> dict[str, int]:
    """Content -> id of the added tokens of a tokenizer.json dict."""
    return {e["content"]: int(e["id"]) for e in tok_json.get("added_tokens") or []}


def first_added_id(tok_json: dict) -> int:
    """The number of ordinary (model vocabulary) ids: ``len(model.vocab)``, 151643 for Qwen3."""
    vocab = (tok_json.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        return len(vocab)
    if isinstance(vocab, list):
        return len(vocab)
    ids = added_token_ids(tok_json).values()
    return min(ids) if ids else 0


def max_token_id(tok_json: dict) -> int:
    """The largest id a tokenizer.json can produce (model vocabulary or added token)."""
    vocab = (tok_json.get("model") or {}).get("vocab")
    top = max(vocab.values()) if isinstance(vocab, dict) and vocab else (len(vocab) - 1 if vocab else -1)
    return max([top, *added_token_ids(tok_json).values()])


def _check_mapping(mapping: dict[str, str | None]) -> None:
    for old in mapping:
        if old not in (OLD_OPEN, OLD_CLOSE):
            raise ValueError(f"unexpected old tag {old!r}")


def rewrite_tokenizer_json(tok_json: dict, mapping: dict[str, str | None]) -> tuple[dict, list[str]]:
    """Retire (``None``) or rename the old tags in a tokenizer.json dict; return (new dict, changes)."""
    _check_mapping(mapping)
    out = copy.deepcopy(tok_json)
    vocab = (out.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        inside = [old for old in mapping if old in vocab]
        if inside:
            raise UserError(f"'{inside[0]}' is an entry of the BPE vocabulary itself (id {vocab[inside[0]]}), "
                            "not an added token: this tokenizer cannot be retagged safely")
    changes: list[str] = []
    kept = []
    for entry in out.get("added_tokens") or []:
        old = entry.get("content")
        if old in mapping:
            new = mapping[old]
            if new is None:
                changes.append(f"added_tokens: retired {old} (id {entry['id']})")
                continue
            entry = {**entry, "content": new}
            changes.append(f"added_tokens: id {entry['id']} {old} -> {new}")
        kept.append(entry)
    if "added_tokens" in out:
        out["added_tokens"] = kept
    post = out.get("post_processor")
    if isinstance(post, dict) and isinstance(post.get("special_tokens"), dict):
        for old in mapping:
            if old in post["special_tokens"]:
                raise UserError(f"tokenizer.json post_processor uses '{old}': this tokenizer cannot be retagged")
    return out, changes


def _rewrite_special_value(key: str, value: Any, mapping: dict[str, str | None], where: str,
                           changes: list[str]) -> Any:
    """Rewrite one special-token entry (named key, list or dict of tokens)."""
    if key in LIST_SPECIAL_KEYS and isinstance(value, list):
        out = []
        for item in value:
            old = _content(item)
            if old in mapping:
                new = mapping[old]
                changes.append(f"{where}{key}: " + (f"removed {old}" if new is None else f"{old} -> {new}"))
                if new is None:
                    continue
                item = _renamed(item, new)
            out.append(item)
        return out
    if key in LIST_SPECIAL_KEYS and isinstance(value, dict):
        out_d = {}
        for name, item in value.items():
            old = _content(item)
            if old in mapping:
                new = mapping[old]
                changes.append(f"{where}{key}.{name}: " + (f"removed {old}" if new is None else f"{old} -> {new}"))
                if new is None:
                    continue
                item = _renamed(item, new)
            out_d[name] = item
        return out_d
    old = _content(value)
    if key in NAMED_SPECIAL_KEYS and old in mapping:
        new = mapping[old]
        if new is None:
            raise UserError(f"'{old}' is the tokenizer's {key}: it cannot be retired (use --strategy special)")
        changes.append(f"{where}{key}: {old} -> {new}")
        return _renamed(value, new)
    return value


def rewrite_tokenizer_config(cfg: dict, mapping: dict[str, str | None],
                             tags: Tags) -> tuple[dict, list[str], int]:
    """Rewrite tokenizer_config.json: ``added_tokens_decoder``, special-token keys and the inline chat
    template(s). Return (new dict, changes, template tags replaced)."""
    _check_mapping(mapping)
    out = copy.deepcopy(cfg)
    changes: list[str] = []
    decoder = out.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        new_decoder = {}
        for tid, entry in decoder.items():
            old = _content(entry)
            if old in mapping:
                new = mapping[old]
                changes.append("added_tokens_decoder: " + (f"retired {old} (id {tid})" if new is None
                                                            else f"id {tid} {old} -> {new}"))
                if new is None:
                    continue
                entry = _renamed(entry, new)
            new_decoder[tid] = entry
        out["added_tokens_decoder"] = new_decoder
    for key in (*NAMED_SPECIAL_KEYS, *LIST_SPECIAL_KEYS):
        if key in out:
            out[key] = _rewrite_special_value(key, out[key], mapping, "", changes)
    replaced = 0
    if "chat_template" in out:
        out["chat_template"], replaced = rewrite_template_value(out["chat_template"], tags)
        if replaced:
            changes.append(f"chat_template: {replaced} tags replaced")
    return out, changes, replaced


def rewrite_added_tokens_json(data: dict, mapping: dict[str, str | None]) -> tuple[dict, list[str]]:
    """Rewrite added_tokens.json (``{content: id}``)."""
    _check_mapping(mapping)
    out: dict[str, Any] = {}
    changes = []
    for content, tid in data.items():
        if content in mapping:
            new = mapping[content]
            changes.append("added_tokens.json: " + (f"retired {content} (id {tid})" if new is None
                                                    else f"id {tid} {content} -> {new}"))
            if new is None:
                continue
            content = new
        out[content] = tid
    return out, changes


def rewrite_special_tokens_map(data: dict, mapping: dict[str, str | None]) -> tuple[dict, list[str]]:
    """Rewrite special_tokens_map.json (named tokens and ``additional_special_tokens``)."""
    _check_mapping(mapping)
    changes: list[str] = []
    out = {key: _rewrite_special_value(key, value, mapping, "special_tokens_map.json: ", changes)
           for key, value in data.items()}
    return out, changes


def rewrite_template(text: str, tags: Tags) -> tuple[str, int]:
    """Rewrite one Jinja chat template so it emits and splits on the new tags; return (text, replacements)."""
    new, n_open, n_close = retag_text(text, tags)
    return new, n_open + n_close


def rewrite_template_value(value: Any, tags: Tags) -> tuple[Any, int]:
    """A ``chat_template`` value: a string, a list of ``{name, template}`` or a ``{name: template}`` dict."""
    if isinstance(value, str):
        return rewrite_template(value, tags)
    total = 0
    if isinstance(value, list):
        out_list = []
        for item in value:
            if isinstance(item, dict) and isinstance(item.get("template"), str):
                text, n = rewrite_template(item["template"], tags)
                item = {**item, "template": text}
                total += n
            out_list.append(item)
        return out_list, total
    if isinstance(value, dict):
        out_dict = {}
        for name, item in value.items():
            if isinstance(item, str):
                item, n = rewrite_template(item, tags)
                total += n
            out_dict[name] = item
        return out_dict, total
    return value, 0


def _paths_containing(obj: Any, needle: str, path: str = "") -> Iterator[str]:
    if isinstance(obj, str):
        if needle in obj:
            yield path or "(value)"
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if needle in str(key):
                yield f"{path}.{key} (key)" if path else f"{key} (key)"
            yield from _paths_containing(value, needle, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _paths_containing(value, needle, f"{path}[{i}]")


# -------------------------------------------------------------------------------- tokenization
def _tokenizer_from(tok_json: dict, path: Path | None):
    """``Tokenizer.from_str`` with its failures (errors and Rust panics alike) as one UserError."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(json.dumps(tok_json, ensure_ascii=False))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - a malformed file can make the Rust side panic
        raise UserError(f"'{path or TOKENIZER_JSON}' cannot be loaded by the tokenizers library: "
                        f"{_one_line(exc, 120)}") from exc


def ordinary_tokenizer(tok_json: dict, path: Path | None = None):
    """A ``tokenizers.Tokenizer`` with the same rules but no added tokens: the ordinary vocabulary only."""
    bare = dict(tok_json)
    bare["added_tokens"] = []
    return _tokenizer_from(bare, path)


def full_tokenizer(tok_json: dict, path: Path | None = None):
    """A ``tokenizers.Tokenizer`` for a tokenizer.json dict as written."""
    return _tokenizer_from(tok_json, path)


def tag_pieces(tok_json: dict, tags: Tags, path: Path | None = None) -> dict[str, list[int]]:
    """The ordinary-vocabulary ids each new tag splits into."""
    bare = ordinary_tokenizer(tok_json, path)
    return {tag: bare.encode(tag, add_special_tokens=False).ids for tag in (tags.open, tags.close)}


# -------------------------------------------------------------------------------- file helpers
def _read_text(path: Path) -> str:
    """A UTF-8 text file with universal newlines (as ``read_text``), or one UserError naming it."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"'{path}' is not valid UTF-8 text (byte {exc.start})") from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _parse_json(path: Path, text: str) -> Any:
    """``json.loads`` with every failure as one UserError naming ``path``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}' is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from exc
    except RecursionError as exc:
        raise UserError(f"'{path}' is not usable JSON: nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer literal longer than Python converts
        raise UserError(f"'{path}' is not usable JSON ({_one_line(exc, 80)})") from exc


def _read_json(path: Path) -> Any:
    return _parse_json(path, _read_text(path))


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _json_object(path: Path, text: str) -> dict:
    """The JSON object ``text`` of file ``path``; UserError when it is another JSON type."""
    obj = _parse_json(path, text)
    if not isinstance(obj, dict):
        raise UserError(f"'{path}' holds {_json_kind(obj)} where a JSON object belongs")
    return obj


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tokenizer_json(path: Path, tok: dict) -> None:
    """The parts of a tokenizer.json this module reads must have the types the format gives them."""
    added = tok.get("added_tokens")
    if added is not None and not isinstance(added, list):
        raise UserError(f"'{path}': added_tokens is {_json_kind(added)}, not a list")
    for i, entry in enumerate(added or []):
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str) and _is_id(entry.get("id"))):
            raise UserError(f"'{path}': added_tokens[{i}] is not an object with a string content and an integer id")
    model = tok.get("model")
    if model is not None and not isinstance(model, dict):
        raise UserError(f"'{path}': model is {_json_kind(model)}, not an object")
    vocab = (model or {}).get("vocab")
    if vocab is not None and not isinstance(vocab, (dict, list)):
        raise UserError(f"'{path}': model.vocab is {_json_kind(vocab)}, not an object or a list")
    if isinstance(vocab, dict) and not all(_is_id(v) for v in vocab.values()):
        raise UserError(f"'{path}': model.vocab has a value that is not a token id")


def _read_tokenizer_json(path: Path) -> tuple[str, dict]:
    """(text, checked dict) of a tokenizer.json."""
    text = _read_text(path)
    tok = _json_object(path, text)
    _check_tokenizer_json(path, tok)
    return text, tok


def _dump_like(obj: Any, original: str) -> str:
    """Serialise ``obj`` in the style of ``original`` (indent width, trailing newline, non-ASCII kept)."""
    m = re.match(r"[\[{]\r?\n([ \t]+)", original)
    indent: int | str | None = None
    if m:
        ws = m.group(1)
        indent = len(ws) if set(ws) == {" "} else ws
    ascii_only = original.isascii() and "\\u" in original
    text = json.dumps(obj, ensure_ascii=ascii_only, indent=indent)
    return text + "\n" if original.endswith("\n") else text


def _write_text(path: Path, text: str) -> None:
    publish.write_bytes(path, text.encode("utf-8"))


def _is_template_file(rel: Path) -> bool:
    return rel.suffix == ".jinja" or (len(rel.parts) == 1 and rel.name in TEMPLATE_JSON_FILES)


def applies_to() -> list[str]:
    """The config ``model_type`` values whose embedding rows retag-think patches (every registered family: the
    input embedding and output layer are found through the family of the tensors; the tags are the tokenizer's)."""
    return [t for family in FAMILIES for t in family.model_types]


def _embedding_names(tensors: dict) -> tuple[str, str | None]:
    """The input-embedding tensor and the lm_head tensor (None when tied and not stored)."""
    family = guess_family(tensors)
    if family is not None:
        embed = family.embed
    else:
        found = [k for k in tensors if k.endswith("embed_tokens.weight") and "visual" not in k]
        if len(found) != 1:
            expected = "' or '".join(dict.fromkeys(f.embed for f in FAMILIES))
            raise UserError("cannot find the input embedding (expected "
                            f"'{expected}'{', found ' + ', '.join(found) if found else ''})")
        embed = found[0]
    output = (family or FAMILIES[0]).output
    head = output if output in tensors else None
    if head is None:
        found = [k for k in tensors if k.endswith("lm_head.weight")]
        head = found[0] if len(found) == 1 else None
    for name in (embed, head):
        info = tensors[name] if name is not None else None
        if info is not None and (len(info.shape) != 2 or 0 in info.shape):
            raise UserError(f"'{info.file}' stores '{name}' with shape {list(info.shape)}, not a [rows, hidden] matrix")
    return embed, head


def _row_blocks(rows: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, _ROW_BLOCK_BYTES // max(row_bytes, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def mean_of_rows(ckpt: HFCheckpoint, name: str, ids: list[int]) -> torch.Tensor:
    """Mean (computed in float32, cast back) of rows ``ids`` of matrix ``name``."""
    rows = torch.stack([ckpt.read_rows(name, i, i + 1)[0] for i in ids]).to(torch.float32)
    return rows.mean(dim=0).to(to_torch(ckpt.tensors[name].dtype))


def _write_patched_shard(ckpt: HFCheckpoint, shard: Path, dst: Path, patches: dict[str, dict[int, torch.Tensor]],
                         advance: Callable[[int], None]) -> None:
    """Rewrite one shard tensor by tensor (row blocks for big ones), replacing the ``patches`` rows."""
    infos, metadata = read_header(shard)
    ordered = sorted(infos.values(), key=lambda t: t.start)
    writer = SafetensorsFileWriter(dst, [PlannedTensor(t.name, t.dtype, t.shape) for t in ordered],
                                   metadata=metadata or None)
    def blocks(t: Any) -> Iterator[torch.Tensor]:
        rows_patch = patches.get(t.name, {})
        if not t.shape or (t.nbytes <= _ROW_BLOCK_BYTES and not rows_patch):
            yield ckpt.read(t.name)
            advance(t.nbytes)
            return
        row_bytes = t.nbytes // t.shape[0] if t.shape[0] else 0
        for start, stop in _row_blocks(t.shape[0], row_bytes):
            block = ckpt.read_rows(t.name, start, stop)
            for row, value in rows_patch.items():
                if start <= row < stop:
                    block[row - start] = value
            yield block
            advance(block.numel() * block.element_size())  # the bar moves block by block

    try:
        for t in ordered:
            writer.write_blocks(t.name, blocks(t))
    except BaseException:
        writer.abort()  # keep the original error; the staged output is discarded
        raise
    writer.close()


def _link_or_copy(src: Path, dst: Path, link: bool) -> str:
    if link:
        try:
            publish.link_file(src, dst)
            return "linked"
        except OSError:
            pass
    publish.copy_file(src, dst)
    return "copied"


def read_record(folder: Path) -> dict | None:
    """The retag record of a folder, or None."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return None
    record = _read_json(path)
    return record if isinstance(record, dict) else None


# -------------------------------------------------------------------------------------- planning
@dataclass
class TokenizerRewrite:
    """New text of every tokenizer and template file, plus what changed."""

    files: dict[str, str]  # relative path -> new text
    changes: list[str]
    templates: dict[str, int]  # relative path -> tags replaced
    ids: dict[str, int]  # old tag -> id
    first_added: int
    max_id: int
    len_before: int
    len_after: int
    pieces: dict[str, list[int]]


def plan_tokenizer_rewrite(folder: Path, tags: Tags, strategy: str) -> TokenizerRewrite:
    """Read a folder's tokenizer and template files and compute their rewritten text (nothing written)."""
    folder = Path(folder)
    tok_path = folder / TOKENIZER_JSON
    if not tok_path.is_file():
        raise UserError(f"'{folder}' has no {TOKENIZER_JSON}: retag-think needs the checkpoint's tokenizer")
    tok_raw, tok = _read_tokenizer_json(tok_path)
    added = added_token_ids(tok)
    present = [t for t in (OLD_OPEN, OLD_CLOSE) if t in added]
    if not present:
        raise UserError(f"'{tok_path}' has no {OLD_OPEN} / {OLD_CLOSE} added tokens: nothing to retag")
    if len(present) == 1:
        raise UserError(f"'{tok_path}' has {present[0]} but not its partner as an added token: "
                        "the think tags are not balanced, fix the tokenizer first")
    for new in (tags.open, tags.close):
        if new in added:
            raise UserError(f"'{new}' is already a token (id {added[new]}) of '{tok_path}': choose another tag")
        inside = [a for a in added if a not in (OLD_OPEN, OLD_CLOSE) and a in new]
        if inside:
            raise UserError(f"'{new}' contains the added token '{inside[0]}': it would not be plain text")
    vocab = (tok.get("model") or {}).get("vocab") or {}
    if strategy == "special":
        for new in (tags.open, tags.close):
            if isinstance(vocab, dict) and new in vocab:
                raise UserError(f"'{new}' is already a single token (id {vocab[new]}) of the vocabulary: "
                                "use --strategy plain")
    mapping: dict[str, str | None] = ({OLD_OPEN: None, OLD_CLOSE: None} if strategy == "plain"
                                      else dict(tags.mapping()))
    first = first_added_id(tok)
    pieces = tag_pieces(tok, tags, tok_path)
    for tag, ids in pieces.items():
        if not ids or max(ids) >= first:
            raise UserError(f"'{tag}' does not split into ordinary vocabulary pieces ({ids})")
    files: dict[str, str] = {}
    changes: list[str] = []
    templates: dict[str, int] = {}

    new_tok, ch = rewrite_tokenizer_json(tok, mapping)
    files[TOKENIZER_JSON] = _dump_like(new_tok, tok_raw)
    changes += [f"{TOKENIZER_JSON}: {c}" for c in ch]

    cfg_path = folder / TOKENIZER_CONFIG
    if cfg_path.is_file():
        raw = _read_text(cfg_path)
        new_cfg, ch, n = rewrite_tokenizer_config(_json_object(cfg_path, raw), mapping, tags)
        files[TOKENIZER_CONFIG] = _dump_like(new_cfg, raw)
        changes += [f"{TOKENIZER_CONFIG}: {c}" for c in ch]
        if "chat_template" in new_cfg:
            templates[TOKENIZER_CONFIG] = n
    simple = ((ADDED_TOKENS_JSON, rewrite_added_tokens_json), (SPECIAL_TOKENS_MAP, rewrite_special_tokens_map))
    for name, func in simple:
        path = folder / name
        if path.is_file():
            raw = _read_text(path)
            obj = _json_object(path, raw)
            if name == ADDED_TOKENS_JSON and not all(_is_id(v) for v in obj.values()):
                raise UserError(f"'{path}' is not an object of token -> integer id")
            new_obj, ch = func(obj, mapping)
            files[name] = _dump_like(new_obj, raw)
            changes += ch
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or not _is_template_file(rel) or any(p.startswith(".") for p in rel.parts):
            continue
        raw = _read_text(path)
        if rel.suffix == ".jinja":
            text, n = rewrite_template(raw, tags)
            files[str(rel)] = text
            templates[str(rel)] = n
        else:
            obj = _json_object(path, raw)
            if "chat_template" in obj:
                obj = dict(obj)
                obj["chat_template"], n = rewrite_template_value(obj["chat_template"], tags)
                files[str(rel)] = _dump_like(obj, raw)
                templates[str(rel)] = n

    # Post-conditions: no rewritten file still names an old tag; ids are covered as promised.
    for rel, text in files.items():
        for old in (OLD_OPEN, OLD_CLOSE):
            if old in text:
                where = ""
                if rel.endswith(".json"):
                    where = ", at " + ", ".join(list(_paths_containing(json.loads(text), old))[:3])
                raise UserError(f"'{folder / rel}' still mentions {old} after the rewrite{where}: "
                                "this file has a use of the tag that retag-think does not know how to rewrite")
    new_full = full_tokenizer(new_tok, tok_path)
    if strategy == "plain":
        for tag in (tags.open, tags.close, OLD_OPEN, OLD_CLOSE):
            ids = new_full.encode(tag, add_special_tokens=False).ids
            if max(ids) >= first:
                raise UserError(f"after retiring the old tags '{tag}' still encodes to added ids {ids}")
    else:
        for old, new in tags.mapping().items():
            ids = new_full.encode(new, add_special_tokens=False).ids
            if ids != [added[old]]:
                raise UserError(f"after renaming, '{new}' encodes to {ids}, not [{added[old]}]")
    return TokenizerRewrite(files=files, changes=changes, templates=templates,
                            ids={OLD_OPEN: added[OLD_OPEN], OLD_CLOSE: added[OLD_CLOSE]}, first_added=first,
                            max_id=max_token_id(new_tok), len_before=len(vocab) + len(added),
                            len_after=len(vocab) + len(added_token_ids(new_tok)), pieces=pieces)


def _record_matches(record: dict, tags: Tags, strategy: str) -> bool:
    return record.get("strategy") == strategy and record.get("new") == [tags.open, tags.close]


def _already_done(folder: Path, tags: Tags, strategy: str, fix: str = "start from the original checkpoint to "
                  "choose other tags or another strategy") -> dict | None:
    """The record if ``folder`` is already retagged with these tags and strategy (and its tokenizer agrees);
    ``fix`` ends the error when it was retagged differently."""
    record = read_record(folder)
    if record is None:
        return None
    tok_path = folder / TOKENIZER_JSON
    if not tok_path.is_file():
        raise UserError(f"'{folder}' has a {RECORD_NAME} but no {TOKENIZER_JSON}")
    if not _record_matches(record, tags, strategy):
        raise UserError(f"'{folder}' was already retagged ({record.get('strategy')}: "
                        f"{' '.join(record.get('new') or [])}); {fix}")
    added = added_token_ids(_read_tokenizer_json(tok_path)[1])
    if strategy == "plain":
        ok = OLD_OPEN not in added and OLD_CLOSE not in added and tags.open not in added and tags.close not in added
    else:
        ids = record.get("ids") or {}
        ok = added.get(tags.open) == ids.get(OLD_OPEN) and added.get(tags.close) == ids.get(OLD_CLOSE)
    if not ok:
        raise UserError(f"'{folder}' has a {RECORD_NAME} that its {TOKENIZER_JSON} contradicts: "
                        "the folder was edited after retagging; start from the original checkpoint")
    return record


# -------------------------------------------------------------------------------------- the run
def retag_folder(src: str | Path, dst: str | Path | None = None, *, tags: Tags | None = None,
                 strategy: str = "plain", in_place: bool = False, overwrite: bool = False, link: bool = True,
                 info: Callable[[str], None] = lambda s: None,
                 progress: Any = None,
                 inputs: dict[str, str | Path | None] | None = None) -> dict:
    """Retag ``src`` into ``dst`` (or in place, atomically). Return a JSON-able summary.

    ``progress``: as ``Converter.run`` takes it (vlconvert/progress.py: a tqdm-like bar, or a callable
    returning advance(n), a bar or a context manager yielding one); ``inputs``:
    what else the command reads (``{"--data": path}``), which the output may not replace or contain.
    """
    tags = tags or resolve_tags()
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy '{strategy}': use {' or '.join(STRATEGIES)}")
    if (dst is None) == (not in_place):
        raise UsageError("give exactly one of --out DST and --in-place")
    src_path = resolve_source(src).absolute()
    dst_path = src_path if in_place else Path(dst).expanduser().absolute()  # type: ignore[arg-type]
    if not in_place and dst_path.resolve() == src_path.resolve():
        raise UserError("--out is the source folder: use --in-place to rewrite it")
    if not in_place and dst_path.resolve().is_relative_to(src_path.resolve()):
        raise UserError(f"--out '{dst_path}' is inside the source folder: choose a path outside it")

    base = {"source": str(src_path), "output": str(dst_path), "strategy": strategy,
            "new": [tags.open, tags.close], "old": [OLD_OPEN, OLD_CLOSE]}
    record = _already_done(src_path, tags, strategy)
    where = "the source"
    if record is None and not in_place and dst_path.exists() and not overwrite:
        done = read_record(dst_path)
        if done is not None and done.get("source") == str(src_path):
            record = _already_done(dst_path, tags, strategy,
                                   fix="pass --overwrite to replace it with these tags and strategy")
            where = "the output"
    if record is not None:
        retagged = src_path if where == "the source" else dst_path
        if where == "the source" and not in_place:  # nothing is written: never name --out as the output
            base["output"] = None
            info(f"the source is already retagged ({strategy}: {tags.open} {tags.close}); nothing written to "
                 f"'{dst_path}': use '{src_path}' as it is")
        else:
            info(f"{where} is already retagged ({strategy}: {tags.open} {tags.close}); nothing to do")
        return {**base, "changed": False, "reason": f"{where} is already retagged", "record": record,
                "retagged": str(retagged)}

    plan = plan_tokenizer_rewrite(src_path, tags, strategy)
    ckpt = HFCheckpoint(src_path)
    try:
        embed, head = _embedding_names(ckpt.tensors)
        rows = ckpt.tensors[embed].shape[0]
        if plan.max_id >= rows:
            raise UserError(f"the tokenizer can produce id {plan.max_id} but '{embed}' has only {rows} rows")
        if head is not None and ckpt.tensors[head].shape[0] <= plan.max_id:
            raise UserError(f"the tokenizer can produce id {plan.max_id} but '{head}' has only "
                            f"{ckpt.tensors[head].shape[0]} rows")
        if head is None and (src_path / "config.json").is_file():
            from vlconvert.models.registry import family_of, load_config

            if not load_config(src_path).tied:
                raise UserError(f"config.json says the embeddings are untied but no '{family_of(src_path).output}' "
                                "is stored")
        patches: dict[str, dict[int, torch.Tensor]] = {}
        rows_changed: dict[str, list[int]] = {}
        if strategy == "special":
            for matrix in [embed] + ([head] if head else []):
                patches[matrix] = {}
                for old, new in tags.mapping().items():
                    patches[matrix][plan.ids[old]] = mean_of_rows(ckpt, matrix, plan.pieces[new])
                rows_changed[matrix] = sorted(patches[matrix])
        patched_files = sorted({ckpt.tensors[m].file for m in patches})
        rewrite_bytes = sum(p.stat().st_size for p in patched_files)

        summary = {**base, "changed": True, "ids": plan.ids, "pieces": plan.pieces,
                   "first_added_id": plan.first_added, "len_tokenizer_before": plan.len_before,
                   "len_tokenizer_after": plan.len_after, "embedding_rows": rows, "embedding": embed,
                   "lm_head": head, "tied": head is None, "tokenizer_changes": plan.changes,
                   "templates": plan.templates, "rows_changed": rows_changed,
                   "shards_rewritten": [p.name for p in patched_files], "files_linked": 0, "files_copied": 0}
        if strategy == "plain":
            summary["note"] = (f"ids {plan.ids[OLD_OPEN]} and {plan.ids[OLD_CLOSE]} are no longer produced by the "
                               f"tokenizer; their rows stay in the {rows}-row matrix, unused, like the padding rows")
        record = {"tool": "vlconvert retag-think", "vlconvert_version": __version__,
                  **{k: summary[k] for k in ("source", "strategy", "old", "new", "ids", "pieces",
                                             "len_tokenizer_before", "len_tokenizer_after", "tokenizer_changes",
                                             "templates", "rows_changed", "shards_rewritten")}}
        rewritten = set(plan.files) | {RECORD_NAME} | {str(p.relative_to(src_path)) for p in patched_files}
        needed = rewrite_bytes + sum(len(t.encode()) for t in plan.files.values())
        if not link:
            needed += sum(p.stat().st_size for p in src_path.rglob("*") if p.is_file())
        read = {**({} if in_place else {"SRC": src_path}), **(inputs or {})}  # --in-place replaces SRC on purpose
        with publish.staged_output(dst_path, inputs=read, overwrite=overwrite or in_place,
                                   needed_bytes=needed, info=info) as stage:
            info(f"retagging {src_path} -> {dst_path} ({strategy})")  # once the output is known to be free
            for path in sorted(src_path.rglob("*")):
                rel = path.relative_to(src_path)
                if path.is_dir() or str(rel) in rewritten or str(rel) == publish.MANIFEST_NAME:
                    continue
                publish.check_inside(path, src_path)  # never copy a file SRC only links to from outside
                how = _link_or_copy(path, stage / rel, link and path.name.endswith(WEIGHT_SUFFIXES))
                summary[f"files_{how}"] += 1
            for rel, text in plan.files.items():
                _write_text(stage / rel, text)
            if patched_files:
                total = rewrite_bytes
                with progress_bar(progress, "rewriting shards", total) as advance:
                    for shard in patched_files:
                        _write_patched_shard(ckpt, shard, stage / shard.relative_to(src_path), patches, advance)
                if (src_path / INDEX_NAME).is_file():
                    HFCheckpoint(stage).close()  # the copied index must still describe the rewritten shards
            _write_text(stage / RECORD_NAME, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    finally:
        ckpt.close()
    info(f"wrote {dst_path}")
    return summary


# ---------------------------------------------------------------------------------------- JSONL
def _retag_obj(obj: Any, tags: Tags, counts: list[int], key: str | None = None) -> Any:
    if isinstance(obj, str):
        if key in _MEDIA_KEYS:
            return obj
        new, n_open, n_close = retag_text(obj, tags)
        counts[0] += n_open
        counts[1] += n_close
        return new
    if isinstance(obj, list):
        return [_retag_obj(v, tags, counts, key) for v in obj]
    if isinstance(obj, dict):
        return {k: (v if k in _MEDIA_KEYS else _retag_obj(v, tags, counts, k)) for k, v in obj.items()}
    return obj


def retag_record(obj: Any, tags: Tags) -> tuple[Any, int, int]:
    """Replace the old tags in every text of one training record (ms-swift ``messages``, LLaVA
    ``conversations``/``value``, string or list-of-parts content, and any other text field), leaving media
    paths alone. Return (new record, openings, closings)."""
    counts = [0, 0]
    return _retag_obj(obj, tags, counts), counts[0], counts[1]


def check_jsonl_paths(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                      checkpoint: str | Path | None = None, out: str | Path | None = None) -> None:
    """Fail early (before any checkpoint is written) on an unusable --data / --data-out pair; ``checkpoint``
    (SRC, an input) and ``out`` (the folder being written, SRC itself with --in-place) may not hold --data-out."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UsageError(f"--data '{src}' does not exist")
    if dst.exists() and dst.resolve() == src.resolve():
        raise UsageError("--data-out must differ from --data")
    if out is not None:
        real_dst, real_out = Path(os.path.realpath(dst)), Path(os.path.realpath(out))
        if real_dst.is_relative_to(real_out) or real_out.is_relative_to(real_dst):
            raise UserError(f"--data-out '{dst}' is inside the output folder '{out}', which is written as a whole: "
                            "choose a path outside it")
    publish.check_no_overlap(dst, {"SRC": checkpoint, "--data": src}, name="--data-out")
    if dst.exists() and not overwrite:
        raise UserError(f"--data-out '{dst}' already exists: choose another path or pass --overwrite")
    if not dst.absolute().parent.is_dir():
        raise UsageError(f"--data-out parent folder '{dst.absolute().parent}' does not exist")


def _bad_utf8_line(src: Path) -> int:
    """The number of the first line of ``src`` that is not valid UTF-8 (0 if none)."""
    with open(src, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def _retag_line(src: Path, number: int, body: str, tags: Tags) -> tuple[Any, str | None, int, int]:
    """Parse one non-blank JSONL line; return (record, new text or None when untouched, openings, closings)."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        raise UserError(f"'{src}' line {number} is not valid JSON: {exc.msg}") from exc
    except RecursionError as exc:
        raise UserError(f"'{src}' line {number} is nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer literal longer than Python converts
        raise UserError(f"'{src}' line {number} is not usable JSON: {_one_line(exc, 80)}") from exc
    if not _OLD_TAG_RE.search(body):
        return obj, None, 0, 0
    try:
        new, n_open, n_close = retag_record(obj, tags)
        text = json.dumps(new, ensure_ascii=False) if n_open or n_close else None
        if text is not None:
            text.encode("utf-8")
    except RecursionError as exc:
        raise UserError(f"'{src}' line {number} is nested too deeply") from exc
    except UnicodeEncodeError as exc:
        raise UserError(f"'{src}' line {number} holds a lone surrogate escape, which cannot be written as "
                        "UTF-8") from exc
    return new, text, n_open, n_close


def _scan_jsonl(src: Path, tags: Tags, fout: Any = None, dst: Path | None = None) -> dict:
    """Read every line of ``src`` and retag it, writing to ``fout`` when given; return the stats.

    Every way a line can be unusable (bad UTF-8, bad JSON, too deep, unwritable) is a UserError naming it.
    """
    stats = {"data": str(src), "data_out": str(dst) if dst is not None else None, "lines": 0, "records": 0,
             "records_changed": 0, "opening_replaced": 0, "closing_replaced": 0, "records_unbalanced": 0}
    try:
        with open(src, encoding="utf-8", newline="") as fin:
            for number, line in enumerate(fin, start=1):
                stats["lines"] += 1
                body = line.rstrip("\r\n")
                if not body.strip():
                    if fout is not None:
                        fout.write(line)
                    continue
                stats["records"] += 1
                _, text, n_open, n_close = _retag_line(src, number, body, tags)
                if text is not None:
                    stats["records_changed"] += 1
                    stats["opening_replaced"] += n_open
                    stats["closing_replaced"] += n_close
                    if n_open != n_close:
                        stats["records_unbalanced"] += 1
                if fout is not None:
                    fout.write(line if text is None else text + line[len(body):])
    except UnicodeDecodeError as exc:
        raise UserError(f"'{src}' line {_bad_utf8_line(src)} is not valid UTF-8") from exc
    except OSError as exc:
        if fout is not None:
            raise
        raise UserError(f"cannot read '{src}': {exc.strerror or exc}") from exc
    return stats


def validate_jsonl(src: str | Path, tags: Tags) -> dict:
    """Dry-run :func:`retag_jsonl` over ``src`` (nothing written): UserError for the first unusable line.

    Call it before publishing anything else, so a broken ``--data`` file fails the whole command early.
    """
    src = Path(src)
    if not src.is_file():
        raise UsageError(f"--data '{src}' does not exist")
    return _scan_jsonl(src, tags)


def retag_jsonl(src: str | Path, dst: str | Path, tags: Tags, *, overwrite: bool = False) -> dict:
    """Stream a JSONL file line by line, replacing the tags; lines without a tag are kept byte for byte.

    The output is written to a temporary sibling and renamed only when complete.
    """
    src, dst = Path(src), Path(dst)
    check_jsonl_paths(src, dst, overwrite=overwrite)
    tmp = dst.absolute().parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fout:
            stats = _scan_jsonl(src, tags, fout, dst)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return stats


# ---------------------------------------------------------------------------------------- check
def _row_norms(ckpt: HFCheckpoint, name: str) -> torch.Tensor:
    info = ckpt.tensors[name]
    row_bytes = info.nbytes // info.shape[0]
    parts = [ckpt.read_rows(name, a, b).to(torch.float32).norm(dim=1) for a, b in _row_blocks(info.shape[0], row_bytes)]
    return torch.cat(parts)


class _SkipWeights(Exception):
    """Internal: the caller asked for tokenizer facts only."""


def think_tag_report(folder: str | Path, tags: list[str] | None = None, *, weights: bool = True) -> dict:
    """Are a folder's think tags atomic tokens, and do their embedding rows look trained?

    Checks ``<think>``/``</think>``, the tags a retag record names, and ``tags``. For every id a tag encodes
    to, gives the input-embedding (and untied lm_head) row norm and its ratio to the median norm of the
    ordinary-vocabulary rows; a ratio under :data:`LOW_NORM_RATIO` is flagged ``looks_untrained``.
    Never raises for a missing tokenizer or missing weights: the dict says what was not found.
    ``weights=False`` skips the row norms (reads tokenizer files only).
    """
    folder = Path(folder)
    report: dict[str, Any] = {"folder": str(folder), "tokenizer": None, "record": read_record(folder),
                              "tags": [], "embedding": None, "lm_head": None, "low_norm_ratio": LOW_NORM_RATIO}
    tok_path = folder / TOKENIZER_JSON
    if not tok_path.is_file():
        report["verdict"] = f"no {TOKENIZER_JSON}"
        return report
    _, tok = _read_tokenizer_json(tok_path)
    report["tokenizer"] = str(tok_path)
    first = first_added_id(tok)
    report["first_added_id"] = first
    added = added_token_ids(tok)
    special = {e["content"]: bool(e.get("special")) for e in tok.get("added_tokens") or []}
    names = [OLD_OPEN, OLD_CLOSE]
    if report["record"]:
        names += [t for t in report["record"].get("new") or [] if isinstance(t, str)]
    names += list(tags or [])
    names = list(dict.fromkeys(names))
    full = full_tokenizer(tok, tok_path)

    norms: dict[str, torch.Tensor] = {}
    try:
        if not weights:
            raise _SkipWeights
        ckpt = HFCheckpoint(folder)
        embed, head = _embedding_names(ckpt.tensors)
        for key, name in (("embedding", embed), ("lm_head", head)):
            if name is None:
                continue
            norms[key] = _row_norms(ckpt, name)
            median = float(norms[key][: min(first, len(norms[key]))].median())
            report[key] = {"tensor": name, "rows": int(norms[key].shape[0]), "median_trained_norm": median}
        ckpt.close()
    except UserError as exc:
        report["weights_error"] = str(exc)
    except _SkipWeights:
        report["weights"] = "not read (row norms: vlconvert retag-think --check, or inspect --rows)"

    verdicts = []
    for name in names:
        ids = full.encode(name, add_special_tokens=False).ids
        atomic = len(ids) == 1 and ids[0] == added.get(name)
        entry: dict[str, Any] = {"text": name, "ids": ids, "atomic": atomic,
                                 "special": special.get(name) if atomic else None, "rows": []}
        for tid in ids:
            row: dict[str, Any] = {"id": tid, "trained_range": tid < first}
            for key, values in norms.items():
                if tid < len(values):
                    norm = float(values[tid])
                    ratio = norm / report[key]["median_trained_norm"] if report[key]["median_trained_norm"] else None
                    row[f"{key}_norm"] = norm
                    row[f"{key}_ratio"] = ratio
                    row[f"{key}_looks_untrained"] = ratio is not None and ratio < LOW_NORM_RATIO
            entry["rows"].append(row)
        entry["looks_untrained"] = any(r.get("embedding_looks_untrained") or r.get("lm_head_looks_untrained")
                                       for r in entry["rows"])
        report["tags"].append(entry)
        if name in (OLD_OPEN, OLD_CLOSE):
            verdicts.append(atomic)
    old = report["tags"][:2]
    if all(verdicts):
        state = "atomic <think>/</think> tokens"
        state += (" with untrained-looking rows: run `vlconvert retag-think`" if any(t["looks_untrained"] for t in old)
                  else "" if not norms else " whose rows look like trained rows")
    elif not any(verdicts):
        state = "<think>/</think> are plain text (ordinary pieces)"
    else:
        state = "only one of <think>/</think> is an atomic token (unbalanced tokenizer)"
    if report["record"]:
        state += f"; retagged ({report['record'].get('strategy')}: {' '.join(report['record'].get('new') or [])})"
    report["verdict"] = state
    return report


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """Rows of the human summary table of one retag run."""
    if not summary.get("changed"):
        output = summary["output"] or f"none written (use {summary.get('retagged') or summary['source']} as it is)"
        return [("result", summary.get("reason", "nothing to do")), ("output", output)]
    rows = [("strategy", summary["strategy"]),
            ("tags", f"{OLD_OPEN} -> {summary['new'][0]}, {OLD_CLOSE} -> {summary['new'][1]}"),
            ("pieces", ", ".join(f"{k} = {v}" for k, v in summary["pieces"].items())),
            ("len(tokenizer)", f"{summary['len_tokenizer_before']} -> {summary['len_tokenizer_after']} "
                               f"(embedding rows {summary['embedding_rows']})"),
            ("tokenizer edits", str(len(summary["tokenizer_changes"]))),
            ("templates", ", ".join(f"{k}: {v}" for k, v in summary["templates"].items()) or "none"),
            ("rows changed", ", ".join(f"{k}: {v}" for k, v in summary["rows_changed"].items()) or "none"),
            ("shards rewritten", ", ".join(summary["shards_rewritten"]) or "none"),
            ("files linked / copied", f"{summary['files_linked']} / {summary['files_copied']}"),
            ("output", summary["output"])]
    return rows
