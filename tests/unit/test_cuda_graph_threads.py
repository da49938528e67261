"""Torches before 2.13 record CUDA graphs on one thread per process only (pytorch#123177): a second
thread fails a bare assert at its first graph, or replays the first thread's graphs at the same time.
The svd backend refuses such a load by name instead. No GPU here and CI's torch has the fix, so the
torch without it is a stand-in module lacking the fix's function; the thread-local state checked is
torch's own."""
from __future__ import annotations

import sys
import threading
import types

import pytest
import torch

from videogen_server.backends.svd import accel


def test_which_modes_record_cuda_graphs():
    assert accel.records_cuda_graphs("reduce-overhead", {})
    assert accel.records_cuda_graphs("max-autotune", {})
    assert not accel.records_cuda_graphs("default", {})
    assert not accel.records_cuda_graphs("max-autotune-no-cudagraphs", {})
    assert accel.records_cuda_graphs("default", {"triton.cudagraphs": True})
    assert not accel.records_cuda_graphs("reduce-overhead", {"triton.cudagraphs": False})
    assert not accel.records_cuda_graphs("none", {"triton.cudagraphs": True})


def test_this_torch_records_on_any_thread():
    found = []
    t = threading.Thread(target=lambda: found.append(accel.cuda_graphs_thread_problem()))
    t.start()
    t.join()
    assert found == [None]


@pytest.fixture
def torch_without_the_fix(monkeypatch):
    import torch._inductor.cudagraph_trees  # noqa: F401

    old = types.ModuleType("torch._inductor.cudagraph_trees")  # 2.11's module has no _initialize_tls
    monkeypatch.setitem(sys.modules, "torch._inductor.cudagraph_trees", old)
    monkeypatch.setattr(sys.modules["torch._inductor"], "cudagraph_trees", old)


def _on_a_thread(first_to_import: bool):
    found = []

    def check():
        if first_to_import:  # what 2.11's module does on the thread that imports it
            torch._C._stash_obj_in_tls("tree_manager_containers", {})
        found.append(accel.cuda_graphs_thread_problem())

    t = threading.Thread(target=check)
    t.start()
    t.join()
    return found[0]


def test_one_thread_per_process_before_the_fix(torch_without_the_fix):
    assert _on_a_thread(first_to_import=True) is None
    problem = _on_a_thread(first_to_import=False)
    assert problem is not None and "pytorch#123177" in problem and "one instance per process" in problem

