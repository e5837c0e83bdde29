"""Megatron-Core ``torch_dist`` checkpoints (``megatron.core.dist_checkpointing``): files and names.

A torch_dist checkpoint is a DCP folder (``.metadata``, ``__R_I.distcp``) plus ``common.pt`` (non-sharded
state, a pickle) and ``metadata.json`` (``{"sharded_backend": "torch_dist", ...}``), in ``release/`` or
``iter_NNNNNNN/`` beside ``latest_checkpointed_iteration.txt``. Tensors are global (unsharded); decoder
layers are stacked on a leading axis (key ``...decoder.layers.<rest>``), experts on a second one (key
``...mlp.experts.experts.linear_fc{1,2}.weight``). See ``docs/torch-dist.md``.

This module maps legacy (per-layer, per-expert) Megatron names to torch_dist keys and index prefixes,
writes chunks/bytes records (:class:`TorchDistWriter`) and reads ``common.pt`` without running code.
"""

from __future__ import annotations

import io
import json
import re
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vlconvert.dtypes import BY_NAME, DType, as_dtype
from vlconvert.errors import UserError
from vlconvert.errors import one_line as _one_line
from vlconvert.layouts import dcp_classes
from vlconvert.layouts import megatron as mlay
from vlconvert.layouts.consumers import CONSUMERS, DEFAULT_CONSUMER, Consumer, consumer  # noqa: F401
from vlconvert.layouts.dcp import _DTYPES, DCPReader, DCPWriter, TensorBlocks, kept_matching
from vlconvert.layouts.megatron import write_torch_record
from vlconvert.layouts.torch_names import Size
from vlconvert.lazy import torch
from vlconvert.publish import create_file, note_input

METADATA_JSON = "metadata.json"
COMMON = "common.pt"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
           "common_backend_version": 1}
_MAX_COMMON = 64 * 2**20
_SEQ_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12]\.weight)(\d+)$")
# megatron-core's local-spec norm names and the TE names its GPT layers save them under (its ViT keeps the former)
LOCAL_NORM_NAMES = ((".input_layernorm.", ".self_attention.linear_qkv.layer_norm_"),
                    (".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_"))
# the last name of every module with an ``_extra_state`` entry (see :func:`extra_state_keys`)
EXTRA_STATE_MODULES = frozenset({"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "q_layernorm", "k_layernorm",
                                 "pre_mlp_layernorm", "final_layernorm", "patch_norm"})


@dataclass(frozen=True)
class GlobalKey:
    """Where a legacy Megatron tensor lives in a torch_dist checkpoint: key, index prefix, stack sizes."""

    key: str
    index: tuple[int, ...]  # leading (stacked) indices: (layer,) or (layer, expert); () for plain tensors
    stack: tuple[int, ...]  # the sizes of those stacked axes
    alt: str | None = None  # a per-layer key (non-homogeneous layers) read when ``key`` is absent


def global_key(name: str, layers: int, vision_layers: int, mergers: int, experts: int,
               prefix: str = "language_model.") -> GlobalKey:
    """Map a globally numbered legacy name (``...layers.3.mlp.experts.local_experts.5.linear_fc1.weight``)
    to its torch_dist key and index; ``prefix`` is the language model's (empty for a plain GPTModel)."""
    lm_layers = f"{prefix}decoder.layers."
    stacks = {lm_layers: layers, "vision_model.decoder.layers.": vision_layers,
              "vision_model.decoder.deepstack_merger_list.": mergers}
    head = next((h for h in stacks if name.startswith(h)), None)
    num, _, rest = name[len(head):].partition(".") if head else ("", "", "")
    if head is None or not num.isdigit():
        return GlobalKey(name, (), ())
    num, count = int(num), stacks[head]
    e = _SEQ_EXPERT.match(rest) or _GROUPED_EXPERT.match(rest)
    if e is not None:
        expert, leaf = (int(e.group(1)), e.group(2)) if _SEQ_EXPERT.match(rest) else (int(e.group(2)), e.group(1))
        return GlobalKey(f"{head}mlp.experts.experts.{leaf}", (num, expert), (count, experts),
                         f"{head}{num}.mlp.experts.experts.{leaf}")
    return GlobalKey(f"{head}{rest}", (num,), (count,), f"{head}{num}.{rest}")


def extra_state_keys(gk: GlobalKey, name: str) -> list[str]:
    """The ``_extra_state`` byte entries megatron-core stores beside weight ``name`` (key ``gk``):
    ``<module>._extra_state/shard_<i>_<L>`` for a stacked layer, ``shard_<i>.<e>_<L>.<E>`` for an expert,
    ``shard_0_1`` for a module outside the layer stacks.

    Every module that has one under either spec gets one: the linears (language model, vision blocks,
    patch mergers; megatron-core's local linears and TE's both keep one) and the norms that Transformer
    Engine builds as separate modules (``q_layernorm``, ``k_layernorm``, ``pre_mlp_layernorm`` of MoE
    layers, ``final_layernorm``, ``patch_norm``: TE's norm ops keep one, local norms do not). A load at
    megatron-core's default strictness tolerates the entries a local-spec model does not ask for.
    """
    if not name.endswith(".weight") or not gk.key.endswith(".weight"):
        return []
    module = gk.key[:-len(".weight")]
    if module.rsplit(".", 1)[-1] not in EXTRA_STATE_MODULES:
        return []
    if len(gk.index) == 2:
        (i, e), (n, ne) = gk.index, gk.stack
        return [f"{module}._extra_state/shard_{i}.{e}_{n}.{ne}"]
    if len(gk.index) == 1:
        return [f"{module}._extra_state/shard_{gk.index[0]}_{gk.stack[0]}"]
    return [f"{module}._extra_state/shard_0_1"]


def extra_state_bytes() -> bytes:
    """What megatron-core stores for a module without FP8 state: ``torch.save([None])`` (written without torch)."""
    return mlay.torch_save_bytes([None])


# -------------------------------------------------------------------------------------- consumers
# what megatron-core's saves put in the common state beside the model (sharded_state_dict metadata)
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                    "distrib_optim_sharding_type": "dp_reshardable"}
COMMON_STATE_KEY = "common_state/shard_0_1"  # megatron-core >= 0.17 keeps the common state here too
TRAIN_STATE = "train_state.pt"
LATEST_TRAIN_STATE = "latest_train_state.pt"
RUN_CONFIG = "run_config.yaml"


def yaml_text(value: object, indent: int = 0) -> str:
    """``value`` (dicts, lists, strings, numbers, booleans, None) as YAML that PyYAML's ``safe_load`` reads back
    equal: JSON flow style, except that floats always carry a dot (YAML 1.1 reads ``1e-06`` as a string)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {yaml_text(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(v, indent + 1) for v in value) + "]"
    if isinstance(value, float) and (value != value or abs(value) == float("inf")):  # JSON configs may hold them
        return ".nan" if value != value else (".inf" if value > 0 else "-.inf")
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return (mantissa if "." in mantissa else mantissa + ".0") + (f"e{exponent}" if e else "")
    if isinstance(value, (bool, int, str)) or value is None:
        return json.dumps(value)
    raise TypeError(f"cannot write {type(value).__name__} to YAML")


def common_state_bytes(common: dict) -> bytes:
    """The ``common_state`` bytes entry megatron-core >= 0.17 writes: ``torch.save([common])``."""
    return mlay.torch_save_bytes([common])


_TRAIN_STATE = [("step", "int64"), ("consumed_train_samples", "int64"), ("skipped_train_samples", "int64"),
                ("consumed_valid_samples", "int64"), ("floating_point_operations_so_far", "float32"),
                ("do_train", "bool"), ("do_valid", "bool"), ("do_test", "bool")]
_SCALAR = {"int64": "<q", "float32": "<f", "bool": "<?"}


def train_state_bytes(iteration: int) -> bytes:
    """Megatron-Bridge's ``train_state.pt`` for a checkpoint at step ``iteration`` that has trained nothing: a dict
    of scalar tensors (``torch.save`` of them, written without torch)."""
    state, storages = {}, {}
    for i, (name, dtype) in enumerate(_TRAIN_STATE):
        value = iteration if name == "step" else 0
        state[name] = mlay.small_tensor(str(i), BY_NAME[dtype])
        storages[str(i)] = struct.pack(_SCALAR[dtype], value)
    return mlay.torch_save_bytes(state, storages)


# ------------------------------------------------------------------------------------------ folders
def is_torch_dist_dir(folder: Path) -> bool:
    """``folder`` holds ``metadata.json`` naming the torch_dist backend."""
    path = Path(folder) / METADATA_JSON
    if not path.is_file() or path.stat().st_size > 2**20:
        return False
    try:
        data = json.loads(note_input(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("sharded_backend") == "torch_dist"


def find_torch_dist_dir(root: Path) -> tuple[Path, str] | None:
    """(iteration folder, iteration) of a torch_dist checkpoint at ``root`` (or ``root`` itself), else None."""
    root = Path(root)
    if is_torch_dist_dir(root):
        return root, root.name.removeprefix("iter_")
    tracker = root / mlay.TRACKER
    if tracker.is_file():
        try:
            text = mlay.read_tracker(tracker)
        except UserError:
            return None
        sub = root / ("release" if text == "release" else mlay.iteration_folder(int(text)))
        return (sub, text) if is_torch_dist_dir(sub) else None
    candidates = sorted(root.glob("iter_*")) + [root / "release"]
    found = [c for c in candidates if c.is_dir() and is_torch_dist_dir(c)]
    if not found:
        return None
    last = found[-1] if found[-1].name != "release" or len(found) == 1 else found[-2]
    return last, last.name.removeprefix("iter_")


def read_common(path: Path) -> dict:
    """``common.pt`` through the restricted unpickler (nothing pickled is called; unknown classes inert)."""
    try:
        if path.stat().st_size > _MAX_COMMON:
            return {}
        return read_common_bytes(note_input(path).read_bytes(), listed=False)
    except OSError:
        return {}


def read_common_bytes(raw: bytes, listed: bool = True) -> dict:
    """A ``torch.save`` of the common state (``[dict]`` in a ``common_state`` entry when ``listed``) through
    the restricted unpickler; {} when it is anything else."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                return {}
            pickled = zf.read(names[0])
        mlay.check_pickle(pickled)
        payload = mlay._RestrictedUnpickler(io.BytesIO(pickled)).load()
    except Exception:  # noqa: BLE001 - a hostile or foreign common state is simply not used
        return {}
    if listed:
        payload = payload[0] if isinstance(payload, list) and len(payload) == 1 else None
    return payload if isinstance(payload, dict) else {}


def load_common(folder: Path, reader: DCPReader) -> dict:
    """The common state as megatron-core reads it: ``common.pt`` when present, else the ``common_state``
    entry inside the checkpoint (megatron-core >= 0.17)."""
    if (folder / COMMON).is_file():
        return read_common(folder / COMMON)
    raw = reader.read_bytes_entry(COMMON_STATE_KEY, _MAX_COMMON)
    return read_common_bytes(raw) if raw is not None else {}


# ------------------------------------------------------------------------------------------- writer
class TorchDistWriter(DCPWriter):
    """:class:`DCPWriter` with several chunks per key (stacked layers / experts) and bytes records.

    ``open_file(name, expect)``: ``expect`` lists each planned record as the journal stores it, without
    its place (``{"key", "size", "offsets", "shape", "dtype"}`` for a chunk, ``{"key", "bytes": True}``
    for a bytes record); a kept file is skipped only if its journaled records are exactly those.
    """

    def _kept_records(self, path: Path, kept: object, expect: list | None) -> list[dict] | None:
        return kept_matching(path, kept, expect) if expect is not None else None

    def _adopt_record(self, record: dict) -> None:
        if record.get("bytes"):
            self._add_bytes(record["key"], record["start"], record["length"])
        else:
            self._add_chunk(record["key"], tuple(record["size"]), tuple(record["offsets"]), tuple(record["shape"]),
                            _DTYPES[record["dtype"]], record["start"], record["length"])

    def _add_chunk(self, key: str, size: tuple[int, ...], offsets: tuple[int, ...], shape: tuple[int, ...],
                   dtype: DType, start: int, length: int) -> None:
        key = sys.intern(key)
        entry = self.state_dict_metadata.get(key)
        if entry is None:
            entry = dcp_classes.TensorStorageMetadata(properties=dcp_classes.TensorProperties(dtype=as_dtype(dtype)),
                                                      size=Size(size), chunks=[])
            self.state_dict_metadata[key] = entry
            self.planner_data[key] = (key,)
        elif tuple(entry.size) != size or entry.properties.dtype != dtype:
            raise ValueError(f"{key}: chunk of another size or dtype")
        entry.chunks.append(dcp_classes.ChunkStorageMetadata(offsets=Size(offsets), sizes=Size(shape)))
        index = dcp_classes.MetadataIndex(key, Size(offsets), 0)
        self.storage_data[index] = dcp_classes._StorageInfo(self._file_name, start, length)

    def _add_bytes(self, key: str, start: int, length: int) -> None:
        key = sys.intern(key)
        if key in self.state_dict_metadata:
            raise ValueError(f"duplicate key {key}")
        self.state_dict_metadata[key] = dcp_classes.BytesStorageMetadata()
        self.storage_data[dcp_classes.MetadataIndex(key)] = dcp_classes._StorageInfo(self._file_name, start, length)
        self.planner_data[key] = (key,)

    def write_chunk(self, key: str, tensor: torch.Tensor | TensorBlocks, offsets: tuple[int, ...],
                    size: tuple[int, ...], lead: int = 0) -> int:
        """Append ``tensor`` as the chunk of global tensor ``key`` (shape ``size``) at ``offsets``; a
        :class:`TensorBlocks` streams row blocks of its dims after the first ``lead`` (which are 1)."""
        shape = tuple(tensor.shape)
        if self.skipping:
            info = self.storage_data.get(dcp_classes.MetadataIndex(key, Size(offsets), 0))
            if info is None:
                raise RuntimeError(f"--resume: '{key}' at {list(offsets)} is not in the kept file {self._file_name}")
            return info.length
        if self._file is None:
            raise RuntimeError("open_file() first")
        start = self._file.tell()
        if isinstance(tensor, TensorBlocks):
            write_torch_record(self._file, shape, tensor.dtype, tensor.blocks, lead=lead)
        else:
            tensor = tensor.detach().contiguous()
            write_torch_record(self._file, shape, tensor.dtype, tensor)
        length = self._file.tell() - start
        self._add_chunk(key, size, offsets, shape, tensor.dtype, start, length)
        self._records.append({"key": key, "size": list(size), "offsets": list(offsets), "shape": list(shape),
                              "dtype": str(tensor.dtype), "start": start, "length": length})
        return length

    def write_bytes(self, key: str, data: bytes) -> int:
        """Append a bytes record (what DCP stores for a BytesIO value)."""
        if self.skipping:
            if key not in self.state_dict_metadata:
                raise RuntimeError(f"--resume: '{key}' is not in the kept file {self._file_name}")
            return self.storage_data[dcp_classes.MetadataIndex(key)].length
        if self._file is None:
            raise RuntimeError("open_file() first")
        start = self._file.tell()
        self._file.write(data)
        self._add_bytes(key, start, len(data))
        self._records.append({"key": key, "bytes": True, "start": start, "length": len(data)})
        return len(data)


def common_state(iteration: int | None, meta: dict, args: object | None = None) -> dict:
    """The common (non-sharded) state: ``checkpoint_version``, ``iteration``, ``content_metadata``, plain-data
    ``vlconvert`` facts and, for Megatron-LM and ms-swift, ``args``."""
    common: dict = {"checkpoint_version": mlay.CHECKPOINT_VERSION, "iteration": iteration or 0,
                    "content_metadata": dict(CONTENT_METADATA), mlay.META_KEY: meta}
    if args is not None:
        common["args"] = args
    return common


def write_common(folder: Path, common: dict) -> None:
    """``common.pt`` (what megatron-core 0.16 reads, and 0.19 prefers when present) and ``metadata.json``."""
    with create_file(folder / COMMON) as f:
        f.write(mlay.torch_save_bytes(common))
    with create_file(folder / METADATA_JSON) as f:
        f.write(json.dumps(BACKEND).encode())


def describe(path: Path) -> str:
    """A short name for messages."""
    return _one_line(str(path), 120)
