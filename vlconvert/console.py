"""What every command shares: --json/--quiet, one-line errors, the rich progress bar, the summary."""

from __future__ import annotations

import errno
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from vlconvert.errors import UserError

stderr = Console(stderr=True)
stdout = Console()


DEBUG = False  # set by --debug (group or command): show tracebacks instead of one line


def output_options(func: Callable) -> Callable:
    """Add ``--json``, ``--quiet`` and ``--debug`` to a command."""
    func = click.option("--debug", is_flag=True, help="Show the full traceback of an error.")(func)
    func = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")(func)
    func = click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON object (the summary) on stdout; progress goes nowhere.")(func)
    return func


def fail(message: str, code: int = 1) -> None:
    """Print ``message`` as one plain line on stderr (no markup, never wrapped) and exit with ``code``."""
    line = " ".join(str(message).split())
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    sys.exit(code)


def handle_errors(func: Callable) -> Callable:
    """Turn every failure into one line on stderr and a non-zero exit (a traceback only with --debug).

    UserError: its message, exit 1. Ctrl-C: exit 130. A full disk and other OS errors: one line naming
    the file, exit 1. Anything else is a bug: one line saying so, exit 1.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.pop("debug", False) or DEBUG
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            if debug:
                raise
            fail(f"error: {exc}")
        except KeyboardInterrupt:
            if debug:
                raise
            fail("interrupted: nothing was published", 130)
        except OSError as exc:
            if debug:
                raise
            if exc.errno == errno.ENOSPC:
                fail("error: disk full: nothing was published; free space and rerun")
            where = f" '{exc.filename}'" if exc.filename else ""
            fail(f"error: {exc.strerror or exc}{where}")
        except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
            if debug:
                raise
            fail(f"error: internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback "
                 "and report it")

    return wrapper


class Reporter:
    """Progress and summary output for one command run, honouring --json and --quiet."""

    def __init__(self, as_json: bool = False, quiet: bool = False):
        self.as_json = as_json
        self.quiet = quiet
        self.started = time.perf_counter()
        self._progress: Progress | None = None
        self._task = None

    @property
    def show(self) -> bool:
        return not (self.as_json or self.quiet)

    def info(self, message: str) -> None:
        """A line for people (suppressed by --json/--quiet)."""
        if self.show:
            stderr.print(message, highlight=False)

    @contextmanager
    def bytes_progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A progress bar in bytes (throughput, ETA); yields ``advance(n)``."""
        if not self.show:
            yield lambda n: None
            return
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                            TransferSpeedColumn(), TimeRemainingColumn(), console=stderr, transient=True)
        with progress:
            task = progress.add_task(description, total=total)
            yield lambda n: progress.advance(task, n)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def summary(self, title: str, data: dict[str, Any], rows: list[tuple[str, str]] | None = None) -> None:
        """Print the end-of-run summary: a table for people, or ``data`` as JSON with --json."""
        if self.as_json:
            print(json.dumps(data, indent=2, default=str))
            return
        if self.quiet:
            return
        table = Table(title=title, show_header=False, title_justify="left")
        for key, value in rows if rows is not None else [(k, str(v)) for k, v in data.items()]:
            table.add_row(key, value)
        stdout.print(table)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
