"""What every command shares: --json/--quiet, one-line errors, the rich progress bar, the summary."""

from __future__ import annotations

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


def output_options(func: Callable) -> Callable:
    """Add ``--json`` and ``--quiet`` to a command."""
    func = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")(func)
    func = click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON object (the summary) on stdout; progress goes nowhere.")(func)
    return func


def handle_errors(func: Callable) -> Callable:
    """Turn UserError, Ctrl-C and a full disk into one line on stderr and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            stderr.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            stderr.print("[bold red]interrupted:[/] nothing was published", highlight=False)
            sys.exit(130)
        except OSError as exc:
            if exc.errno == 28:
                stderr.print("[bold red]error:[/] disk full: nothing was published", highlight=False)
            else:
                stderr.print(f"[bold red]error:[/] {exc}", highlight=False, markup=False)
            sys.exit(1)

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
