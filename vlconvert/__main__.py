"""``python -m vlconvert ...``: the same command as the ``vlconvert`` console script."""

import os
import sys


def _real_package() -> None:
    """Make ``vlconvert`` the package this file belongs to, not a namespace package.

    Run from the folder that holds a clone named ``vlconvert`` (``python -m vlconvert`` or ``torchrun -m
    vlconvert`` put the current folder first on ``sys.path``), the clone's root, which has no
    ``__init__.py``, shadows the installed package: Python makes ``vlconvert`` a namespace package whose
    ``__init__`` never runs. Put the folder holding this package first and import it again; if that fails
    too, say why in one line and what to do.
    """
    package = sys.modules.get("vlconvert")
    if package is None or getattr(package, "__file__", None):
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in [m for m in sys.modules if m == "vlconvert" or m.startswith("vlconvert.")]:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        import vlconvert

        ok = bool(getattr(vlconvert, "__file__", None)) and hasattr(vlconvert, "__version__")
    except ImportError:
        ok = False
    if not ok:
        sys.stderr.write(f"error: the folder '{os.path.join(os.getcwd(), 'vlconvert')}' (a clone without "
                         "__init__.py) hides the installed vlconvert package; run from another folder, or use "
                         "the 'vlconvert' command\n")
        sys.exit(1)


if __name__ == "__main__":
    _real_package()
    from vlconvert.cli import main

    main(prog_name="vlconvert")
