"""vlconvert: convert Qwen3-VL checkpoints between HF, DCP and Megatron layouts; repair tokenizers.

The Python API mirrors the command line::

    from vlconvert import Converter
    conv = Converter("Qwen3-VL-30B-A3B-Instruct", "mg", to="megatron", tp=2, ep=4)
    plan = conv.plan()        # what would be written, as data (reads no weights)
    result = conv.run()       # streamed, published atomically, with a manifest

Names are imported lazily so ``import vlconvert`` (and ``vlconvert --help``) stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "Converter": "vlconvert.engine", "ConversionPlan": "vlconvert.engine", "Result": "vlconvert.engine",
    "convert": "vlconvert.engine", "open_source": "vlconvert.sources", "Source": "vlconvert.sources",
    "verify": "vlconvert.verify", "UserError": "vlconvert.errors",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlconvert' has no attribute {name!r}")
