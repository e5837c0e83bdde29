"""Atomic publishing of an output folder: write under a temporary name, rename only when complete."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from vlconvert.errors import UserError


def check_output_target(dst: Path, overwrite: bool) -> None:
    """Refuse an existing output (unless ``overwrite``) and a missing parent folder."""
    if dst.exists() and not overwrite:
        raise UserError(f"output '{dst}' already exists: choose another path or pass --overwrite")
    if not dst.parent.exists():
        raise UserError(f"output parent folder '{dst.parent}' does not exist")


def check_free_space(folder: Path, needed: int) -> None:
    """Fail before writing when the file system holding ``folder`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(f"not enough disk space in '{folder}': need {needed / 2**30:.2f} GiB, "
                        f"{free / 2**30:.2f} GiB free")


@contextlib.contextmanager
def staged_output(dst: Path, *, overwrite: bool = False, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``dst``; rename it to ``dst`` only if the block succeeds.

    On any failure (error, Ctrl-C, full disk) the temporary folder is removed, so ``dst`` never looks
    complete unless it is. An existing ``dst`` is replaced only with ``overwrite`` and only at the end.
    """
    dst = Path(dst).absolute()
    check_output_target(dst, overwrite)
    check_free_space(dst.parent, needed_bytes)
    stage = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing '{dst}': nothing was published; free space and rerun") from exc
        raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if dst.exists():
        trash = dst.parent / f".{dst.name}.old-{os.getpid()}"
        dst.rename(trash)
        stage.rename(dst)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink()
    else:
        stage.rename(dst)
