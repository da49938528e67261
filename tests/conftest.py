"""Shared fixtures: the tiny model repository and real servers on port 0.

Servers run in-process on their own event loop thread (the same `VideoGenServer` the CLI runs),
bound to port 0 with the port read back; clients talk to them over real gRPC on loopback.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: one torch thread per process

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from .gc_pauses import GcPauses
from .helpers import ServerThread, write_config

TINY_NAME = "svd-tiny"

# What one run of the whole suite writes under the temp folder at its peak (saved tiny models, model
# repositories, compile caches: ~1.5 GB measured on CI's kind of machine), with room to spare. A disk that
# fills up midway fails every later test at once (pytest's own output capture writes there), far from the
# cause: the free space is said at the start, and a warning that cannot be missed when it is short.
SUITE_DISK_BYTES = 3 * 2**30


def _free_space() -> tuple[str, int]:
    folder = tempfile.gettempdir()
    return folder, shutil.disk_usage(folder).free


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reverse", action="store_true",
                     help="run the collected tests in reverse order: finds a test that passes only after others")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--reverse"):
        items.reverse()


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(GcPauses(), "videogen-gc-pauses")


def pytest_report_header(config: pytest.Config) -> str:
    folder, free = _free_space()
    return f"temp folder {folder}: {free / 2**30:.1f} GiB free"


def pytest_sessionstart(session: pytest.Session) -> None:
    folder, free = _free_space()
    if free < SUITE_DISK_BYTES:  # said even under -q, which hides the header
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (f"WARNING: {free / 2**30:.1f} GiB free in {folder}; the whole suite writes up to"
                   f" ~{SUITE_DISK_BYTES / 2**30:.0f} GiB there, and once the disk is full every later test errors")
        if reporter is not None:
            reporter.write_line(message, yellow=True, bold=True)
        else:
            print(message)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the tiny SVD, written once per session (save_pretrained)."""
    from videogen_server.backends.svd.tiny import write_tiny_repository

    repo = tmp_path_factory.mktemp("tiny-source")
    write_tiny_repository(repo, name=TINY_NAME)
    return repo / TINY_NAME


@pytest.fixture
def make_repo(tmp_path: Path, tiny_model_source: Path):
    """Build a repository of tiny-model copies with a given config.pbtxt per model.

    make_repo({"a": "<config text or None for the default>"}, versions={"a": [1, 2]})
    """

    def _make(models: dict[str, str | None], versions: dict[str, list[int]] | None = None) -> Path:
        repo = tmp_path / "repo"
        repo.mkdir(exist_ok=True)
        for name, config in models.items():
            model_dir = repo / name
            for v in (versions or {}).get(name, [1]):
                shutil.copytree(tiny_model_source / "1", model_dir / str(v), dirs_exist_ok=True)
            write_config(model_dir, name, config)
        return repo

    return _make


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_source: Path) -> Iterator[ServerThread]:
    """One server on the tiny model for the read-only tests of a session."""
    repo = tmp_path_factory.mktemp("tiny-repo")
    shutil.copytree(tiny_model_source, repo / TINY_NAME)
    with ServerThread(repo) as server:
        yield server
