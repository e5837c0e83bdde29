"""The one exception type the command line turns into a single clear line and a non-zero exit, and the wording
of its messages for the Python API (:func:`api_wording`)."""

import re


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


def interrupt_line(exc: BaseException, read_only: str | None = None) -> tuple[str, int]:
    """The one line and exit code for Ctrl-C or SIGTERM: what was published, and how to resume. ``read_only``
    names a command (or mode: ``--dry-run``) that writes no output: then there is nothing to publish or resume,
    and the line says so instead of "nothing was published"."""
    word, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
    if read_only is not None:
        return f"{word}: {read_only} writes no output, so there is nothing to clean up or resume", code
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


# Messages are written as the command line says them (`--tp 3`); the Python API (vlconvert.Converter, convert,
# verify) says them as its keyword arguments (`tp=3`), translated where an error leaves the API.
_API_FLAGS = {"--overwrite": "overwrite=True", "--resume": "resume=True", "--allow-missing": "allow_missing=True",
              "--allow-unexpected": "allow_unexpected=True", "--no-tied-lm-head": "tied_lm_head=False"}
_API_NAMES = {"--for": "consumer"}
_API_WORDS = ("hf", "dcp", "megatron", "torch_dist", "auto", "keep", "config", "bf16", "fp16", "fp32", "te",
              "local", "grouped", "sequential", "released", "transformers5", "mbridge", "megatron-bridge")
_OPTION = re.compile(r"(?<![\w'-])(--[a-z][a-z0-9-]*)(?:[ =](?:('[^']*'|-?\d+(?:\.\d+)?(?![\w.]))|"
                     r"(\d+(?:\.\d+)?[KMGT]i?B|" + "|".join(sorted(map(re.escape, _API_WORDS), key=len, reverse=True))
                     + r")(?![\w-])))?")  # --flag, --flag 3 / 'x' (as written), --flag word / 5GB (a string)

_APPLIES = re.compile(r"applies to --to ([\w ]+?) only, not --to (\w+)")  # an option refused for a target


def api_wording(message: str) -> str:
    """``message`` as the Python API says it: each command-line option becomes the keyword argument it is
    (``--tp 3 must divide ...`` -> ``tp=3 must divide ...``, ``pass --assets-dir`` -> ``pass assets_dir``,
    ``--to dcp`` -> ``to='dcp'``, ``--overwrite`` -> ``overwrite=True``)."""

    def keyword(match: re.Match) -> str:
        flag, literal, word = match.groups()
        if flag in _API_FLAGS and literal is None and word is None:
            return _API_FLAGS[flag]
        name = _API_NAMES.get(flag, flag[2:].replace("-", "_"))
        return name if literal is None and word is None else f"{name}={literal or repr(word)}"

    message = _APPLIES.sub(lambda m: "applies only where to is " + " or ".join(
        repr(w) for w in m.group(1).split(" and ")) + f", not to={m.group(2)!r}", message)
    return _OPTION.sub(keyword, message)


def in_api_wording(exc: UserError) -> UserError:
    """``exc`` with its message in :func:`api_wording` (changed in place: same type, traceback and
    attributes); the command line never calls this."""
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (api_wording(exc.args[0]), *exc.args[1:])
    return exc
