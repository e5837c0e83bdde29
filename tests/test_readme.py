"""The README's Python snippets run as written, and ``run(progress=...)`` takes every documented form.

Each ```python block of README.md is executed in a fresh folder that holds ``fixtures/`` (a link to the
bundled fixtures), so the README cannot drift from the API again (issue 22, item 1).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

from vlconvert import Converter
from vlconvert.progress import progress_bar

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python block"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index, tmp_path, monkeypatch, capsys):
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": "__readme__"})  # noqa: S102 - the README's own code, as a user would run it
    assert capsys.readouterr().out.strip()


class Bar:
    """A tqdm-like bar: update(n), a settable total."""

    def __init__(self, total=None):
        self.total, self.n = total, 0

    def update(self, n=1):
        self.n += n


def _forms():
    seen: dict[str, object] = {}

    def callback(description, total):
        seen["total"] = total
        seen["bar"] = Bar(total)
        return seen["bar"].update

    def returns_bar(description, total):
        seen["bar"] = Bar(total)
        return seen["bar"]

    @contextlib.contextmanager
    def context(description, total):
        seen["bar"] = Bar(total)
        yield seen["bar"].update

    bar = Bar()
    return seen, {"tqdm-like object": bar, "callable returning advance": callback,
                  "callable returning a bar": returns_bar, "context manager": context}


@pytest.mark.parametrize("form", ["tqdm-like object", "callable returning advance", "callable returning a bar",
                                  "context manager", "callable returning None", "real tqdm"])
def test_run_progress_forms(form, tmp_path, fixtures_dir):
    conv = Converter(fixtures_dir / "tiny-dense-tied", tmp_path / "out", to="dcp")
    total = conv.plan().tensor_bytes
    seen, forms = _forms()
    if form == "callable returning None":
        result = conv.run(progress=lambda description, total: None)
        assert result.files > 0
        return
    if form == "real tqdm":
        tqdm = pytest.importorskip("tqdm").tqdm
        with tqdm(disable=False, file=open("/dev/null", "w")) as bar:  # noqa: SIM115
            conv.run(progress=bar)
            assert bar.n == total and bar.total == total
        return
    progress = forms[form]
    conv.run(progress=progress)
    bar = progress if form == "tqdm-like object" else seen["bar"]
    assert bar.n == total and bar.total == total


def test_progress_bar_refuses_what_it_cannot_drive():
    with pytest.raises(TypeError, match="progress must be"):
        with progress_bar(42, "x", 1):
            pass
    with pytest.raises(TypeError, match="must return advance"):
        with progress_bar(lambda d, t: 42, "x", 1):
            pass
