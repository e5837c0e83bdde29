"""vlconvert: convert Qwen3-VL checkpoints between HF, DCP and Megatron layouts; repair tokenizers.

The Python API mirrors the command line::

    from vlconvert import Converter
    conv = Converter("Qwen3-VL-30B-A3B-Instruct", "mg", to="megatron", tp=2, ep=4)
    plan = conv.plan()        # what would be written, as data (reads no weights)
    result = conv.run()       # streamed, published atomically, with a manifest

Names are imported lazily so ``import vlconvert`` (and ``vlconvert --help``) stays fast. Errors raised through
these names (:class:`UserError`) speak the API's words: ``tp=3 must divide ...``, not the command line's
``--tp 3``.
"""

from __future__ import annotations

import typing as _typing

__version__ = "0.2.0"

_LAZY = {
    "Converter": "vlconvert.engine", "ConversionPlan": "vlconvert.engine", "Result": "vlconvert.engine",
    "convert": "vlconvert.engine", "open_source": "vlconvert.sources", "Source": "vlconvert.sources",
    "verify": "vlconvert.comparison", "UserError": "vlconvert.errors",
}
_SPEAKS_API = ("Converter", "convert", "open_source", "verify")  # what raises errors a user reads
_LOADED: dict[str, _typing.Any] = {}  # the names loaded so far (kept out of globals(), see __getattr__)
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> _typing.Any:
    if name in _LOADED:
        return _LOADED[name]
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        if name in _SPEAKS_API:
            value = _api_class(value) if isinstance(value, type) else _api_errors(value)
        _LOADED[name] = value  # one class object: vlconvert.Converter is vlconvert.Converter
        return value
    raise AttributeError(f"module 'vlconvert' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (``dir(vlconvert)``), not the helpers this module uses."""
    return sorted(__all__)


def _api_errors(func: _typing.Callable) -> _typing.Callable:
    """``func`` whose :class:`UserError` messages name keyword arguments, not command-line options."""
    import functools

    from vlconvert.errors import UserError, in_api_wording

    @functools.wraps(func)
    def wrapper(*args: _typing.Any, **kwargs: _typing.Any) -> _typing.Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            raise in_api_wording(exc)  # noqa: B904 - the same exception, reworded in place

    wrapper.__module__ = "vlconvert"
    return wrapper


def _api_class(cls: type) -> type:
    """``cls`` with its public methods and properties (and ``__init__``) raising in the API's words."""
    namespace: dict[str, _typing.Any] = {"__doc__": cls.__doc__, "__module__": "vlconvert",
                                         "__qualname__": cls.__qualname__}
    for attr, value in vars(cls).items():
        if attr.startswith("_") and attr != "__init__":
            continue
        if isinstance(value, property) and value.fget is not None:
            namespace[attr] = property(_api_errors(value.fget), value.fset, value.fdel, value.__doc__)
        elif callable(value) and not isinstance(value, (staticmethod, classmethod, type)):
            namespace[attr] = _api_errors(value)
    return type(cls.__name__, (cls,), namespace)
