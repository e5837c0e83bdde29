"""One progress contract for every API that reports progress (``Converter.run``, ``retag_think``).

``progress`` may be any of:

- ``None``: no progress;
- a tqdm-like object (it has ``update(n)``): its ``total`` is set when it has none, and it is advanced by
  the bytes written; it is not closed (the caller owns it);
- a callable ``progress(description, total_bytes)`` returning any of: a per-step callback ``advance(n)``,
  a tqdm-like object, a context manager yielding either (the command line's rich bar), or ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Advance = Callable[[int], None]


def _noop(n: int) -> None:
    return None


def _advance_of(obj: Any) -> Advance | None:
    """The ``advance(n)`` an object stands for: a tqdm-like's ``update``, a callable itself, or None."""
    if obj is None:
        return _noop
    update = getattr(obj, "update", None)
    if callable(update) and not isinstance(obj, dict):
        return update
    if callable(obj):
        return obj
    return None


@contextmanager
def progress_bar(progress: Any, description: str, total: int) -> Iterator[Advance]:
    """A context manager yielding ``advance(n_bytes)`` for ``progress`` in any of the forms above."""
    if progress is None:
        yield _noop
        return
    if callable(getattr(progress, "update", None)):  # a tqdm-like bar handed over directly
        if getattr(progress, "total", 0) is None:
            try:
                progress.total = total
            except AttributeError:
                pass
        yield progress.update
        return
    if not callable(progress):
        raise TypeError(f"progress must be a callable or have update(n), not {type(progress).__name__}")
    made = progress(description, total)
    if hasattr(made, "__enter__") and hasattr(made, "__exit__"):
        with made as entered:
            advance = _advance_of(entered if entered is not None else made)
            if advance is None:
                raise TypeError("progress(description, total)'s context manager must yield advance(n) or a bar "
                                f"with update(n), not {type(entered).__name__}")
            yield advance
        return
    advance = _advance_of(made)
    if advance is None:
        raise TypeError("progress(description, total) must return advance(n), a bar with update(n), a context "
                        f"manager yielding one, or None; not {type(made).__name__}")
    yield advance


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB': the one size convention of every output (binary units: KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
