"""Where a checkpoint named on the command line lies: a folder, or a model id in the local Hugging Face cache.

Kept apart from the format modules (and from torch), so commands that only check files, such as
``verify --manifest``, start without importing torch."""

from __future__ import annotations

import re
from pathlib import Path

from vlconvert.errors import UsageError


def resolve_source(src: str | Path) -> Path:
    """A folder path, or a model id found in the local Hugging Face cache (never downloads).

    Every command that takes a checkpoint resolves it here. A path that does not exist is answered first
    as a path: ``no such folder 'fixtures/tiny-mo' (did you mean 'fixtures/tiny-moe'?)``; only text that
    looks like a model id (``org/name``, not a near miss of an existing folder) gets the ``hf download`` hint.
    """
    text = str(src)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"'{src}' is a file: give the checkpoint folder")
        return path
    model_id = _MODEL_ID.fullmatch(text) is not None
    if model_id:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True))
        except Exception:  # noqa: BLE001 - any hub error means "not in the local cache"
            pass
    near = _near_miss(path)
    if near is not None:
        raise UsageError(f"no such folder '{src}' (did you mean '{text[: len(text) - len(path.name)]}{near}'?)")
    if not model_id:
        raise UsageError(f"no such folder '{src}'")
    if path.parent.is_dir():  # an existing folder's child: a path first
        raise UsageError(f"no such folder '{src}' (nor a model '{src}' in the local Hugging Face cache)")
    raise UsageError(f"'{src}' is neither a folder nor a model in the local Hugging Face cache: download it "
                     f"first with 'hf download {src}' (vlconvert never downloads)")


_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _near_miss(path: Path) -> str | None:
    """The name of an existing entry beside ``path`` that ``path``'s name is probably a typo of."""
    import difflib

    parent = path.parent
    try:
        if not path.name or not parent.is_dir():
            return None
        names = [p.name for p in parent.iterdir() if not p.name.startswith(".")]
    except OSError:
        return None
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.75)
    return close[0] if close else None
