"""Packaging: ``pip install vlconvert`` must keep a training environment's torch (issue 19).

setup.cfg's ``install_requires`` gives ranges, never ``==`` pins, and its torch and transformers floors are
the versions the README's "Install into a training environment" section says were tested, so the two
cannot drift apart. The README's own setup commands pin ``torch==2.13.0`` (the CPU build on this repo's
machines); that version must satisfy the range, so ``pip install -e '.[test]'`` after it keeps it.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Install into a training environment"
FLOORS = ("torch", "transformers")  # floors the README documents


def install_requires(setup_cfg: str) -> dict[str, Requirement]:
    """``[options] install_requires`` of a setup.cfg text, by package name."""
    parser = configparser.ConfigParser()
    parser.read_string(setup_cfg)
    lines = parser["options"]["install_requires"].splitlines()
    reqs = [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]
    return {r.name.lower(): r for r in reqs}


def floor(req: Requirement) -> Version | None:
    """The ``>=`` lower bound of ``req``, or None."""
    bounds = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return max(bounds) if bounds else None


def documented_floors(readme: str) -> dict[str, Version]:
    """The ``NAME>=VERSION`` floors stated in the README's install section."""
    start = readme.find(SECTION)
    if start < 0:
        return {}
    end = readme.find("\n## ", start + len(SECTION))
    text = readme[start:end if end >= 0 else len(readme)]
    found: dict[str, Version] = {}
    for name in FLOORS:
        m = re.search(rf"`{name}>=([0-9][0-9.]*)", text)
        if m:
            found[name] = Version(m.group(1))
    return found


def readme_torch_pin(readme: str) -> str | None:
    """The torch version the README's setup commands pin (``pip install torch==X``)."""
    m = re.search(r"pip install torch==([0-9][0-9.]*)", readme)
    return m.group(1) if m else None


def problems(setup_cfg: str, readme: str) -> list[str]:
    """Everything wrong with setup.cfg's requirements against the README, one line each."""
    out = []
    reqs = install_requires(setup_cfg)
    for name, req in sorted(reqs.items()):
        pins = [s for s in req.specifier if s.operator in ("==", "===")]
        if pins:
            out.append(f"{name} is pinned ({req}): pip would replace the environment's {name}")
    documented = documented_floors(readme)
    for name in FLOORS:
        req = reqs.get(name)
        if req is None:
            out.append(f"{name} is not in install_requires")
            continue
        low = floor(req)
        if low is None:
            out.append(f"{name} has no '>=' floor ({req})")
        elif name not in documented:
            out.append(f"README's '{SECTION}' does not state `{name}>=...`")
        elif documented[name] != low:
            out.append(f"{name}: setup.cfg says >={low}, README says >={documented[name]}")
    pin = readme_torch_pin(readme)
    if pin is None:
        out.append("README's setup commands no longer pin torch (pip install torch==X)")
    elif "torch" in reqs and not reqs["torch"].specifier.contains(pin, prereleases=True):
        out.append(f"README's torch=={pin} is outside setup.cfg's {reqs['torch']}: pip would replace it")
    return out


def test_setup_cfg_keeps_the_environment_torch_and_matches_readme():
    setup_cfg = (ROOT / "setup.cfg").read_text()
    readme = (ROOT / "README.md").read_text()
    assert problems(setup_cfg, readme) == []
    assert floor(install_requires(setup_cfg)["torch"]) is not None


def _setup_cfg(*requires: str) -> str:
    body = "".join(f"    {r}\n" for r in requires)
    return f"[options]\npython_requires = >=3.10\ninstall_requires =\n{body}"


_README = ("pip install torch==2.13.0 && pip install -e .\n\n" + SECTION + "\n\n"
           "| torch | `torch>=2.6` |\n| transformers | `transformers>=5.0,<6` |\n\n## Commands\n`torch>=9.9`\n")


def test_problems_accepts_a_matching_pair():
    assert problems(_setup_cfg("torch>=2.6", "transformers>=5.0,<6", "rich>=13"), _README) == []


def test_problems_catches_a_pin():
    found = problems(_setup_cfg("torch==2.13.0", "transformers>=5.0,<6"), _README)
    assert any("torch is pinned" in p for p in found)
    assert any("torch has no '>=' floor" in p for p in found)
    found = problems(_setup_cfg("torch>=2.6", "transformers>=5.0,<6", "numpy==1.26.4"), _README)
    assert found == ["numpy is pinned (numpy==1.26.4): pip would replace the environment's numpy"]


def test_problems_catches_drift_from_the_readme():
    found = problems(_setup_cfg("torch>=2.7", "transformers>=5.0,<6"), _README)
    assert found == ["torch: setup.cfg says >=2.7, README says >=2.6"]
    found = problems(_setup_cfg("torch>=2.6", "transformers>=5.1,<6"), _README)
    assert found == ["transformers: setup.cfg says >=5.1, README says >=5.0"]
    # only the install section counts: the `torch>=9.9` under "## Commands" is not a floor
    assert documented_floors(_README) == {"torch": Version("2.6"), "transformers": Version("5.0")}
    found = problems(_setup_cfg("torch>=2.6", "transformers>=5.0,<6"), _README.replace(SECTION, "## Other"))
    assert len(found) == 2 and all("does not state" in p for p in found)


def test_problems_catches_a_range_that_excludes_the_readme_pin():
    found = problems(_setup_cfg("torch>=2.6,<2.13", "transformers>=5.0,<6"), _README)
    assert found == ["README's torch==2.13.0 is outside setup.cfg's torch<2.13,>=2.6: pip would replace it"]
