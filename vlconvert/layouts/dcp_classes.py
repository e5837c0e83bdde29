"""Stand-ins for torch's DCP metadata classes, so ``.metadata`` is written and read without
``import torch.distributed.checkpoint``.

That import costs about 1 s of start-up on a small machine and 3-4 s with the CUDA build of torch on
a training node (it pulls in DTensor and its operator tables); vlconvert needs none of it to write or
read the ``.metadata`` pickle. The classes here have the fields, constructors, defaults, equality and
pickled state of torch's (``torch/distributed/checkpoint/metadata.py``, ``filesystem.py``,
``planner.py``), so :mod:`vlconvert.layouts.dcp_pickle` pickles them to the bytes torch's own classes
give, naming torch's classes, and unpickles torch's names into them. Reading needs no torch at all: sizes,
dtypes and layouts are read as :class:`Size`, :class:`vlconvert.dtypes.DType` and :class:`Layout`, which
pickle back to the bytes of ``torch.Size``, ``torch.dtype`` and ``torch.layout``; the metadata vlconvert
writes holds torch's own (torch is imported by then).

Each class written into ``.metadata`` carries, as ``__module__``, an alias as long as the name of the
torch module that defines the real class (:data:`PICKLED_AS`); the alias names this module in
``sys.modules``, so the C pickler can write it, and the pickle's bytes are those of torch's classes once
the alias is replaced by the real name (same length: the frame sizes stay right).
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from vlconvert.dtypes import DType, to_torch
from vlconvert.layouts.torch_names import STRIDED, Size
from vlconvert.lazy import is_loaded, torch

METADATA_MODULE = "torch.distributed.checkpoint.metadata"
FILESYSTEM_MODULE = "torch.distributed.checkpoint.filesystem"
PLANNER_MODULE = "torch.distributed.checkpoint.planner"
# the aliases: this module's name, then a tag padding it to the length of the torch module's name
METADATA_ALIAS = "vlconvert.layouts.dcp_classes.as_meta"
FILESYSTEM_ALIAS = "vlconvert.layouts.dcp_classes.as_fsinfo"
assert len(METADATA_ALIAS) == len(METADATA_MODULE) and len(FILESYSTEM_ALIAS) == len(FILESYSTEM_MODULE)


@dataclass
class ChunkStorageMetadata:
    """One stored chunk of a tensor: where it starts in the global tensor and its size."""

    offsets: torch.Size
    sizes: torch.Size


class _MEM_FORMAT_ENCODING(Enum):
    """How ``TensorProperties`` pickles its memory format (a ``torch.memory_format`` cannot be pickled)."""

    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


def _encodings() -> tuple[tuple[Any, _MEM_FORMAT_ENCODING], ...]:
    """Each memory format with its pickled encoding (a function: torch is imported when first needed)."""
    return ((torch.contiguous_format, _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT),
            (torch.channels_last, _MEM_FORMAT_ENCODING.TORCH_CHANNELS_LAST),
            (torch.preserve_format, _MEM_FORMAT_ENCODING.TORCH_PRESERVE_FORMAT))


@dataclass
class TensorProperties:
    """dtype (and deprecated layout, requires_grad, memory format, pinning) of a stored tensor."""

    dtype: DType = field(default_factory=lambda: torch.get_default_dtype())
    layout: torch.layout = STRIDED  # a stand-in that pickles as torch.strided (torch_names)
    requires_grad: bool = False
    memory_format: Any = _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT  # or a torch.memory_format
    pin_memory: bool = False

    def __getstate__(self):
        if isinstance(self.memory_format, _MEM_FORMAT_ENCODING):  # as read
            encoding = self.memory_format
        else:
            encoding = next((e for f, e in _encodings() if self.memory_format == f), None)
        if encoding is None:
            raise RuntimeError(f"Invalid torch.memory_format: {self.memory_format}")
        dtype = to_torch(self.dtype) if isinstance(self.dtype, DType) and is_loaded("torch") else self.dtype
        return (dtype, self.layout, self.requires_grad, encoding, self.pin_memory)

    def __setstate__(self, state) -> None:
        self.dtype, self.layout, self.requires_grad, encoding, self.pin_memory = state
        if not isinstance(encoding, _MEM_FORMAT_ENCODING):
            raise RuntimeError(f"Invalid torch.memory_format encoding: {encoding}")
        self.memory_format = encoding  # kept as read: the torch.memory_format would need torch


@dataclass
class TensorStorageMetadata:
    """A tensor entry: its properties, global size and chunks."""

    properties: TensorProperties
    size: torch.Size
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata:
    """A bytes entry (a ``BytesIO`` value of the state dict)."""


@dataclass
class StorageMeta:
    """Where and by which save the checkpoint was written."""

    checkpoint_id: Any = None
    save_id: str | None = None
    load_id: str | None = None
    modules: list[str] = field(default_factory=list)


@dataclass
class Metadata:
    """The checkpoint's metadata: what ``.metadata`` holds."""

    state_dict_metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata]
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: StorageMeta | None = None
    version: str | None = None


def make_metadata(**fields: Any) -> Metadata:
    """A :class:`Metadata` with the fields the installed torch's own class has: torch < 2.9 has no
    ``version`` (its ``dcp.save`` writes none), and its pickle must not carry one."""
    metadata = Metadata(**fields)
    if not has_version():
        del metadata.version  # the class default (None) is not pickled: the instance dict has no entry
    return metadata


@dataclass(frozen=True)
class MetadataIndex:
    """The key of a stored item: the tensor's name and, for a tensor, its chunk's offsets."""

    fqn: str
    offset: torch.Size | None = None
    index: int | None = field(hash=False, compare=False, default=None)

    def __init__(self, fqn: str, offset: Sequence[int] | None = None, index: int | None = None):
        # the attributes in torch's order (fqn, index, then offset only when given): the pickled state
        # is the instance dict, in insertion order
        object.__setattr__(self, "fqn", fqn)
        object.__setattr__(self, "index", index)
        if offset is not None:
            object.__setattr__(self, "offset", Size(offset))


@dataclass
class _StorageInfo:
    """Where an item's bytes are: a data file of the folder, an offset and a length."""

    relative_path: str
    offset: int
    length: int
    transform_descriptors: Sequence[str] | None = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if v is not None}


# megatron-core's torch_dist checkpoints may pickle DCP save plans too: read as data, never written
class WriteItemType(Enum):
    TENSOR = auto()
    SHARD = auto()
    BYTE_IO = auto()


@dataclass(frozen=True)
class TensorWriteData:
    chunk: ChunkStorageMetadata
    properties: TensorProperties
    size: torch.Size


@dataclass(frozen=True)
class WriteItem:
    index: MetadataIndex
    type: WriteItemType
    bytes_io_data: Any = None
    tensor_data: TensorWriteData | None = None


@dataclass(frozen=True)
class SavePlan:
    items: list[WriteItem]
    storage_data: Any = None
    planner_data: Any = None
    usable: bool = True


@functools.cache
def has_version() -> bool:
    """Whether the installed torch's ``Metadata`` has a ``version`` field (torch 2.9 added it); read from the
    package's metadata, without importing torch, where there is one."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a source build without an installed distribution
        version = torch.__version__
    parts = version.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (2, 9)
    except (IndexError, ValueError):
        return True

# (module, name) of torch's class for each stand-in class, and back
PICKLED_AS: dict[type, tuple[str, str]] = {
    cls: (METADATA_MODULE, cls.__qualname__) for cls in (
        ChunkStorageMetadata, _MEM_FORMAT_ENCODING, TensorProperties, TensorStorageMetadata, BytesStorageMetadata,
        StorageMeta, Metadata, MetadataIndex)}
PICKLED_AS[_StorageInfo] = (FILESYSTEM_MODULE, "_StorageInfo")
READ_AS: dict[tuple[str, str], type] = {name: cls for cls, name in PICKLED_AS.items()}
READ_AS.update({(PLANNER_MODULE, cls.__qualname__): cls for cls in (SavePlan, WriteItem, WriteItemType,
                                                                     TensorWriteData)})
for _cls, (_module, _) in PICKLED_AS.items():
    # one string object per module, as in torch (the pickle writes a module's name once, then refers to it)
    _cls.__module__ = METADATA_ALIAS if _module == METADATA_MODULE else FILESYSTEM_ALIAS
sys.modules.setdefault(METADATA_ALIAS, sys.modules[__name__])
sys.modules.setdefault(FILESYSTEM_ALIAS, sys.modules[__name__])
