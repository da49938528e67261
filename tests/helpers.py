"""Helpers for tests: run a real server on a background event loop, build requests."""
from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from videogen.v1 import videogen_pb2 as pb
from videogen.v1 import videogen_pb2_grpc as pb_grpc

DEFAULT_CONFIG = None  # keep the tiny model's own config.pbtxt


def load_bench_script(name: str):
    """Imports bench/<name>.py (a script, not a package) as module videogen_bench_<name>."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"videogen_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_tiny_bench(bench, out: Path, *args: str) -> dict:
    """Runs a kernel bench's main() on the CPU's tiny shapes, one timed call a way, and returns its JSON."""
    import json

    assert bench.main(["--out", str(out), "--tiny", "--iters", "1", "--warmup", "0", *args]) == 0
    return json.loads(out.read_text())


def sample_png() -> bytes:
    return resources.files("videogen_server.assets").joinpath("sample.png").read_bytes()


def write_config(model_dir: Path, name: str, config: Optional[str]) -> None:
    from videogen_server.backends.svd.tiny import TINY_CONFIG

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(TINY_CONFIG.format(name=name) if config is None else config)


class ServerThread:
    """A VideoGenServer on its own asyncio loop in a daemon thread, on port 0."""

    def __init__(self, *repos: Path, **config: Any) -> None:
        from videogen_server.config import ServerConfig

        config.setdefault("port", 0)
        config.setdefault("host", "127.0.0.1")
        config.setdefault("metrics_port", 0)
        config.setdefault("metrics_host", "127.0.0.1")
        config.setdefault("cpu_threads", 1)
        config.setdefault("drain_grace_seconds", 5.0)
        self.config = ServerConfig(model_repositories=tuple(repos), **config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-server-loop")
        self.server = None
        self._channel: Optional[grpc.Channel] = None

    def run(self, coro, timeout: float = 120):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "ServerThread":
        from videogen_server.app import VideoGenServer

        self._thread.start()

        async def _start():
            self.server = VideoGenServer(self.config)
            await self.server.start()

        # a start-up that compiles (Inductor on the CPU, a cold cache) took 85-185 s on a slow 2-core machine
        self.run(_start(), timeout=600)
        return self

    def stop(self, grace: float = 0) -> None:
        if self.loop.is_closed():  # stopped before
            return
        if self._channel is not None:
            self._channel.close()
        if self.server is not None:
            self.run(self.server.stop(grace))
        if self._thread.is_alive():
            # as asyncio.run ends the CLI's loop: the default executor's threads joined, then the loop's
            # selector and wake-up sockets closed (a test session starts hundreds of servers)
            self.run(self.loop.shutdown_default_executor(), timeout=30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def engine(self):
        return self.server.engine

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.target)
        return self._channel

    def stub(self) -> pb_grpc.VideoGenStub:
        return pb_grpc.VideoGenStub(self.channel())

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
        return metric_value(self.scrape(), name, **labels)

    def counted(self, name: str, **labels: str) -> Optional[float]:
        """As `metric`, read from the server's registry (no scrape: a stop takes /metrics); None when
        no sample of `name` has those labels (a label set never counted is not exported at 0)."""
        values = [sample.value for family in self.server.metrics.registry.collect() for sample in family.samples
                  if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())]
        return sum(values) if values else None


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Polls `predicate` every 50 ms until it holds; fails the test naming `what` after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def port_answers(target: str, timeout: float = 5.0) -> bool:
    """Whether a gRPC server on `target` answers a health check on a new connection: False once its
    port is closed (a drain's GOAWAY). CANCELLED counts as closed too: a call that reached gRPC's core
    at the instant the server stopped, before the server took it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return True
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # (a slow answer: not a closed port)
                return True
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err
            return False


def ipv6_loopback() -> bool:
    """Whether this machine can listen on IPv6's loopback (CI machines may have no IPv6)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def request(**fields: Any) -> pb.GenerateRequest:
    fields.setdefault("model", "svd-tiny")
    fields.setdefault("image", sample_png())
    output = fields.pop("output", None)
    msg = pb.GenerateRequest(**fields)
    if output:
        msg.output.CopyFrom(pb.OutputOptions(**output))
    return msg


def collect(stub: pb_grpc.VideoGenStub, req: pb.GenerateRequest, **kw: Any) -> list[pb.GenerateResponse]:
    return list(stub.Generate(req, **kw))


def kinds(responses: list[pb.GenerateResponse]) -> list[str]:
    return [r.WhichOneof("event") for r in responses]


def raw_frames(responses: list[pb.GenerateResponse]):
    """RAW_RGB frames of a stream as a uint8 array [F, H, W, 3] (parts joined)."""
    import numpy as np

    parts: dict[int, list[bytes]] = {}
    shape = None
    for r in responses:
        if r.WhichOneof("event") == "frame":
            assert r.frame.encoding == pb.FRAME_ENCODING_RAW_RGB
            parts.setdefault(r.frame.index, []).append(r.frame.data)
            shape = (r.frame.height, r.frame.width, 3)
    return np.stack([np.frombuffer(b"".join(parts[i]), np.uint8).reshape(shape) for i in sorted(parts)])


def video_bytes(responses: list[pb.GenerateResponse]) -> bytes:
    return b"".join(r.video.data for r in responses if r.WhichOneof("event") == "video")


TINY_PARAMETERS = """
parameters { key: "dtype" value { string_value: "float32" } }
parameters { key: "default_width" value { string_value: "64" } }
parameters { key: "default_height" value { string_value: "48" } }
parameters { key: "default_num_inference_steps" value { string_value: "2" } }
parameters { key: "default_decode_chunk_size" value { string_value: "2" } }
parameters { key: "max_num_frames" value { string_value: "16" } }
parameters { key: "min_width" value { string_value: "16" } }
parameters { key: "min_height" value { string_value: "16" } }
"""


def tiny_config(name: str, body: str = "", *, parameters: str = TINY_PARAMETERS) -> str:
    """A config.pbtxt for a tiny-model copy: `body` adds instance groups, batching, policies."""
    if "instance_group" not in body:
        body += "\ninstance_group [ { count: 1, kind: KIND_CPU } ]"
    return f'name: "{name}"\nbackend: "svd"\n{body}\n{parameters}'


class Stream:
    """A Generate call consumed on a background thread, recording when each event arrived."""

    def __init__(self, stub, req, **kw: Any) -> None:
        import time

        self.responses: list[pb.GenerateResponse] = []
        self.times: list[float] = []
        self.error: Optional[grpc.RpcError] = None
        self.call = stub.Generate(req, **kw)
        self.progressed = threading.Event()
        self.accepted = threading.Event()

        def _consume() -> None:
            try:
                for r in self.call:
                    self.responses.append(r)
                    self.times.append(time.monotonic())
                    kind = r.WhichOneof("event")
                    if kind == "accepted":
                        self.accepted.set()
                    if kind == "progress":
                        self.progressed.set()
            except grpc.RpcError as err:
                self.error = err
            finally:
                self.accepted.set()
                self.progressed.set()

        self._thread = threading.Thread(target=_consume, daemon=True)
        self._thread.start()

    def join(self, timeout: float = 60) -> "Stream":
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stream did not finish"
        return self

    @property
    def done_at(self) -> float:
        return self.times[-1]

    @property
    def summary(self) -> pb.Summary:
        assert self.responses and self.responses[-1].WhichOneof("event") == "summary", self.error
        return self.responses[-1].summary

    def code(self) -> Optional[grpc.StatusCode]:
        return self.error.code() if self.error else None


def install_backend(tmp_path: Path, monkeypatch, package: str, name: str, source: str):
    """Installs `source` as package `package` whose `videogen.backends` entry point `name` is its class
    named like the backend (`name = "package:Class"` as a third-party distribution declares it), on a
    sys.path entry of the test; returns the imported module."""
    import importlib

    site = tmp_path / "site"
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(source)
    dist = site / f"{package}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1\n")
    cls = next(line.split()[1].split("(")[0] for line in source.splitlines() if line.startswith("class "))
    (dist / "entry_points.txt").write_text(f"[videogen.backends]\n{name} = {package}:{cls}\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return importlib.import_module(package)


#: A request that runs ~1.5 s on one CPU thread, and one that runs in a fraction of that
LONG_REQUEST = dict(num_inference_steps=12, num_frames=4)
SHORT_REQUEST = dict(num_inference_steps=1, num_frames=1, output={"stream_video": False})


@contextlib.contextmanager
def full_queue(repo: Path, model: str = "m", running_request: Optional[dict] = None):
    """A server whose `model` (max_queue_size 1) has one request running (`running_request`, else
    LONG_REQUEST) and one queued: the next is refused RESOURCE_EXHAUSTED. Yields the server; both
    requests must have succeeded by the end."""
    with ServerThread(repo) as server:
        stub = server.stub()
        running = Stream(stub, request(model=model, **(running_request or LONG_REQUEST)))
        running.progressed.wait(10)
        queued = Stream(stub, request(model=model, **SHORT_REQUEST))
        queued.accepted.wait(10)
        yield server
        assert running.join().summary and queued.join().summary


class SilentPeerProxy:
    """A TCP relay on loopback to `port` that `go_silent()` turns into a black hole: it stops
    forwarding both ways and keeps every connection open, as when a peer's host vanishes or the
    network between is cut (no FIN, no RST: only keepalive pings can tell). Connections made after
    that are accepted and go nowhere. A context manager; `port` is the relay's own."""

    def __init__(self, port: int) -> None:
        import socket

        self._target = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._silent = threading.Event()
        self._closed = threading.Event()
        self._sockets: list = []
        threading.Thread(target=self._accept, daemon=True, name="silent-proxy").start()

    def go_silent(self) -> None:
        self._silent.set()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(self._target)
            except OSError:  # the server is gone
                downstream.close()
                continue
            self._sockets += [downstream, upstream]
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True, name="silent-proxy").start()

    def _pump(self, src, dst) -> None:
        import select

        # blocking sockets (each is also the other pump's destination: sendall must not time out), read
        # only once select says there is something, so that going silent is seen within 50 ms
        while not self._closed.is_set():
            if self._silent.is_set():  # read nothing more: the sender's window fills, its pings go unanswered
                self._closed.wait(0.1)
                continue
            try:
                if not select.select([src], [], [], 0.05)[0]:
                    continue
                data = src.recv(65536)
            except (OSError, ValueError):  # closed (select raises ValueError for a closed socket's fd -1)
                return
            if not data:
                return
            if not self._silent.is_set():
                try:
                    dst.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> "SilentPeerProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def details_of(err: grpc.RpcError) -> dict[str, object]:
    """The call's google.rpc.Status details by type, read with grpc's own reader."""
    status = rpc_status.from_call(err)  # raises if the details disagree with the call's code or message
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    out: dict[str, object] = {}
    for packed in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo,
                    error_details_pb2.PreconditionFailure):
            if packed.Is(cls.DESCRIPTOR):
                message = cls()
                packed.Unpack(message)
                out[cls.__name__] = message
    return out
