"""Shared test setup: the repo root on sys.path (for ``fixtures.make_fixtures``) and fixture paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The committed fixtures folder."""
    return FIXTURES

# tests/frameworks needs Megatron-Bridge and megatron-core 0.19 (Python 3.12): run it with
# `bash tests/frameworks/run.sh`, which sets VLCONVERT_FRAMEWORKS.
collect_ignore = [] if os.environ.get("VLCONVERT_FRAMEWORKS") else ["frameworks"]
