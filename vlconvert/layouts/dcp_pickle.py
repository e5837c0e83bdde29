"""DCP ``.metadata`` pickles, written and read without importing ``torch.distributed.checkpoint``.

:func:`dumps` gives the bytes ``pickle.dumps`` gives for the same metadata built from torch's classes
(``tests/test_dcp_metadata.py`` compares them byte for byte), from the stand-ins of
:mod:`vlconvert.layouts.dcp_classes`: the C pickler writes them under their aliases, which are then
replaced by torch's module names. Should an alias's bytes turn up anywhere else in the pickle (a key
spelling one), the pure-Python pickler writes torch's names directly instead (slower, same bytes).

:func:`loads` unpickles torch's DCP classes into the stand-ins through an allowlist: any other global
(a function, another class, an alias) is refused with :class:`RefusedClass`, and nothing is imported.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle

from vlconvert.dtypes import BY_NAME
from vlconvert.layouts import dcp_classes, torch_names
from vlconvert.lazy import is_loaded, loaded, torch

_ALIASES = ((dcp_classes.METADATA_ALIAS, dcp_classes.METADATA_MODULE),
            (dcp_classes.FILESYSTEM_ALIAS, dcp_classes.FILESYSTEM_MODULE))
_OTHERS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("pathlib", "PosixPath"): pathlib.PosixPath, ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.WindowsPath, ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
}


def _short_unicode(text: str) -> bytes:
    """The SHORT_BINUNICODE opcode that writes ``text`` (under 256 bytes)."""
    data = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


class _Pickler(torch_names.NamingPickler):
    """Writes each stand-in class as a global naming torch's class (as ``pickle`` does for torch's own), and
    torch's objects by name (:class:`~vlconvert.layouts.torch_names.NamingPickler`)."""

    def save_global(self, obj, name=None):
        real = dcp_classes.PICKLED_AS.get(obj) if isinstance(obj, type) else None
        if real is None:
            return super().save_global(obj, name)
        metadata = real[0] == dcp_classes.METADATA_MODULE
        module = dcp_classes.METADATA_MODULE if metadata else dcp_classes.FILESYSTEM_MODULE
        # the module's name as one string object per module, the class's __qualname__ object, as torch's
        self.write_global(module, obj.__qualname__)
        self.memoize(obj)


def dumps_pure(metadata: object, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    """``metadata`` pickled by the pure-Python pickler, naming torch's classes."""
    buf = io.BytesIO()
    _Pickler(buf, protocol).dump(metadata)
    return buf.getvalue()


def dumps(metadata: object, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    """``metadata`` (built from :mod:`dcp_classes`) pickled as ``pickle.dumps`` pickles torch's classes."""
    if protocol < 4 or not is_loaded("torch"):  # the C pickler needs torch's own Size, dtype and layout
        return dumps_pure(metadata, protocol)
    raw = pickle.dumps(metadata, protocol)
    for alias, _ in _ALIASES:
        # the C pickler writes a module's name once (later classes refer to it), as one opcode, never
        # split by a frame: exactly one occurrence is ours; none or more means a key spells it too
        if raw.count(_short_unicode(alias)) != 1:
            return dumps_pure(metadata, protocol)
    for alias, real in _ALIASES:
        raw = raw.replace(_short_unicode(alias), _short_unicode(real))
    return raw


class RefusedClass(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist."""


class _Unpickler(pickle.Unpickler):
    """Unpickles DCP metadata into the stand-ins, and nothing else (no code from a checkpoint runs)."""

    def find_class(self, module: str, name: str):
        found = dcp_classes.READ_AS.get((module, name))
        if found is None:
            found = _OTHERS.get((module, name))
        if found is None and (module, name) == ("torch", "Size"):
            found = torch_names.Size
        if found is None and (module, name) == ("torch.serialization", "_get_layout"):
            found = torch_names.layout_named
        if found is None and module == "torch" and name in BY_NAME:
            found = BY_NAME[name]
        if found is None and module == "torch" and isinstance(vars(loaded(torch)).get(name), torch.dtype):
            found = vars(loaded(torch))[name]  # a dtype: no lazy submodule import
        if found is None:
            raise RefusedClass(f"refusing to load {module}.{name}")
        return found


def loads(raw: bytes) -> object:
    """Unpickle DCP metadata (torch's classes become the stand-ins); :class:`RefusedClass` for any other
    global, the unpickler's own errors for a corrupt pickle."""
    return _Unpickler(io.BytesIO(raw)).load()
