"""The one exception type the command line turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """A mistake the user can fix (wrong path, corrupt file, mismatched config, existing output...).

    The message is one line that names the file and, where there is one, the fix.
    """


class UsageError(UserError):
    """A mistake in how the command was called, not in the data: a missing or extra argument, a bad option
    value (``--tp 0``), a missing required option (``--assets-dir`` for a DCP to HF, ``--out`` or
    ``--in-place``), a path that does not exist. The command line exits 2 and says where to look
    (``see 'vlconvert CMD --help'``), as click does for its own usage errors; every other error exits 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers send), raised in the main thread by the handler the command line installs:
    handled everywhere as Ctrl-C is (finished files kept for ``--resume``), exit code 143."""


def interrupt_line(exc: BaseException) -> tuple[str, int]:
    """The one line and exit code for Ctrl-C or SIGTERM: what was published, and how to resume."""
    word, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
    outcome = getattr(exc, "outcome", None)
    if outcome is None:
        import sys

        publish = sys.modules.get("vlconvert.publish")
        done = list(getattr(publish, "PUBLISHED", []))
        outcome = f"'{done[-1]}' was published (complete) before the interrupt" if done else "nothing was published"
    return f"{word}: {outcome}", code


def one_line(value: object, limit: int = 160, quote: bool = False) -> str:
    """``value`` (its repr with ``quote``) on one line, shortened: safe to put in an error message, even
    for a hostile value that cannot be printed (nested too deeply, an integer too long)."""
    if isinstance(value, (list, tuple)) and len(value) > 16:
        value = [*value[:16], "..."]
    try:
        flat = " ".join((repr(value) if quote else str(value)).split())
    except Exception:  # noqa: BLE001 - RecursionError, ValueError...: describe it by its type instead
        flat = f"<{type(value).__name__}>"
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON and pickles give both)."""
    return isinstance(value, int) and not isinstance(value, bool)
