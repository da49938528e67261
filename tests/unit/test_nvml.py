"""NVML's series: labelled by the CUDA device they describe, and a device NVML cannot read leaves the
rest of the scrape alone. There is no GPU or NVML library here, so `pynvml` is a stand-in module
holding two GPUs; the collector, the registry and the exposition are the real ones."""
from __future__ import annotations

import sys
import types

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from videogen_server.metrics import NvmlReader


class NVMLError(Exception):
    pass


@pytest.fixture
def nvml(monkeypatch):
    gpus = {"GPU-aaaa": 80, "GPU-bbbb": 141, "MIG-cccc": 10}  # NVML's order: index 0 is GPU-aaaa
    state = types.SimpleNamespace(lost=set())
    order = list(gpus)

    def memory(handle):
        if handle in state.lost:
            raise NVMLError("GPU is lost")
        return types.SimpleNamespace(used=gpus[handle] // 2, total=gpus[handle])

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: order[i], nvmlDeviceGetMemoryInfo=memory,
        nvmlDeviceGetHandleByUUID=lambda u: u if u in gpus else (_ for _ in ()).throw(NVMLError("not found")))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return state


def scrape(reader) -> str:
    registry = CollectorRegistry()
    registry.register(reader)
    return generate_latest(registry).decode()


def test_cuda_ordinals_are_matched_by_uuid(nvml, monkeypatch):
    # CUDA_VISIBLE_DEVICES=1: the process's cuda:0 is NVML's second GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    uuids = []
    reader = NvmlReader(lambda: uuids or None)
    assert "videogen_gpu_memory_total_bytes{" not in scrape(reader)  # torch not loaded: not guessed
    uuids.append("bbbb")  # as torch gives it
    text = scrape(reader)
    assert 'videogen_gpu_memory_total_bytes{device="cuda:0"} 141.0' in text
    assert 'device="cuda:1"' not in text


def test_without_uuids_nvml_order_stands_for_cuda_order(nvml):
    text = scrape(NvmlReader(lambda: None))
    assert 'videogen_gpu_memory_total_bytes{device="cuda:0"} 80.0' in text
    assert 'videogen_gpu_memory_total_bytes{device="cuda:1"} 141.0' in text


def test_a_lost_gpu_leaves_the_scrape_answering(nvml):
    reader = NvmlReader(lambda: ["aaaa", "bbbb"])
    nvml.lost.add("GPU-aaaa")
    text = scrape(reader)
    assert 'device="cuda:0"' not in text
    assert 'videogen_gpu_memory_used_bytes{device="cuda:1"} 70.0' in text


def test_a_mig_instance_is_read_and_an_unknown_uuid_asked_again(nvml):
    """torch gives a MIG instance's UUID too; NVML names it "MIG-...". One NVML does not know yet is
    left out of this scrape and looked up again at the next (it was left out for good)."""
    uuids = ["cccc", "dddd"]
    reader = NvmlReader(lambda: uuids)
    text = scrape(reader)
    assert 'videogen_gpu_memory_total_bytes{device="cuda:0"} 10.0' in text and 'device="cuda:1"' not in text
    uuids[1] = "aaaa"
    assert 'videogen_gpu_memory_total_bytes{device="cuda:1"} 80.0' in scrape(reader)
