"""Client-side scale-out: one VideoGenClient over several servers (round_robin, health checks, retries).

The main test runs three real server processes (``python -m videogen_server.cli serve``) on
loopback, each on its own copy of the tiny model: requests spread over all three; one is sent
SIGTERM while it has a request in flight (it drains: NOT_SERVING, GOAWAY and its port closed,
then exits 0) and the same client keeps working with zero failed requests: the calls go to the
others. A plain gRPC client balancing over two servers loses no call to a drain either. Another
test shows retry in-process, on an engine draining with its port still open (the server refuses
before sending any response, so gRPC's retry policy sends the call again; the client also retries
calls refused after headers, for servers that send them first), and client-side health checks;
the rest checks target parsing and the service config without a server.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from videogen_client import (
    AsyncVideoGenClient,
    DeadlineExceededError,
    Progress,
    RetryPolicy,
    UnavailableError,
    VideoGenClient,
    VideoGenError,
)
from videogen_client._request import (StreamAttempts, channel_target, connection_settings, retry_wait,
                                      service_config)

from ..helpers import ServerThread, metric_value, port_answers, sample_png, wait_until

MODEL = "svd-tiny"
SAMPLE = sample_png()
QUICK = dict(model=MODEL, num_frames=1, num_inference_steps=1, frame_encoding="none")
START_TIMEOUT = 90.0  # three processes importing torch on two shared cores
EXIT_TIMEOUT = 15.0


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port_file: Path
    log: Path
    port: int = 0
    metrics_port: int = 0
    health_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return metric_value(response.read().decode(), name, **labels)

    def successes(self) -> float:
        return self.metric("videogen_requests_total", model=MODEL, outcome="success")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _spawn(workdir: Path, source: Path, *args: str) -> ServerProcess:
    repo = workdir / "repo"
    shutil.copytree(source, repo / MODEL)
    port_file, log = workdir / "ports", workdir / "server.log"
    command = [sys.executable, "-m", "videogen_server.cli", "serve", "--model-repository", str(repo),
               "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
               "--port-file", str(port_file), "--cpu-threads", "1", "--media-threads", "1",
               "--drain-grace-seconds", "5", "--health-port", "0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=workdir)
    return ServerProcess(process, port_file, log)


def _wait_ready(servers: list[ServerProcess]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    for server in servers:
        while not server.port_file.exists():
            code = server.process.poll()
            assert code is None, f"server exited with {code} while starting:\n{server.log_tail()}"
            assert time.monotonic() < deadline, f"server not ready after {START_TIMEOUT}s:\n{server.log_tail()}"
            time.sleep(0.1)
        server.port, server.metrics_port, server.health_port = map(int, server.port_file.read_text().split())


@pytest.fixture
def three_servers(tmp_path, tiny_model_source):
    servers: list[ServerProcess] = []
    try:
        for i in range(3):
            workdir = tmp_path / f"server{i}"
            workdir.mkdir()
            servers.append(_spawn(workdir, tiny_model_source))
        _wait_ready(servers)
        yield servers
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.kill()
        for server in servers:
            try:
                server.process.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a kill that did not take
                pass


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service="videogen.v1.VideoGen"), timeout=5).status


class _LongRequest:
    """A long Generate on one server, consumed on a thread; ``started`` is set at its first step."""

    def __init__(self, target: str) -> None:
        self.client = VideoGenClient(target, timeout=60)
        self.started = threading.Event()
        self.outcome: str | None = None
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        try:
            for event in self.client.generate(SAMPLE, model=MODEL, num_frames=4, num_inference_steps=50,
                                              frame_encoding="none"):
                if isinstance(event, Progress):
                    self.started.set()
            self.outcome = "OK"
        except VideoGenError as err:
            self.outcome = err.code.name
        finally:
            self.started.set()

    def stop(self) -> None:
        self.client.close()  # cancels the call if it still runs
        self._thread.join(10)


def test_requests_spread_over_servers_and_survive_a_drain(three_servers):
    servers = three_servers
    targets = [s.target for s in servers]
    with VideoGenClient(targets, timeout=30) as client:
        assert client.target == "ipv4:" + ",".join(targets)
        for _ in range(9):
            client.run(SAMPLE, **QUICK)
        spread = [s.successes() for s in servers]
        assert sum(spread) == 9 and all(n > 0 for n in spread), spread

        # SIGTERM server 0 while it runs a request: it drains (NOT_SERVING on its probes' port, GOAWAY
        # and its gRPC port closed).
        drained, rest = servers[0], servers[1:]
        before = sum(s.successes() for s in rest)
        long_request = _LongRequest(drained.target)
        try:
            assert long_request.started.wait(20) and long_request.outcome is None, long_request.outcome
            drained.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _health(f"127.0.0.1:{drained.health_port}") != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "no NOT_SERVING after SIGTERM:\n" + drained.log_tail()
                time.sleep(0.05)
            deadline = time.monotonic() + 10  # a second of lame duck (still serving), then GOAWAY
            while port_answers(drained.target):
                assert time.monotonic() < deadline, "the gRPC port still answers:\n" + drained.log_tail()
                time.sleep(0.05)
            with pytest.raises(UnavailableError):  # a direct call cannot reach it while it drains
                with VideoGenClient(drained.target, timeout=10, retry=False) as direct:
                    direct.run(SAMPLE, **QUICK)

            failures = []
            for _ in range(6):
                try:
                    client.run(SAMPLE, **QUICK)
                except VideoGenError as err:  # pragma: no cover - what the test guards against
                    failures.append(repr(err))
            assert failures == []
            assert sum(s.successes() for s in rest) - before == 6
        finally:
            long_request.stop()
        try:
            code = drained.process.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the drained server did not exit within {EXIT_TIMEOUT}s:\n{drained.log_tail()}")
        assert code == 0, drained.log_tail()
        assert "SIGTERM: draining" in drained.log.read_text()

        # With one server gone the other two still serve the same client.
        client.run(SAMPLE, **QUICK)
        assert all(s.process.poll() is None for s in rest)


def test_a_refused_request_is_retried_on_another_server(tmp_path, tiny_model_source):
    """An engine that refuses Generate with UNAVAILABLE before any response (draining, its port still
    open: what a call that reached a server just before its drain began meets, or a model not ready
    there): the call is sent again and round_robin takes it to the other server."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_source, repo / MODEL)
    with ServerThread(repo) as good, ServerThread(repo) as draining:
        draining.engine.begin_drain()  # refuses new requests (health checks are off in these clients)
        targets = [good.target, draining.target]

        def refused() -> float:
            return draining.metric("videogen_requests_total", outcome="rejected", code="UNAVAILABLE")

        # Sequential calls: round_robin sends each retry to the other server.
        with VideoGenClient(targets, timeout=30, health_check=False) as client:
            for _ in range(6):
                client.run(SAMPLE, **QUICK)
        after_sync = refused()
        assert after_sync >= 1  # some went to the draining server first, and were retried
        assert good.metric("videogen_requests_total", outcome="success") == 6

        async def sequentially() -> None:  # the asyncio client does the same
            async with AsyncVideoGenClient(targets, timeout=30, health_check=False) as aio_client:
                for _ in range(6):
                    await aio_client.run(SAMPLE, **QUICK)

        asyncio.run(sequentially())
        assert refused() > after_sync
        assert good.metric("videogen_requests_total", outcome="success") == 12

        with VideoGenClient(targets, timeout=30, retry=False, health_check=False) as client:
            errors = []
            for _ in range(6):
                try:
                    client.run(SAMPLE, **QUICK)
                except UnavailableError as err:
                    errors.append(err)
        assert errors and all("shutting down" in e.details for e in errors)

        # With client-side health checks (on by default for several servers) a server that
        # reports NOT_SERVING gets no calls at all.
        draining.run(draining.server._health.update())
        before = refused()
        with VideoGenClient(targets, timeout=30, retry=False) as client:
            for _ in range(4):
                client.run(SAMPLE, **QUICK)
        assert refused() == before


def test_a_plain_grpc_client_balancing_over_servers_loses_no_call_to_a_drain(tmp_path, tiny_model_source):
    """A client that is not the SDK (grpc's round_robin over both addresses, no retry policy, no health
    checks, as a Go or Java service would call us) kept sending calls to a draining server: its port
    stayed open, refusing each call UNAVAILABLE, so round_robin kept it in the rotation (13 of 25 calls
    failed in a lifecycle audit). The drain now sends GOAWAY and closes the port at its start, as
    grpc's graceful stop does: the draining server's call in flight finishes, and the rest go to the
    other server, none lost."""
    from videogen.v1 import videogen_pb2 as pb
    from videogen.v1 import videogen_pb2_grpc

    from ..helpers import Stream, request

    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_source, repo / MODEL)
    with ServerThread(repo) as good, ServerThread(repo, drain_grace_seconds=60) as draining:
        options = [("grpc.lb_policy_name", "round_robin"), ("grpc.enable_retries", 0)]
        with grpc.insecure_channel(f"ipv4:{good.target},{draining.target}", options=options) as channel:
            stub = videogen_pb2_grpc.VideoGenStub(channel)
            quick = request(model=MODEL, num_frames=1, num_inference_steps=1,
                            output={"frame_encoding": pb.FRAME_ENCODING_NONE})
            for _ in range(4):
                list(stub.Generate(quick, timeout=30))
            before = good.metric("videogen_requests_total", outcome="success")
            assert 0 < before < 4  # both addresses in the rotation
            running = Stream(draining.stub(), request(model=MODEL, num_frames=4, num_inference_steps=50))
            assert running.progressed.wait(30) and running.error is None
            stopping = asyncio.run_coroutine_threadsafe(draining.server.stop(), draining.loop)
            wait_until(lambda: draining.engine.draining, 10, "the drain's start")
            failures = []
            for _ in range(10):
                try:
                    list(stub.Generate(quick, timeout=30))
                except grpc.RpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")
            assert failures == []
            served = good.metric("videogen_requests_total", outcome="success") - before  # (the rest in the lame duck)
            assert served >= 5
            assert running.join().summary.num_frames == 4  # the call in flight finished in the drain
            stopping.result(30)
            # (the draining server's own registry: its stop took /metrics) its share, and the call in flight
            assert draining.counted("videogen_requests_total", outcome="success") == (4 - before) + (10 - served) + 1
            assert not draining.counted("videogen_requests_total", outcome="rejected")


@pytest.mark.parametrize("client_kind", ["sync", "asyncio"])
def test_a_request_still_queued_when_a_drain_ends_moves_to_another_server(tmp_path, tiny_model_source, client_kind,
                                                                          caplog):
    """A request a server accepted but never started used to be lost when the drain's grace ended
    (UNAVAILABLE after Accepted, which no retry resends; a rollout with queues lost them all: deploy
    review). The server now marks it not started and the SDK sends it again, under the same request
    id, to another server: the caller gets its video and one Accepted event."""
    from ..helpers import Stream, request

    caplog.set_level("INFO", logger="videogen.requests")
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_source, repo / MODEL)
    with ServerThread(repo) as one, ServerThread(repo) as two:
        servers = (one, two)
        # both busy with a long request each, so the SDK's request waits in the queue of whichever it reaches
        long = {s: Stream(s.stub(), request(model=MODEL, num_inference_steps=50, num_frames=16)) for s in servers}
        for stream in long.values():  # (the tiny model's limits: 50 steps, 16 frames; seconds on CPU)
            assert stream.progressed.wait(30) and stream.error is None, stream.error
        result: dict = {}

        def call() -> None:
            try:
                if client_kind == "sync":
                    with VideoGenClient([one.target, two.target], timeout=120) as client:
                        result["events"] = list(client.generate(SAMPLE, **QUICK))
                else:
                    async def run() -> list:
                        async with AsyncVideoGenClient([one.target, two.target], timeout=120) as client:
                            return [e async for e in client.generate(SAMPLE, **QUICK)]

                    result["events"] = asyncio.run(run())
            except Exception as err:  # noqa: BLE001 - asserted below
                result["error"] = err

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 30
        while not any(s.metric("videogen_queue_depth", model=MODEL) for s in servers):
            assert time.monotonic() < deadline and caller.is_alive(), result
            time.sleep(0.02)
        holding = next(s for s in servers if s.metric("videogen_queue_depth", model=MODEL))
        other = two if holding is one else one
        long[other].call.cancel()  # the other server is free to take it
        asyncio.run_coroutine_threadsafe(holding.server.stop(0.3), holding.loop).result(60)
        caller.join(60)
        assert not caller.is_alive() and "error" not in result, result
        events = result["events"]
        kinds = [type(e).__name__ for e in events]
        assert kinds.count("Accepted") == 1 and kinds[-1] == "Summary", kinds
        accepted, summary = events[0], events[-1]
        assert summary.request_id == accepted.request_id  # the same id on both servers
        # and the same seed: the first server drew it, the second ran with it (the video Accepted described)
        ran = [r.videogen_request for r in caplog.records if getattr(r, "videogen_request", {}).get("outcome")
               == "success" and r.videogen_request["request_id"] == accepted.request_id]
        assert [r["seed"] for r in ran] == [accepted.parameters["seed"]], (ran, accepted)
        stopped = holding.server.metrics.registry  # (its /metrics endpoint stopped with it)
        assert stopped.get_sample_value("videogen_requests_total", {"model": MODEL, "version": "1", "outcome":
                                                                    "rejected", "code": "UNAVAILABLE"}) == 1
        assert other.metric("videogen_requests_total", model=MODEL, outcome="success") == 1
        assert long[holding].join().code() == grpc.StatusCode.UNAVAILABLE  # was running: stopped, an error


def test_a_model_that_failed_to_load_does_not_cut_load_balancing_clients_off(make_repo):
    """Client-side health checks (on for several servers) ask for the API's service name. It used to read
    NOT_SERVING whenever any model had failed to load, or none was loaded yet in explicit mode, so
    such a client refused every call to those servers: generating with their ready models, and the
    model control calls that could mend them (client review). The service name now says whether the
    server takes calls (start-up done, no drain); "" stays the orchestrator's "every model ready", and
    each model's own name its readiness."""
    from ..helpers import tiny_config

    repo = make_repo({"good": tiny_config("good"), "bad": tiny_config("bad", parameters='parameters { key: "x" }')})
    with ServerThread(repo) as one, ServerThread(repo, model_control_mode="explicit") as two:
        def status(server: ServerThread, service: str) -> int:
            return health_pb2_grpc.HealthStub(server.channel()).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5).status

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert [status(one, s) for s in ("", "videogen.v1.VideoGen", "inference.GRPCInferenceService",
                                         "videogen.v1.VideoGen/good", "videogen.v1.VideoGen/bad")] == \
            [not_serving, serving, serving, serving, not_serving]
        assert [status(two, s) for s in ("", "videogen.v1.VideoGen")] == [not_serving, serving]  # nothing loaded
        for target in (f"ipv4:127.0.0.1:{one.port},127.0.0.1:{one.port}", f"dns:///127.0.0.1:{one.port}"):
            with VideoGenClient(target, timeout=30, retry=False) as client:
                assert client.run(SAMPLE, **{**QUICK, "model": "good"}).summary.num_frames == 1
        with VideoGenClient(f"ipv4:127.0.0.1:{two.port},127.0.0.1:{two.port}", timeout=60, retry=False) as client:
            assert client.load_model("good").state == "ready"
            assert client.run(SAMPLE, **{**QUICK, "model": "good"}).summary.num_frames == 1


def test_wait_until_ready_over_several_servers_is_not_ended_by_one_that_failed(tmp_path, tiny_model_source):
    """With several servers each poll reaches one of them; once a server whose copy of the model failed
    to load was reachable (its service health is SERVING now), the wait raised "failed to load" from it
    while the other served the model (review of the change: 4 of 10 waits failed). Over several servers
    one failure is not final: 16 in a row are (a model failed everywhere does not wait out the
    timeout: re-review). One server's failure still ends the wait at once."""
    from videogen_client import ModelNotFoundError, UnavailableError

    from ..helpers import tiny_config, write_config

    good, bad = tmp_path / "good", tmp_path / "bad"
    for repo, config in ((good, None), (bad, tiny_config(MODEL, parameters='parameters { key: "x" }'))):
        shutil.copytree(tiny_model_source / "1", repo / MODEL / "1")
        write_config(repo / MODEL, MODEL, config)
    with ServerThread(good) as one, ServerThread(bad) as two:
        fleet = f"ipv4:127.0.0.1:{one.port},127.0.0.1:{two.port}"
        with VideoGenClient(fleet, timeout=30) as client:
            for _ in range(6):
                assert client.wait_until_ready(MODEL, timeout=30, poll_interval=0.05).state == "ready"
        # failed on every server: it ends after 16 such answers in a row, not at the timeout
        with VideoGenClient(f"ipv4:127.0.0.1:{two.port},127.0.0.1:{two.port}", timeout=30) as client:
            started = time.monotonic()
            with pytest.raises(UnavailableError, match="failed to load.*unknown parameter"):
                client.wait_until_ready(MODEL, timeout=60, poll_interval=0.05)
            assert time.monotonic() - started < 20
            with pytest.raises(ModelNotFoundError):  # a name no server knows: the same
                client.wait_until_ready("no-such-model", timeout=60, poll_interval=0.05)
        with VideoGenClient(two.target, timeout=30) as client, pytest.raises(UnavailableError, match="failed to load"):
            client.wait_until_ready(MODEL, timeout=30)


def test_retries_respect_max_attempts_and_the_deadline(tmp_path, tiny_model_source, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_source, repo / MODEL)
    with ServerThread(repo) as draining:
        draining.engine.begin_drain()
        policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
        with VideoGenClient(draining.target, timeout=30, retry=policy) as client:
            with pytest.raises(UnavailableError):
                client.run(SAMPLE, **QUICK)
        # The server refuses before sending headers, so gRPC's retry policy makes the 3 attempts; the
        # client's own retry (for servers that send headers first) adds none here.
        assert draining.metric("videogen_requests_total", outcome="rejected", code="UNAVAILABLE") == 3
        # the SDK's own backoff at its cap rather than drawn from 0-5 s (full jitter), so that a client that
        # waited it out past its deadline would show it whenever the call comes back to the SDK in time
        # (gRPC's own retries, whose jittered backoff is in C, mostly end it at the deadline first)
        monkeypatch.setattr(RetryPolicy, "backoff", lambda self, attempt: self.max_backoff)
        start = time.monotonic()
        slow = RetryPolicy(max_attempts=5, initial_backoff=5, max_backoff=5)
        with VideoGenClient(draining.target, timeout=0.5, retry=slow) as client:
            # the deadline ends the call during gRPC's backoff (DEADLINE_EXCEEDED), or the client's
            # own retry gives up before waiting past it (UNAVAILABLE)
            with pytest.raises((UnavailableError, DeadlineExceededError)):
                client.run(SAMPLE, **QUICK)
        assert time.monotonic() - start < 4.5  # no backoff past the deadline


class _RefusesAfterHeaders:
    """A stand-in server whose Generate sends response headers, then ends UNAVAILABLE with no pushback, as
    a server or proxy that sends headers first does: gRPC commits such a call and leaves the resend to the
    SDK (the test above hears most refusals from gRPC's own retries, whose jittered backoff is in C, so it
    checks the SDK's wait only when a call comes back to it in time)."""

    def __init__(self) -> None:
        from concurrent import futures

        from videogen.v1 import videogen_pb2_grpc as pb_grpc

        self.calls = 0
        stand_in = self

        class Refusing(pb_grpc.VideoGenServicer):
            def Generate(self, request, context):
                stand_in.calls += 1
                context.send_initial_metadata((("x-request-id", "r"),))
                # the headers on the wire before the status: sent together, they can go as one trailers-only
                # response (seen on a loaded machine), which the SDK leaves to gRPC's retries
                time.sleep(0.2)
                context.abort(grpc.StatusCode.UNAVAILABLE, "draining")

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_VideoGenServicer_to_server(Refusing(), self.server)
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def __enter__(self) -> "_RefusesAfterHeaders":
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(None)


@pytest.mark.parametrize("client_kind", ["sync", "asyncio"])
def test_the_clients_own_resend_does_not_wait_past_the_deadline(client_kind, monkeypatch):
    monkeypatch.setattr(RetryPolicy, "backoff", lambda self, attempt: self.max_backoff)  # 5 s, not 0-5 s
    slow = RetryPolicy(max_attempts=5, initial_backoff=5, max_backoff=5)
    fast = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.01)

    # gRPC's own retries off: a status that reaches a loaded client together with the headers could still
    # be retried by gRPC under the same policy (seen: 4 calls for 3 attempts; a deadline passed in gRPC's
    # own 5 s backoff), and every attempt here must be the SDK's
    own_only = [("grpc.enable_retries", 0)]

    def run(target: str, timeout: float, retry: RetryPolicy) -> None:
        if client_kind == "sync":
            with VideoGenClient(target, timeout=timeout, retry=retry, options=own_only) as client:
                client.run(SAMPLE, **QUICK)
        else:
            async def go() -> None:
                async with AsyncVideoGenClient(target, timeout=timeout, retry=retry, options=own_only) as client:
                    await client.run(SAMPLE, **QUICK)

            asyncio.run(go())

    with _RefusesAfterHeaders() as server:
        with pytest.raises(UnavailableError):  # the SDK does resend such refusals: all 3 attempts
            run(server.target, 30, fast)
        assert server.calls == 3
        server.calls = 0
        start = time.monotonic()
        with pytest.raises(UnavailableError):  # its 5 s wait would outlast the 2 s deadline: none
            run(server.target, 2, slow)
        assert time.monotonic() - start < 4.5 and server.calls == 1


# -- without a server -------------------------------------------------------------------------------


def test_a_resent_request_gets_the_new_servers_estimate():
    """After a hand-back the SDK sends the request again; the second server's Accepted reaches the caller
    when it carries an estimate (the first server's, which gave the request up, no longer holds), and
    not when it says nothing new (one Accepted per request, as before)."""
    from videogen_client import Accepted

    def accepted(end=None, version=1):
        return Accepted(request_id="r", model="m", model_version=version, queue_position=0,
                        parameters={"seed": 1}, estimated_start_seconds=None if end is None else 0.0,
                        estimated_end_seconds=end)

    attempts = StreamAttempts()
    assert attempts.passes(accepted(end=5.0))
    assert not attempts.passes(accepted())  # nothing new: a server without an estimate
    assert attempts.passes(accepted(end=2.0))  # the server that runs it, its own estimate
    assert attempts.passes(accepted(version=2)) and attempts.first.estimated_end_seconds == 5.0


def test_a_resent_request_carries_what_is_left_of_its_queue_timeout():
    """A request handed back unstarted waited in the first server's queue; sent again with its whole
    queue timeout, each server would count it afresh, and the caller's limit could be exceeded several
    times over (client review). The resend carries what is left since the first Accepted, and once none
    is left it is not sent again (the server's refusal reaches the caller). The seed the first server
    drew goes along; a request without a queue timeout of its own keeps the model's."""
    from videogen.v1 import videogen_pb2

    from videogen_client import Accepted

    first = Accepted(request_id="r", model="m", model_version=1, queue_position=0, parameters={"seed": 7},
                     estimated_start_seconds=None, estimated_end_seconds=None)
    request = videogen_pb2.GenerateRequest(model="m", timeout_microseconds=2_000_000)
    attempts = StreamAttempts()
    assert attempts.passes(first)
    attempts.accepted_at -= 0.5  # it waited half a second on the first server
    again = attempts.again(request)
    assert again.seed == 7 and 1_400_000 <= again.timeout_microseconds <= 1_500_000
    # the retry's wait (a backoff, the server's pushback) counts too: sent 1 s from now, 0.5 s are left
    assert 400_000 <= attempts.again(request, after=1.0).timeout_microseconds <= 500_000
    assert attempts.again(request, after=1.6) is None  # nothing left once sent: not sent
    error = attempts.queue_timeout_passed("r")
    assert isinstance(error, DeadlineExceededError) and error.error_reason == "QUEUE_TIMEOUT" and error.request_id == "r"
    attempts.accepted_at -= 1.5  # two seconds in all: nothing left
    assert attempts.again(again) is None
    refused_first = StreamAttempts()  # refused before any Accepted (queue full): no queue time spent
    assert refused_first.again(request).timeout_microseconds == 2_000_000
    model_default = StreamAttempts()
    assert model_default.passes(first)
    assert model_default.again(videogen_pb2.GenerateRequest(model="m")).timeout_microseconds == 0


class _Refused(grpc.RpcError):
    """A Generate refused after the server sent headers (gRPC committed it: the SDK's own resend)."""

    def __init__(self, trailers=(), code=grpc.StatusCode.RESOURCE_EXHAUSTED) -> None:
        self._trailers, self._code = tuple(trailers), code

    def code(self):
        return self._code

    def initial_metadata(self):
        return (("x-request-id", "r"),)

    def trailing_metadata(self):
        return self._trailers


def test_the_clients_own_resend_waits_the_servers_pushback():
    """The resend gRPC leaves to the SDK waits what the server's pushback says, as gRPC's own retries
    do: its milliseconds instead of the backoff, no resend for a negative or unreadable value, and
    none that the call's deadline would cut."""
    settings = connection_settings("localhost:1", secure=False, root_certificates=None, private_key=None,
                                   certificate_chain=None, token=None, options=None,
                                   retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.01))
    later = time.monotonic() + 60

    def wait(trailers, deadline=later):
        return retry_wait(_Refused(trailers), settings, 1, deadline, received=False)

    assert wait([]) <= 0.01  # no pushback: the backoff
    assert wait([("grpc-retry-pushback-ms", "2500")]) == 2.5
    assert wait([("grpc-retry-pushback-ms", "0")]) == 0.0
    assert wait([("grpc-retry-pushback-ms", "-1")]) is None
    assert wait([("grpc-retry-pushback-ms", "soon")]) is None
    assert wait([("grpc-retry-pushback-ms", "2500")], deadline=time.monotonic() + 2) is None
    assert retry_wait(_Refused([("grpc-retry-pushback-ms", "2500")]), settings, 4, later, received=False) is None
    # the edges a policy takes: a multiplier gRPC takes raised OverflowError at the third resend, and a
    # wait of centuries with no deadline overflowed Event.wait (review of the change)
    import threading

    vast = connection_settings("localhost:1", secure=False, root_certificates=None, private_key=None,
                               certificate_chain=None, token=None, options=None,
                               retry=RetryPolicy(max_attempts=5, backoff_multiplier=1e300, max_backoff=315576000000))
    for attempt in (1, 2, 3, 4):
        assert 0 <= retry_wait(_Refused([]), vast, attempt, None, received=False) <= threading.TIMEOUT_MAX
    assert retry_wait(_Refused([("grpc-retry-pushback-ms", str(2**62))]), vast, 1, None,
                      received=False) == threading.TIMEOUT_MAX


def test_targets_become_one_grpc_target():
    assert channel_target("localhost:8001") == "localhost:8001"
    assert channel_target("dns:///videogen.ml.svc:8001") == "dns:///videogen.ml.svc:8001"
    assert channel_target("ipv4:10.0.0.1:1,10.0.0.2:2") == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target(["10.0.0.1:1", "10.0.0.2:2"]) == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target("10.0.0.1:1, 10.0.0.2:2") == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target(("127.0.0.1:1", "localhost:2")) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    assert channel_target(["10.0.0.1:1"]) == "10.0.0.1:1"
    for bad in ("", [], ["10.0.0.1:1", ""], ["10.0.0.1", "10.0.0.2:2"], ["10.0.0.1:1", "10.0.0.2:0"],
                ["dns:///a:1", "10.0.0.2:2"], ["[::1]:1", "10.0.0.2:2"], "10.0.0.1:1,,10.0.0.2:2"):
        with pytest.raises(ValueError):
            channel_target(bad)


def test_service_config_has_round_robin_health_checks_and_the_retry_policy():
    config = json.loads(service_config("round_robin", RetryPolicy(), health_check=True))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "videogen.v1.VideoGen"}
    assert "healthCheckConfig" not in json.loads(service_config("round_robin", RetryPolicy()))
    (method,) = config["methodConfig"]
    assert {"service": "videogen.v1.VideoGen", "method": "Generate"} in method["name"]
    assert method["retryPolicy"] == {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "5s",
                                     "backoffMultiplier": 2.0,
                                     "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]}
    assert "methodConfig" not in json.loads(service_config("pick_first", None, health_check=False))

    def health_checked(target) -> bool:
        settings = connection_settings(target, secure=False, root_certificates=None, private_key=None,
                                       certificate_chain=None, token=None, options=None)
        return "healthCheckConfig" in json.loads(dict(settings.options)["grpc.service_config"])

    assert not health_checked("localhost:8001") and not health_checked(["127.0.0.1:1"])
    assert health_checked(["127.0.0.1:1", "127.0.0.1:2"]) and health_checked("dns:///videogen:8001")
    assert health_checked("ipv4:10.0.0.1:1,10.0.0.2:1") and not health_checked("ipv4:10.0.0.1:1")

    settings = connection_settings(["127.0.0.1:1", "127.0.0.1:2"], secure=False, root_certificates=None,
                                   private_key=None, certificate_chain=None, token=None, options=None,
                                   retry=False, load_balancing="pick_first")
    options = dict(settings.options)
    assert settings.target == "ipv4:127.0.0.1:1,127.0.0.1:2" and settings.retry is None
    assert options["grpc.enable_retries"] == 0
    assert json.loads(options["grpc.service_config"])["loadBalancingConfig"] == [{"pick_first": {}}]
    assert options["grpc.per_rpc_retry_buffer_size"] > 64 * 2**20  # a whole request can be retried
    custom = connection_settings("h:1", secure=False, root_certificates=None, private_key=None,
                                 certificate_chain=None, token=None,
                                 options=[("grpc.service_config", "{}")])
    assert dict(custom.options)["grpc.service_config"] == "{}"


def test_keepalive_becomes_the_channels_ping_options():
    def options(**kw) -> dict:
        return dict(connection_settings("h:1", secure=False, root_certificates=None, private_key=None,
                                        certificate_chain=None, token=None, **kw).options)

    # by default the client pings a silent server after 30 s and gives up 60 s later (the ping timeout,
    # which also bounds flow control's pings: gRPC's own 60 s); pings go on while the client sends
    # nothing (a queued request); only while calls are open
    default = options(options=None)
    assert (default["grpc.keepalive_time_ms"], default["grpc.keepalive_timeout_ms"],
            default["grpc.http2.ping_timeout_ms"], default["grpc.http2.max_pings_without_data"]) == (30000, 60000, 60000, 0)
    assert "grpc.keepalive_permit_without_calls" not in default
    assert options(options=None, keepalive=45)["grpc.keepalive_time_ms"] == 45000
    assert options(options=None, keepalive=15)["grpc.keepalive_time_ms"] == 15000
    for off in (0, None):
        assert not any("ping" in k or "keepalive" in k for k in options(options=None, keepalive=off))
    # the caller's own channel options win
    assert options(options=[("grpc.keepalive_time_ms", 120000)])["grpc.keepalive_time_ms"] == 120000
    # near or below the server's 10 s (it would close the connection: too_many_pings), beyond gRPC's int
    # milliseconds, or not a number
    for bad in (5, 10, 14.9, -1, 3e6, True, "30", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="keepalive"):
            options(options=None, keepalive=bad)


def test_retry_policy_is_validated():
    assert RetryPolicy(retryable_status_codes=[grpc.StatusCode.UNAVAILABLE]).retryable_status_codes == ("UNAVAILABLE",)
    # each refused when built: gRPC refuses the service config only at the first call, as an
    # INVALID_ARGUMENT that reads like a bad request (client review)
    for bad in (dict(max_attempts=1), dict(max_attempts=6), dict(max_attempts=2.5), dict(max_attempts=True),
                dict(initial_backoff=0), dict(initial_backoff=1e-10), dict(max_backoff=-1),
                # below gRPC's millisecond, beyond protobuf's longest Duration, 0 as a 32-bit float: gRPC
                # refused each at the first call (they were let through: client review, 2026-11-28)
                dict(initial_backoff=0.00099), dict(max_backoff=315576000001), dict(backoff_multiplier=1e-46),
                dict(backoff_multiplier=float("nan")), dict(retryable_status_codes=()),
                dict(retryable_status_codes=("NOPE",)), dict(retryable_status_codes=("OK",))):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
    # the edges it takes, gRPC takes: a call (to a port nobody listens on) fails for want of a server, not
    # INVALID_ARGUMENT "errors validating service config"; so does the largest message limit gRPC takes,
    # which the retry buffer's margin pushed past a C int (OverflowError building the client)
    edges = (RetryPolicy(initial_backoff=0.001, max_backoff=315576000000, backoff_multiplier=1.5e-45),
             RetryPolicy(initial_backoff=315576000000, max_backoff=0.001, backoff_multiplier=1e300))
    for policy, options in ((edges[0], None), (edges[1], [("grpc.max_send_message_length", 2**31 - 1)])):
        with VideoGenClient("127.0.0.1:1", retry=policy, options=options) as unreachable:
            with pytest.raises((UnavailableError, DeadlineExceededError)):
                unreachable.list_models(timeout=1)
    assert RetryPolicy(initial_backoff=0.001).service_config_policy()["initialBackoff"] == "0.001s"
    for policy in ("round robin", "round_robbin"):
        with pytest.raises(ValueError, match="load_balancing must be one of"):
            VideoGenClient("localhost:1", load_balancing=policy)
    with pytest.raises(TypeError):
        VideoGenClient("localhost:1", retry="yes")  # type: ignore[arg-type]


def test_cli_takes_several_targets():
    from videogen_client.cli import _targets

    assert _targets(["a:1", "b:2,c:3"]) == ["a:1", "b:2", "c:3"]
    assert _targets(["ipv4:10.0.0.1:1,10.0.0.2:2"]) == ["ipv4:10.0.0.1:1,10.0.0.2:2"]
    assert _targets(["dns:///x:1"]) == ["dns:///x:1"]
