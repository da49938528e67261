"""The suite's collector-pause plugin (tests/gc_pauses.py), run on a small suite of its own in a subprocess."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CONFTEST = """
import tests.gc_pauses as gc_pauses

gc_pauses.REPORT_SECONDS = 0.0  # every pass is "long" here, so the small suite needs no big heap


def pytest_configure(config):
    config.pluginmanager.register(gc_pauses.GcPauses(), "videogen-gc-pauses")
"""

FIRST = """
import torch


def test_eager_only():
    assert torch.ones(2).sum() == 2


def test_compiles():
    torch._dynamo.reset()
    assert torch.compile(lambda x: x + 1, backend="eager", fullgraph=True)(torch.ones(2)).sum() == 4  # the server's way


def test_eager_last_of_its_file():
    assert torch.ones(2).sum() == 2
"""

SECOND = """
import gc


class Cycle:
    def __init__(self):
        self.me = self


def test_what_lived_at_the_first_files_end_is_frozen():
    assert gc.get_freeze_count() > 1000  # torch's modules, among others


def test_fails_after_a_pass():
    gc.disable()  # all 1000 cycles wait for the one pass
    for _ in range(1000):
        Cycle()
    gc.enable()
    gc.collect()
    assert False, "a timing bound missed"
"""


def test_a_failing_test_shows_its_passes_and_compiling_tests_and_files_end_in_a_collection(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_1_first.py").write_text(textwrap.dedent(FIRST))
    (tmp_path / "test_2_second.py").write_text(textwrap.dedent(SECOND))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "1 failed, 4 passed" in out, out

    # the failed test's report carries the pass it ran into, with what it freed
    section = re.search(r"-+ gc pauses -+\n(.*?)(?:\n[=_-]{5}|\Z)", out, re.S)
    assert section is not None, out
    assert re.search(r"generation 2 pass: \d+\.\d\d s, \d+ objects freed", section.group(1)), out
    freed = [int(n) for n in re.findall(r"generation 2 pass: \S+ s, (\d+) objects freed", section.group(1))]
    assert max(freed) >= 1000, out

    # teardown collections: after the test that compiled, and after each file's last test; none after the
    # first eager test
    summary = re.search(r"gc: (\d+) full passes in tests, (\d+) pauses >= 0\.0 s.*?; (\d+) teardown collections", out)
    assert summary is not None, out
    full, inside, teardown = map(int, summary.groups())
    assert teardown == 3, out
    assert inside >= 1 and full >= 1, out
    assert "test_2_second.py::test_fails_after_a_pass" in out.split("gc: ")[-1], out


def test_a_teardown_collection_waits_out_another_threads_pass() -> None:
    """gc.collect() returns at once, collecting nothing, while another thread's pass runs finalizers that
    released the GIL; the plugin's collection tries again rather than freeze garbage it did not get to."""
    import gc
    import threading

    from ..gc_pauses import _full_collection

    inside, release = threading.Event(), threading.Event()

    class Slow:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            inside.set()
            release.wait(10)  # a finalizer that blocks, the GIL released

    def other_thread() -> None:
        Slow()
        gc.collect()

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert inside.wait(10)
        before = gc.get_stats()[2]["collections"]
        assert gc.collect() == 0 and gc.get_stats()[2]["collections"] == before  # the trap itself
        threading.Timer(0.3, release.set).start()
        assert _full_collection()
        assert gc.get_stats()[2]["collections"] >= before + 2  # the other thread's pass, then this one's
    finally:
        release.set()
        thread.join(10)
