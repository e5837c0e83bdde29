"""``python -m vlconvert ...``: the same command as the ``vlconvert`` console script."""

from vlconvert.cli import main

if __name__ == "__main__":
    main(prog_name="vlconvert")
