"""torch's objects by name, so torch pickles (DCP ``.metadata``, a record's ``data.pkl``) are read and
written without importing torch.

Reading: a pickle's ``torch.Size``, ``torch.bfloat16`` and ``torch.strided`` become :class:`Size`,
:class:`vlconvert.dtypes.DType` and :class:`Layout`. Writing: :class:`NamingPickler` (the pure-Python
pickler) writes each stand-in, and each :class:`TorchGlobal`, as the global torch's own object is pickled
as, so the bytes are those ``pickle`` gives torch's objects (``tests/test_dcp_metadata.py`` and the record
tests compare them). Where torch is already imported the stand-ins reduce to torch's own objects, so the
C pickler can write them too.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any

from vlconvert.dtypes import BY_NAME, DType
from vlconvert.lazy import is_loaded, torch


class TorchGlobal:
    """A function or class of torch named by module and name (``torch._utils._rebuild_tensor_v2``), never
    imported; one instance per name, so a pickle refers back to it as it would to torch's object."""

    _made: dict[tuple[str, str], TorchGlobal] = {}

    def __new__(cls, module: str, name: str) -> TorchGlobal:
        key = (module, name)
        if key not in cls._made:
            self = super().__new__(cls)
            # a string object of its own, as the __module__ of each torch object is: the pickler memoizes
            # strings by identity, and torch's pickles name "torch" anew for a dtype and for torch.Size
            self.module, self.name = "".join(module), name
            cls._made[key] = self
        return cls._made[key]

    def __call__(self, *args: Any) -> Any:  # the pickler requires a reduce function to be callable
        raise TypeError(f"{self.module}.{self.name} is a name here, not torch's object")

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"

    def real(self) -> Any:
        """torch's own object (imports torch)."""
        module = torch if self.module == "torch" else getattr(torch, self.module.removeprefix("torch."))
        return getattr(module, self.name)


_DTYPE_MODULE = "".join("torch")  # the pickler finds a dtype's module by its key in sys.modules: one object
TORCH_SIZE = TorchGlobal("torch", "Size")
GET_LAYOUT = TorchGlobal("torch.serialization", "_get_layout")


def torch_object(ref: TorchGlobal) -> Any:
    """torch's object where torch is imported (the C pickler needs it), else the name (for NamingPickler)."""
    return ref.real() if is_loaded("torch") else ref


class Size(tuple):
    """A ``torch.Size`` without torch: a tuple that pickles as ``torch.Size``."""

    __slots__ = ()

    def __repr__(self) -> str:  # as torch.Size prints: DCP's save_id is made from it (DCPWriter.finish)
        return f"torch.Size({list(self)})"

    def __reduce__(self):
        return (torch_object(TORCH_SIZE), (tuple(self),))


class Layout(str):
    """A ``torch.layout`` without torch (``"torch.strided"``); pickles as torch's."""

    __slots__ = ()

    def __reduce__(self):
        return (torch_object(GET_LAYOUT), (str(self),))


STRIDED = Layout("torch.strided")  # one object, as torch.strided is: a pickle refers back to it


def layout_named(name: object) -> Layout:
    """Stands in for ``torch.serialization._get_layout`` when a pickle is read."""
    if not isinstance(name, str):
        raise TypeError(f"a layout's name is a string, not {type(name).__name__}")
    return STRIDED if name == STRIDED else Layout(name)


def _as_stand_in(obj: Any) -> Any:
    """The stand-in for torch's ``Size`` class, a dtype or ``_get_layout`` (torch is imported); else ``obj``."""
    real = sys.modules["torch"]
    if obj is real.Size:
        return TORCH_SIZE
    if obj is real.serialization._get_layout:
        return GET_LAYOUT
    if type(obj) is real.dtype:
        return BY_NAME.get(str(obj).removeprefix("torch."), obj)
    return obj


class NamingPickler(pickle._Pickler):  # type: ignore[name-defined]  # the pure-Python pickler
    """Writes :class:`TorchGlobal` and :class:`~vlconvert.dtypes.DType` as torch's globals, and
    :class:`Size` / :class:`Layout` through them, with no torch imported."""

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if is_loaded("torch"):  # torch's own Size class, dtypes and _get_layout as the stand-ins, so a pickle
            obj = _as_stand_in(obj)  # mixing both refers back to one global, as torch's own pickle does
        super().save(obj, save_persistent_id)

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, TorchGlobal):
            return obj.name  # a string: saved as a global (save_global below)
        if isinstance(obj, DType):
            return str.__str__(obj)
        if isinstance(obj, Size):
            return (TORCH_SIZE, (tuple(obj),))
        if isinstance(obj, Layout):
            return (GET_LAYOUT, (str(obj),))
        return NotImplemented

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if isinstance(obj, TorchGlobal):
            module, name = obj.module, obj.name
        elif isinstance(obj, DType):
            module, name = _DTYPE_MODULE, str.__str__(obj)
        else:
            return super().save_global(obj, name)
        self.write_global(module, name)
        self.memoize(obj)

    def write_global(self, module: str, name: str) -> None:
        """The opcodes ``pickle`` writes for global ``module.name`` at this protocol."""
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
