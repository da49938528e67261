"""Intra-op CPU threads: the instance threads own them, the server's other threads run torch single-threaded.

torch's thread count is per thread (libgomp), and libgomp throttles every team's spin-waiting once the
process holds more of its threads than there are cores: one preprocessing thread that ran a parallel
op with the default count made a 2-core CPU instance's denoising steps ~35% slower for the rest of the
process (bench/bench.py --tiny: overhead ratio 1.27-1.36 before, 1.006-1.053 after). The check runs in
a fresh interpreter, as the test session itself pins torch to one thread.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys, threading
from pathlib import Path
import torch
torch.set_num_threads(3)  # this process's default: what instances get unless cpu_threads says otherwise
sys.path.insert(0, sys.argv[2])
from tests.helpers import ServerThread, collect, kinds, request
from videogen_server.backends.base import InstanceContext
from videogen_server.backends.svd.backend import SVDBackend

seen = {"execute": set(), "prepare": set()}
execute, prepare = SVDBackend._execute, SVDBackend.prepare
def _execute(self, requests):
    seen["execute"].add(torch.get_num_threads())
    return execute(self, requests)
def _prepare(self, params, image):
    out = prepare(self, params, image)
    if threading.get_ident() != self.thread:
        seen["prepare"].add(torch.get_num_threads())
    return out
SVDBackend._execute, SVDBackend.prepare = _execute, _prepare  # observe only: the calls run unchanged

repo = Path(sys.argv[1])
with ServerThread(repo, cpu_threads=None) as server:
    ok = kinds(collect(server.stub(), request(model="svd-tiny")))[-1] == "summary"
later = {}
def load(key, cpu_threads):  # an instance loaded after preprocessing threads changed torch's global count
    b = SVDBackend()
    b.initialize(InstanceContext("svd-tiny", 1, repo / "svd-tiny" / "1", {}, "cpu", 0, 1, cpu_threads=cpu_threads))
    later[key] = torch.get_num_threads()
    b.finalize()
for key, n in (("default", None), ("cpu_threads_2", 2)):
    t = threading.Thread(target=load, args=(key, n)); t.start(); t.join()
print(json.dumps({"ok": ok, "execute": sorted(seen["execute"]), "prepare": sorted(seen["prepare"]), **later}))
"""


def test_preprocessing_threads_leave_intra_op_threads_to_the_instances(make_repo):
    repo = make_repo({"svd-tiny": None})
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(repo), str(root)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ok"]
    assert got["prepare"] == [1], got  # admission's preprocessing ran on the engine's threads, single-threaded
    assert got["execute"] == [3], got  # the instance kept the process default
    assert got["default"] == 3 and got["cpu_threads_2"] == 2, got  # later instances are not left at 1
