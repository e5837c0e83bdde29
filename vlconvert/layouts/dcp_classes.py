"""torch's DCP metadata classes, imported on first use.

``import torch.distributed.checkpoint`` costs about 0.85 s of start-up on a small machine (it pulls in
DTensor and its operator tables); conversions that never read or write a DCP or torch_dist checkpoint
should not pay it. Modules use ``dcp_classes.TensorStorageMetadata`` and so on: the first attribute
looked up here imports the torch module that defines it.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {name: "torch.distributed.checkpoint.metadata" for name in (
    "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta",
    "TensorProperties", "TensorStorageMetadata")}
_WHERE["_StorageInfo"] = "torch.distributed.checkpoint.filesystem"


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
