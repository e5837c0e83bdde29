"""``torch``, imported the first time one of its attributes is used.

``import torch`` costs 1.5 s on a small machine and 3-4 s with a CUDA build, and a plan (``vlconvert plan``,
``convert --dry-run``) touches no tensor. Modules that need torch only inside their functions write
``from vlconvert.lazy import torch`` and use ``torch.x`` as usual; the real import happens at the first
``torch.x``. Each access looks torch up again (no cache), so a test that patches ``torch.save`` patches it
for vlconvert too.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class LazyModule(types.ModuleType):
    """A stand-in for a module that imports it on first attribute access and then forwards to it."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(_import(self.__name__), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


torch: Any = LazyModule("torch")


def loaded(module: Any) -> types.ModuleType:
    """The real module behind a lazy one (importing it now); ``vars(loaded(torch))`` is torch's namespace."""
    return _import(module.__name__)


def _import(name: str) -> types.ModuleType:
    """``import name`` by the import statement's own path (which ``python -X importtime`` logs)."""
    __import__(name)
    return sys.modules[name]


def is_loaded(name: str) -> bool:
    """Whether module ``name`` has been imported (then using it costs nothing)."""
    return name in sys.modules


def is_tensor(value: object) -> bool:
    """``isinstance(value, torch.Tensor)`` without importing torch: before torch is imported, nothing is one."""
    return "torch" in sys.modules and isinstance(value, sys.modules["torch"].Tensor)
