"""README documents what an operator sets and reads: every svd backend parameter has a row in its
parameters table, and every metric the server exports is named in it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_backend_parameter_has_a_row():
    pytest.importorskip("torch")
    from videogen_server.backends.svd.backend import PARAMETERS

    rows = set(re.findall(r"^\| `([a-z0-9_]+)` \|", README, re.M))
    missing = sorted(set(PARAMETERS) - rows)
    assert not missing, f"svd parameters without a README row: {missing}"


def test_every_metric_is_named():
    from videogen_server import metrics

    source = Path(metrics.__file__).read_text()
    names = set(re.findall(r'"(videogen_[a-z0-9_]+)"', source))
    assert len(names) > 10
    missing = sorted(n for n in names if n not in README)
    assert not missing, f"metrics README does not name: {missing}"
