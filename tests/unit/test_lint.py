"""Pyflakes-class mistakes (undefined names, unused imports and variables) anywhere in the sources."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_sources_have_no_pyflakes_findings() -> None:
    pytest.importorskip("ruff")  # in the test extra
    # the whole tree, as git sees it (ruff skips what .gitignore names: virtual environments, builds, stubs)
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
