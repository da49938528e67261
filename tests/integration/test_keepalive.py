"""Dead peers: a caller or a server whose host vanished (or whose network was cut) sends no FIN and no RST,
so only keepalive pings tell. A real TCP relay between client and server stops forwarding both ways
(tests.helpers.SilentPeerProxy). The server cancels a silent caller's requests, queued ones before they
run; the SDK ends a call to a silent server as UNAVAILABLE instead of waiting for its deadline. The
intervals are shortened here (a ping after 1 s without a frame, its answer awaited 3 s: the server's
flags, and the SDK's `keepalive` with its floor and timeout lowered); what is checked is how each call
ends, never how long it took.
"""
from __future__ import annotations

import grpc
import pytest

from videogen.v1 import videogen_pb2_grpc as pb_grpc

from ..helpers import ServerThread, SilentPeerProxy, Stream, request, sample_png, tiny_config, wait_until

MODEL = "m"
# long enough on CPU to still run while the checks wait (16 frames at 128 px: ~0.5 s a step on CI)
LONG = dict(model=MODEL, num_inference_steps=50, num_frames=16, width=128, height=128)
SHORT = dict(model=MODEL, num_inference_steps=1, num_frames=1, width=32, height=32)
WAIT_S = 30.0


def _requests(server: ServerThread, **labels: str) -> float:
    return server.metric("videogen_requests_total", model=MODEL, **labels)


def test_the_server_cancels_the_requests_of_a_caller_that_went_silent(make_repo):
    with ServerThread(make_repo({MODEL: tiny_config(MODEL)}), keepalive_seconds=1.0,
                      keepalive_timeout_seconds=3.0) as server, SilentPeerProxy(server.port) as proxy:
        with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
            stub = pb_grpc.VideoGenStub(channel)
            running = Stream(stub, request(**LONG))
            assert running.progressed.wait(30) and running.error is None
            queued = Stream(stub, request(**SHORT))
            assert queued.accepted.wait(30) and queued.error is None
            assert server.metric("videogen_queue_depth", model=MODEL) == 1
            proxy.go_silent()
            # both requests of the silent caller end, the queued one without running
            wait_until(lambda: _requests(server, outcome="cancelled") == 2, WAIT_S, "the silent caller's requests to end")
            assert server.metric("videogen_queue_depth", model=MODEL) == 0
            assert server.metric("videogen_inflight_requests", model=MODEL) == 0
            assert _requests(server, outcome="success") == 0
        # the instance is free for the next caller
        assert list(server.stub().Generate(request(**SHORT), timeout=60))[-1].WhichOneof("event") == "summary"
        assert _requests(server, outcome="success") == 1


def test_the_sdk_ends_a_call_whose_server_went_silent_as_unavailable(make_repo, monkeypatch):
    from videogen_client import Accepted, UnavailableError, VideoGenClient
    from videogen_client import _request

    # `keepalive` is at least 15 s, as the server refuses pings more often than every 10 s, and the
    # answer's wait 60 s: both shortened for the test (the server never sees these pings: the relay is
    # silent by then)
    monkeypatch.setattr(_request, "MIN_KEEPALIVE_S", 1.0)
    monkeypatch.setattr(_request, "KEEPALIVE_TIMEOUT_S", 3.0)
    with ServerThread(make_repo({MODEL: tiny_config(MODEL)})) as server, SilentPeerProxy(server.port) as proxy:
        busy = Stream(server.stub(), request(**LONG))  # the instance is busy: the SDK's request queues
        assert busy.progressed.wait(30) and busy.error is None
        with VideoGenClient(f"127.0.0.1:{proxy.port}", keepalive=1.0) as client:
            events = client.generate(sample_png(), **SHORT, timeout=WAIT_S)
            assert isinstance(next(events), Accepted)
            proxy.go_silent()
            with pytest.raises(UnavailableError):  # without keepalive: DeadlineExceededError after WAIT_S
                next(events)
        busy.call.cancel()
        busy.join()
