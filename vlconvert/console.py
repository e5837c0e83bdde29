"""What every command shares: --json/--quiet, one-line errors, the rich progress bar, the summary."""

from __future__ import annotations

import bisect
import errno
import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from vlconvert import publish
from vlconvert.errors import Terminated, UsageError, UserError, interrupt_line
from vlconvert.progress import human_bytes  # noqa: F401 - re-exported: every command's size format

DEBUG = False  # set by --debug (group or command): show tracebacks instead of one line
VERBOSE = False  # set by -v/--verbose (group or command): list assets copied and other details
JSON = False  # set by --json before the command (``vlconvert --json inspect X``)
QUIET = False  # set by -q/--quiet before the command
_PIPE_WIDTH = 10_000  # piped or redirected output: never wrapped (tables take their natural width)
PROSE_WIDTH = 100  # piped or redirected prose (doctor's findings): wrapped here, so a log reads without scrolling


class Out:
    """A rich console for one stream that is readable both ways.

    On a terminal it prints as rich does (colours, wrapping at the terminal width). Piped or redirected,
    it prints plain text: no colours, no wrapping at 80 columns, no trailing spaces, whole tensor names.
    The stream is looked up at each call, so click's test runner and redirections are honoured.
    """

    def __init__(self, stderr: bool = False):
        self.stderr = stderr
        self._tty = Console(stderr=stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr if self.stderr else sys.stdout

    def is_terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    @property
    def console(self) -> Console:
        """The rich console to hand to rich widgets (a progress bar)."""
        return self._tty

    def prose_width(self) -> int:
        """Where prose wraps: the terminal's width on a terminal, :data:`PROSE_WIDTH` in a pipe or a file."""
        return self._tty.width if self.is_terminal() else PROSE_WIDTH

    def print(self, *objects: RenderableType, **kwargs: Any) -> None:
        """``rich.Console.print`` on a terminal; plain, unwrapped, right-stripped lines otherwise."""
        if self.is_terminal():
            self._tty.print(*objects, **kwargs)
            return
        plain = Console(width=_PIPE_WIDTH, no_color=True, color_system=None, force_terminal=False,
                        highlight=False, soft_wrap=True, emoji=False)
        kwargs.setdefault("soft_wrap", True)
        with plain.capture() as capture:
            plain.print(*objects, **kwargs)
        text = "\n".join(line.rstrip() for line in capture.get().splitlines())
        stream = self.stream
        stream.write(text + "\n")
        stream.flush()


stderr = Out(stderr=True)
stdout = Out()


def plural(n: int, word: str, many: str | None = None) -> str:
    """``plural(1, 'file')`` -> '1 file'; ``plural(3, 'file')`` -> '3 files'."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def output_options(verbose: str | None = None, progress: bool = True, quiet: str | None = None) -> Callable:
    """Add ``--json``, ``--quiet``, ``--verbose`` and ``--debug`` to a command, each with help text that says what
    it does in that command: ``verbose`` (None: the command says nothing more with -v, so -v is accepted but not
    shown), ``progress`` (the command draws a progress bar that --json turns off), ``quiet`` (what -q still
    prints on stdout; None: nothing)."""

    def decorate(func: Callable) -> Callable:
        func = click.option("--debug", is_flag=True, help="Show the full traceback of an error.")(func)
        func = click.option("--verbose", "-v", is_flag=True, hidden=verbose is None,
                            help=verbose or "Accepted; this command has nothing more to say.")(func)
        func = click.option("--quiet", "-q", is_flag=True,
                            help=(f"Print only {quiet} on stdout (out=$(vlconvert ... -q))"
                                  if quiet else "Print nothing but errors and warnings; the exit code is the "
                                                "verdict") + ". Also before the command.")(func)
        func = click.option("--json", "as_json", is_flag=True,
                            help="Print one JSON object on stdout (the report; {\"ok\": false, \"error\": ...} on "
                                 "failure)" + ("; no progress bar" if progress else "") + ". Also before the "
                                 "command.")(func)
        return func

    return decorate


VERBOSE_ASSETS = "List every asset file copied (config, tokenizer, processor files): HF outputs."


def rank() -> int:
    """This process's rank under ``torchrun`` (0 otherwise): only rank 0 prints the summary and the bar."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


_CASTS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
          "fp32": "fp32", "float32": "fp32", "float": "fp32"}


class DtypeParam(click.ParamType):
    """A ``--dtype`` value checked when the command line is read: a bad one is a usage error (exit 2)
    that lists every name the command accepts."""

    name = "dtype"

    def __init__(self, *words: str):
        self.words = words  # keep, auto, config: what this command accepts besides the casts

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join([*self.words, "bf16", "fp16", "fp32"]) + "]"

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        from click.shell_completion import CompletionItem

        return [CompletionItem(w) for w in [*self.words, "bf16", "fp16", "fp32"] if w.startswith(incomplete)]

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None:
            return None
        key = str(value).lower().removeprefix("torch.")
        if key in self.words:
            return key
        if key in _CASTS:
            return _CASTS[key]
        names = [*self.words, "bf16", "fp16", "fp32"]
        self.fail(f"'{value}' is not a dtype: use {', '.join(names[:-1])} or {names[-1]}", param, ctx)


def one_line(message: object) -> str:
    """``message`` flattened to one line."""
    return " ".join(str(message).split())


def fail(message: str, code: int = 1, as_json: bool = False, command: str | None = None) -> None:
    """Print ``message`` as one plain line on stderr (no markup, never wrapped) and exit with ``code``.

    With ``as_json``, also print ``{"ok": false, "command": ..., "error": ..., "exit_code": ...}`` on stdout
    (the schema of every --json output, README "JSON output"), so a script never reads an empty stdout;
    under ``torchrun`` rank 0 alone prints it (the other ranks' lines go to stderr).
    ``command`` defaults to the running click command's name.
    """
    line = one_line(message)
    if as_json and rank() == 0:  # under torchrun one record on stdout: every rank fails together, rank 0 speaks
        error = line.removeprefix("error: ")
        if command is None:
            ctx = click.get_current_context(silent=True)
            command = ctx.info_name if ctx is not None and ctx.parent is not None else None
        record = {"ok": False, "command": command, "error": error, "exit_code": code}
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    sys.exit(code)


def handle_errors(func: Callable) -> Callable:
    """Turn every failure into one line on stderr and a non-zero exit (a traceback only with --debug).

    UsageError (a usage mistake): its message and ``see 'vlconvert CMD --help'``, exit 2, as click's own
    usage errors (cli.LazyGroup). UserError: its message, exit 1. Ctrl-C: exit 130. A full disk and other
    OS errors: one line naming the file, exit 1. Anything else is a bug: one line saying so, exit 1. With
    --json the same message also goes to stdout as ``{"ok": false, "error": ...}``.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global VERBOSE
        debug = kwargs.pop("debug", False) or DEBUG
        VERBOSE = kwargs.pop("verbose", False) or VERBOSE
        if "as_json" in kwargs:  # --json / -q before the command name count as after it
            kwargs["as_json"] = bool(kwargs["as_json"]) or JSON
        if "quiet" in kwargs:
            kwargs["quiet"] = bool(kwargs["quiet"]) or QUIET
        as_json = bool(kwargs.get("as_json"))
        ctx = click.get_current_context(silent=True)
        name = ctx.info_name if ctx is not None else None
        read_only = name if name in READ_ONLY else next(  # Ctrl-C says nothing of publishing where nothing is
            (f"{name} {flag}" for key, flag in (("dry_run", "--dry-run"), ("check", "--check")) if kwargs.get(key)),
            None)
        publish = sys.modules.get("vlconvert.publish")
        if publish is not None:
            publish.PUBLISHED.clear()
        previous = _on_sigterm()
        try:
            return func(*args, **kwargs)
        except UsageError as exc:  # a usage mistake: exit 2 and where to look, as click's own
            if debug:
                raise
            ctx = click.get_current_context(silent=True)
            where = ctx.command_path if ctx is not None else "vlconvert"
            fail(f"error: {exc}; see '{where} --help'", 2, as_json=as_json)
        except UserError as exc:
            if debug:
                raise
            fail(f"error: {exc}", as_json=as_json)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (errors.Terminated)
            if debug:
                raise
            line, code = interrupt_line(exc, read_only)
            fail(line, code, as_json=as_json)
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # the reader of a pipe went away (`| head`): stop quietly
                quiet_broken_pipe()
            if debug:
                raise
            if exc.errno == errno.ENOSPC:
                fail("error: disk full: nothing was published; free space and rerun", as_json=as_json)
            where = f" '{exc.filename}'" if exc.filename else ""
            fail(f"error: {exc.strerror or exc}{where}", as_json=as_json)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
            if debug:
                raise
            if isinstance(exc, ModuleNotFoundError) and exc.name == "torch":  # imported at the first tensor
                fail("error: this command works on tensors and needs torch, which is not installed: "  # operation
                     "pip install torch", as_json=as_json)  # (vlconvert.lazy): plans and byte copies need none
            fail(f"error: internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback "
                 "and report it", as_json=as_json)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


READ_ONLY = frozenset({"plan", "inspect", "verify", "doctor"})  # commands that write no output


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _on_sigterm() -> Any:
    """Handle SIGTERM as Ctrl-C for this command (main thread only); return the handler to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, OSError):
        return None


def quiet_broken_pipe() -> None:
    """Exit 1 without a word when stdout's reader has gone (``vlconvert plan ... | head``), as git does."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush at exit
    except (OSError, ValueError):
        pass
    sys.exit(1)


class _BytesColumn(ProgressColumn):
    """'1.20 GiB / 3.22 GiB': the same units as the summary (:func:`human_bytes`)."""

    def render(self, task: Task) -> Text:
        total = f" / {human_bytes(task.total)}" if task.total is not None else ""
        return Text(f"{human_bytes(task.completed)}{total}", style="progress.download")


class _SpeedColumn(ProgressColumn):
    """'310.5 MiB/s', in the summary's units."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{human_bytes(speed)}/s", style="progress.data.speed")


class _CountColumn(ProgressColumn):
    """'files 2/3, tensors 41/75' when the reporter knows the plan (bytes written so far, in plan order)."""

    def render(self, task: Task) -> Text:
        tensor_ends: list[int] | None = task.fields.get("tensor_ends")
        file_ends: list[int] | None = task.fields.get("file_ends")
        if not tensor_ends or not file_ends:
            return Text("")
        done = task.completed
        files = bisect.bisect_right(file_ends, done)
        tensors = bisect.bisect_right(tensor_ends, done)
        return Text(f"files {files}/{len(file_ends)}, tensors {tensors}/{len(tensor_ends)}")


class _EtaColumn(ProgressColumn):
    """'eta 0:01:05': the time left."""

    def render(self, task: Task) -> Text:
        left = task.time_remaining
        if left is None:
            return Text("eta -:--:--", style="progress.remaining")
        minutes, seconds = divmod(int(left), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"eta {hours:d}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


class FittingProgress(Progress):
    """A progress bar that stays on one line at any terminal width: the fields that do not fit are left out,
    the least useful first (elapsed time, then the file and tensor counts, the speed, the description, the
    time left, the bar); the bar takes 10 to 40 cells of what is left. Decided at each refresh, so a resized
    terminal gets its fields back."""

    BAR_MIN, BAR_MAX = 10, 40

    def __init__(self, description: str, console: Console):
        self.bar = BarColumn(bar_width=self.BAR_MAX)
        self.parts: dict[str, ProgressColumn] = {
            "description": TextColumn("[bold]{task.description}"), "bar": self.bar, "bytes": _BytesColumn(),
            "counts": _CountColumn(), "speed": _SpeedColumn(), "elapsed": TimeElapsedColumn(), "eta": _EtaColumn()}
        super().__init__(*self.parts.values(), console=console, transient=True)

    @staticmethod
    def widths(task: Task) -> dict[str, int]:
        """The most cells each field takes during this task (so fields do not come and go as numbers grow)."""
        total = human_bytes(task.total or 0)
        files, tensors = task.fields.get("file_ends"), task.fields.get("tensor_ends")
        counts = len(f"files {len(files)}/{len(files)}, tensors {len(tensors)}/{len(tensors)}") \
            if files and tensors else 0
        return {"description": Text.from_markup(f"[bold]{task.description}").cell_len,
                "bytes": max(len(total), len("1023.99 KiB")) + 3 + len(total), "counts": counts,
                "speed": len("1023.99 KiB/s"), "elapsed": len("0:00:00"), "eta": len("eta 0:00:00")}

    def fit(self, width: int, task: Task) -> list[str]:
        """The fields shown at ``width`` cells (one cell spare: no terminal wraps the line), in display order."""
        sizes = self.widths(task)
        keep = ["bytes", "bar", "eta", "description", "speed", "counts", "elapsed"]  # most useful first
        chosen: list[str] = []
        used = -1  # n fields take n - 1 separating spaces
        for name in keep:
            need = self.BAR_MIN if name == "bar" else sizes[name]
            if need == 0:
                continue
            if used + 1 + need <= width - 1:
                chosen.append(name)
                used += 1 + need
        if "bar" in chosen:
            self.bar.bar_width = min(self.BAR_MAX, self.BAR_MIN + width - 1 - used)
        return [name for name in self.parts if name in chosen]

    def make_tasks_table(self, tasks: Any) -> Table:
        tasks = list(tasks)
        if tasks:
            self.columns = tuple(self.parts[name] for name in self.fit(self.console.width, tasks[0]))
        return super().make_tasks_table(tasks)


class Reporter:
    """Progress and summary output for one command run, honouring --json, --quiet and --verbose."""

    def __init__(self, as_json: bool = False, quiet: bool = False, verbose: bool | None = None):
        self.as_json = as_json
        self.quiet = quiet
        self.verbose = VERBOSE if verbose is None else verbose
        self.started = time.perf_counter()
        self._tensor_ends: list[int] = []
        self._file_ends: list[int] = []

    @property
    def show(self) -> bool:
        """Lines for people: not with --json or -q, and only on rank 0 of ``torchrun``."""
        return not (self.as_json or self.quiet) and rank() == 0

    def info(self, message: str) -> None:
        """A line for people (suppressed by --json/--quiet)."""
        if self.show:
            stderr.print(message, highlight=False, markup=False)

    def detail(self, message: str) -> None:
        """A line shown only with -v/--verbose."""
        if self.verbose:
            self.info(message)

    def expect(self, files: list[Any]) -> None:
        """Let the progress bar count files and tensors: ``files`` are the plan's, in write order (objects
        with ``tensors`` and ``nbytes``, as :class:`vlconvert.engine.PlannedFile`)."""
        total = 0
        self._tensor_ends, self._file_ends = [], []
        for f in files:
            for _, shape, dtype in f.tensors:
                n = dtype.itemsize
                for d in shape:
                    n *= d
                total += n
                self._tensor_ends.append(total)
            self._file_ends.append(total)

    @contextmanager
    def bytes_progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A progress bar in bytes (files and tensors done, throughput, elapsed, ETA); yields ``advance(n)``."""
        if not self.show or not stderr.is_terminal():  # a log file gets no bar (nor its blank line)
            yield lambda n: None
            return
        progress = FittingProgress(description, stderr.console)
        fields = {"tensor_ends": self._tensor_ends, "file_ends": self._file_ends} \
            if self._file_ends and self._file_ends[-1] == total else {}
        with progress:
            task = progress.add_task(description, total=total, **fields)
            yield lambda n: progress.advance(task, n)

    def result_path(self, path: str | Path | None) -> None:
        """-q: the one line a script reads, the absolute path of the result (nothing when there is none)."""
        if self.quiet and not self.as_json and path and rank() == 0:
            sys.stdout.write(f"{Path(path).absolute()}\n")
            sys.stdout.flush()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def summary(self, title: str, data: dict[str, Any], rows: list[tuple[str, str]] | None = None,
                ok: bool | None = None) -> None:
        """Print the end-of-run summary: a table for people, or ``data`` as JSON with --json.

        The JSON always starts with ``ok`` (``ok`` if given, else ``data["ok"]``, else true: false when the
        command exits 1 after its summary) and ``command`` (the first word of ``title``): README, "JSON output".
        With -q, only the path of what was written (``data["output"]``, absolute), as ``hf download -q`` does, so
        ``out=$(vlconvert convert ... -q)`` works. Under ``torchrun`` only rank 0 prints.
        """
        if rank() != 0:
            return
        if self.as_json:
            print(json.dumps(json_record(title.split()[0], data, ok), indent=2, default=str))
            return
        if self.quiet:
            self.result_path(data.get("output") or data.get("retagged"))  # retag-think: the folder to use
            return
        table = Table(title=title, show_header=False, title_justify="left")
        for key, value in rows if rows is not None else [(k, str(v)) for k, v in data.items()]:
            table.add_row(key, Text(str(value)))
        stdout.print(table)


def json_record(command: str, data: dict[str, Any], ok: bool | None = None) -> dict[str, Any]:
    """``data`` in the one ``--json`` schema of every command (README, "JSON output"): ``ok`` and ``command``
    first; ``files`` a count (files written, or read) with the per-file list as ``file_list``; ``rank_files``
    the Megatron rank files; ``tensor_bytes`` the tensor data (was ``bytes`` / ``bytes_read``);
    ``bytes_written`` the output on disk; ``assets_copied`` the list of assets copied (was ``assets``);
    ``warnings`` what this command said on stderr as ``warning: ...`` (absent when nothing was)."""
    out = {k: v for k, v in data.items() if k not in ("ok", "command")}
    written = out.pop("files_written", None)
    if isinstance(out.get("files"), list):
        out["file_list"] = out["files"]
        out["files"] = len(out["files"]) if written is None else written
    elif written is not None:
        if "files" in out:
            out["rank_files"] = out["files"]
        out["files"] = written
    for old in ("bytes", "bytes_read"):
        if old in out:
            value = out.pop(old)
            out.setdefault("tensor_bytes", value)
    if "assets" in out:
        assets = out.pop("assets")
        out.setdefault("assets_copied", assets)
    if publish.WARNINGS:
        out.setdefault("warnings", list(publish.WARNINGS))
    return {"ok": bool(data.get("ok", True)) if ok is None else ok, "command": command, **out}


def disk_bytes(folder: str | Path) -> int:
    """Bytes on disk of every file under ``folder`` (what "written" means in every summary)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
