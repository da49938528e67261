"""bench/bench.py as a script or CI runs it: a variant that fails makes the run fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_failed_variant_fails_the_run(tmp_path):
    """The table showed the error and the run exited 0: `make bench-cpu`, or a script, saw a success (review)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--tiny", "--variants", "server",
                           "--repeats", "1", "--load", "0", "--server-params", "bogus_param=1",
                           "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed: server" in proc.stderr
    assert "bogus_param: unknown parameter" in proc.stdout  # the table still says why
    results = json.loads((tmp_path / "out" / "bench_results.json").read_text())
    assert "bogus_param" in results["variants"]["server"]["error"]
