"""--max-connections and --handshake-timeout-seconds: sockets that never speak do not take the server down.

A resource review held 20 000 idle TCP connections to the gRPC port (no TLS, no HTTP/2 preface, no token
needed): the process ran out of file descriptors, health checks from new connections timed out, and
such sockets were closed only after ~2 minutes, so reconnecting kept the port unusable. Real servers on
loopback, raw sockets from this process.
"""
from __future__ import annotations

import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from videogen.v1 import videogen_pb2 as pb
from videogen.v1 import videogen_pb2_grpc as pb_grpc

from ..helpers import ServerThread, wait_until

MODEL = "svd-tiny"


def _list_models(target: str, timeout: float = 3.0) -> grpc.StatusCode:
    """ListModels on a new connection: its status code."""
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            pb_grpc.VideoGenStub(channel).ListModels(pb.ListModelsRequest(), timeout=timeout)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()


def _closed_by_peer(sock: socket.socket, wait: float = 0.01) -> bool:
    """Reads what the server sent (its HTTP/2 settings) and says whether the server closed the socket."""
    sock.settimeout(wait)
    try:
        while True:
            if sock.recv(65536) == b"":
                return True
    except (TimeoutError, socket.timeout):
        return False
    except OSError:  # reset
        return True


def _health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def test_idle_sockets_take_no_more_than_their_places(tiny_model_source, tmp_path):
    import shutil

    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    # a 5 s handshake timeout: the places' 3 sockets must outlive the checks below, which a ~2 s pause of
    # this process's garbage collector (tests/gc_pauses.py) can stretch while gRPC's timer runs on in C
    with ServerThread(tmp_path, max_connections=4, health_port=0, handshake_timeout_seconds=5.0) as server:
        established = server.stub()
        assert established.ListModels(pb.ListModelsRequest(), timeout=10).models
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(12)]  # never speak
        try:
            time.sleep(0.3)
            # the port's places are taken: a new caller is refused at once, not left hanging
            t0 = time.monotonic()
            assert _list_models(server.target, timeout=10) == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < 3  # (one left to the handshake timeout would take 5 s)
            # what holds a place goes on, and the health port answers
            assert established.ListModels(pb.ListModelsRequest(), timeout=10).models
            assert _health(server.server.health_port) == health_pb2.HealthCheckResponse.SERVING
            # those over the limit were closed at once, the others once the handshake timeout passes
            assert sum(_closed_by_peer(sock) for sock in idle) == len(idle) - 3
            wait_until(lambda: all(_closed_by_peer(sock) for sock in idle), 15, "every silent socket closed")
            assert _list_models(server.target) == grpc.StatusCode.OK
        finally:
            for sock in idle:
                sock.close()


def test_the_connection_limit_follows_the_open_file_limit(tmp_path):
    import resource

    from videogen_server.config import FD_RESERVE, ServerConfig

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    config = ServerConfig(model_repositories=(tmp_path,))
    if soft == resource.RLIM_INFINITY:
        assert config.connection_limit() == 0
    else:
        assert config.connection_limit() == max(soft - FD_RESERVE, min(soft // 2, 64), 1)
    assert ServerConfig(model_repositories=(tmp_path,), max_connections=0).connection_limit() == 0
    assert ServerConfig(model_repositories=(tmp_path,), max_connections=7).connection_limit() == 7
    for bad in (dict(max_connections=-1), dict(handshake_timeout_seconds=0)):
        with pytest.raises(ValueError, match="--max-connections|--handshake-timeout-seconds"):
            ServerConfig(model_repositories=(tmp_path,), **bad)


def test_a_socket_that_never_starts_tls_is_closed_after_the_handshake_timeout(tiny_model_source, tmp_path):
    """gRPC's own handshake timeout is 120 s; with TLS as without."""
    import shutil

    from .test_security import _pki

    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    (tmp_path / "pki").mkdir()
    pki = _pki(tmp_path / "pki")
    with ServerThread(tmp_path, tls_cert=pki["server.crt"], tls_key=pki["server.key"],
                      handshake_timeout_seconds=1.5) as server:
        t0 = time.monotonic()  # before the sockets: a pause after them cannot shorten what is measured
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        try:
            wait_until(lambda: all(_closed_by_peer(sock) for sock in idle), 20, "every silent socket closed")
            assert 1.0 < time.monotonic() - t0 < 10
        finally:
            for sock in idle:
                sock.close()


def test_the_health_port_holds_a_bounded_number_of_connections(tiny_model_source, tmp_path):
    """The plaintext health port had no limit: 700 silent sockets on it took every file descriptor of a
    process whose limit was 600, and the gRPC port's calls timed out (a review)."""
    import shutil

    from videogen_server.transport.server import HEALTH_MAX_CONNECTIONS

    shutil.copytree(tiny_model_source, tmp_path / MODEL)
    with ServerThread(tmp_path, health_port=0, handshake_timeout_seconds=4) as server:
        port = server.server.health_port
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(HEALTH_MAX_CONNECTIONS + 6)]
        try:
            time.sleep(0.3)
            assert sum(_closed_by_peer(sock) for sock in idle) == 6
            assert server.stub().ListModels(pb.ListModelsRequest(), timeout=10).models  # the gRPC port serves
            wait_until(lambda: all(_closed_by_peer(sock) for sock in idle), 10, "every silent socket closed")
            assert _health(port) == health_pb2.HealthCheckResponse.SERVING
        finally:
            for sock in idle:
                sock.close()
