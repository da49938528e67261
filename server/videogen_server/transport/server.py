"""Build the grpc.aio server: VideoGen, the Open Inference Protocol (KServe v2 / Triton), health and
reflection on one port."""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from videogen.v1 import videogen_pb2, videogen_pb2_grpc

from ..config import ServerConfig, read_token_file
from ..errors import PortUnavailable
from . import kserve
from .auth import BearerTokenInterceptor
from .credentials import CredentialReloader, TlsFiles, TokenFile, fingerprint
from .limits import ConcurrencyLimit
from .servicer import VideoGenServicer, refused_before_engine
from .tracing import TracingInterceptor

log = logging.getLogger(__name__)

VIDEOGEN_SERVICE = videogen_pb2.DESCRIPTOR.services_by_name["VideoGen"].full_name


#: The server's own health service names (open without a token); each model has its own, below.
SERVER_HEALTH_SERVICES = ("", VIDEOGEN_SERVICE, kserve.SERVICE_NAME)


#: The calls that load and unload models: with model-control tokens configured, only those tokens may
#: make them (Triton's restricted "model-repository" protocol).
MODEL_CONTROL_METHODS = (f"/{VIDEOGEN_SERVICE}/LoadModel", f"/{VIDEOGEN_SERVICE}/UnloadModel",
                         f"/{kserve.SERVICE_NAME}/RepositoryModelLoad", f"/{kserve.SERVICE_NAME}/RepositoryModelUnload")


def model_health_name(model: str) -> str:
    """Per-model health service name: `videogen.v1.VideoGen/<model>`."""
    return f"{VIDEOGEN_SERVICE}/{model}"


def handshake_timeout(config: ServerConfig) -> tuple[str, int]:
    """A connection that has not finished its handshake (TLS, the HTTP/2 preface) in time is closed."""
    return "grpc.server_handshake_timeout_ms", int(config.handshake_timeout_seconds * 1000)


def channel_options(config: ServerConfig) -> list[tuple[str, int]]:
    options = [
        # The conditioning image arrives in the request: accept up to the configured bound (per-model
        # image limits are checked after). Responses are split to <= 1 MiB messages, so the default
        # send limit is never approached.
        ("grpc.max_receive_message_length", config.max_request_bytes),
        # Let clients keep idle channels open with keepalive pings no more often than every 10 s.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        handshake_timeout(config),
    ]
    if limit := config.connection_limit():
        options.append(("grpc.max_allowed_incoming_connections", limit))
    if config.keepalive_seconds > 0:
        # Dead callers (a host gone, a cut network: no FIN or RST): ping after keepalive_seconds without
        # a frame from the client and close the connection if no answer comes in keepalive_timeout_seconds,
        # cancelling its requests, queued ones included, before they run for nobody. grpcio 1.85 bounds
        # the answer's wait by the ping timeout (grpc.http2.ping_timeout_ms), and that for every ping,
        # flow-control (BDP) pings included, whose answer waits behind what the caller still has queued
        # toward the server (a large image upload): the default keeps gRPC's own 60 s, below which a slow
        # caller's upload was cut.
        timeout_ms = int(config.keepalive_timeout_seconds * 1000)
        options += [("grpc.keepalive_time_ms", int(config.keepalive_seconds * 1000)),
                    ("grpc.keepalive_timeout_ms", timeout_ms), ("grpc.http2.ping_timeout_ms", timeout_ms)]
    if config.max_connection_age_seconds > 0:
        # Scale-out: clients re-resolve and rebalance when their connection ages out (GOAWAY);
        # streams still running on it get the grace period.
        options += [("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_seconds * 1000))]
    return options


class Health(HealthServicer):
    """grpc.health.v1 with `List` (grpcio-health-checking's asyncio servicer answers it UNIMPLEMENTED,
    with Python's exception text): every name this server reports and its status. Without a token, when
    tokens are configured, the auth interceptor leaves only the server's own names in the answer."""

    async def List(self, request: health_pb2.HealthListRequest, context) -> health_pb2.HealthListResponse:
        statuses = dict(self._server_status)  # (the base class's table: a snapshot, as the protocol allows)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()})

    def names(self) -> list[str]:
        return list(self._server_status)

    async def enter_graceful_shutdown(self) -> None:
        """The base class's, over a copy of the names: it awaits each name's watchers' lock while it walks
        the table, and a `forget` waiting on one of them then changed the table under the walk (the stop
        failed with "dictionary changed size during iteration": review)."""
        if self._gracefully_shutting_down:
            return
        self._gracefully_shutting_down = True
        for service in list(self._server_status):
            await self._set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def forget(self, service: str) -> None:
        """`service` is no longer reported (a model that left the repository): Check answers NOT_FOUND,
        a Watch SERVICE_UNKNOWN, List leaves it out, as for a name never known. It was kept at its last
        status (NOT_SERVING) for good, and listed."""
        if self._gracefully_shutting_down or service not in self._server_status:
            return
        condition = self._server_watchers.get(service)  # (a defaultdict: get() adds nothing)
        if condition is None:
            del self._server_status[service]
            return
        async with condition:
            self._server_status.pop(service, None)
            condition.notify_all()


class HealthReporter:
    """Keeps grpc.health.v1 in step with the engine.

    "" (the orchestrator's probes): `Engine.ready`: SERVING once every model the control mode asked for
    is loaded and warm (with --strict-readiness=false, after start-up, while one model at least is
    ready), until a drain. Each API's service name (what gRPC client-side health checking asks): SERVING
    from the end of start-up until a drain (`Engine.serving`: unless every loaded version lost its
    instances), so that a model that failed to load (or none loaded yet, in explicit mode) does not make
    load-balancing clients refuse every call to the server, those for its ready models and the model
    control calls included. Each model's name: SERVING while that model takes requests; unknown (NOT_FOUND)
    once the model has left the repository."""

    def __init__(self, engine, servicer: Health) -> None:
        self._engine = engine
        self.servicer = servicer

    async def update(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        await self.servicer.set("", serving if self._engine.ready else not_serving)
        for name in SERVER_HEALTH_SERVICES[1:]:
            await self.servicer.set(name, serving if self._engine.serving else not_serving)
        models = {model_health_name(name): name for name in list(self._engine.models)}
        for health_name, name in models.items():
            await self.servicer.set(health_name, serving if self._engine.model_ready(name) else not_serving)
        for health_name in self.servicer.names():
            if health_name not in models and health_name not in SERVER_HEALTH_SERVICES:
                await self.servicer.forget(health_name)


#: No SO_REUSEPORT (gRPC's default is on): a second server on a taken port fails to bind instead of
#: silently sharing it (and its callers, and the probes) with the first.
EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)


#: Connections the health port holds at once (kubelet and load-balancer probes: a few at a time)
HEALTH_MAX_CONNECTIONS = 64


def _bind(server: grpc.aio.Server, address: str, what: str, credentials=None) -> int:
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as err:  # grpcio raises this (not port 0) when the address cannot be bound
        raise PortUnavailable(f"cannot bind the {what} {address}: {err}") from None
    if port == 0:
        raise PortUnavailable(f"cannot bind the {what} {address}")
    return port


async def release_unstarted(servers: list[grpc.aio.Server], health: HealthReporter) -> None:
    """Lets bound, never started servers' ports go (a start that failed on a later port). gRPC's core
    keeps an unstarted server's listeners through its stop, and after it is collected (measured with
    grpcio 1.85: the port could not be bound again; grpc/grpc#23390, where C# starts the server in its
    shutdown for this, grpc/grpc#31232): each is started and stopped at once, its health NOT_SERVING
    first, so a caller that reaches it in between is refused."""
    await health.servicer.enter_graceful_shutdown()
    for server in servers:
        await server.start()
        await server.stop(None)


def build_health_server(health: HealthReporter, config: ServerConfig) -> tuple[grpc.aio.Server, int]:
    """The plaintext health-only server (`config.health_port`): the same statuses as the main port's
    grpc.health.v1, nothing else. With bearer tokens configured it answers the server's own names only
    and never takes a token (it would travel in clear text): ask the main port for a model's health.
    Bound, not started."""
    interceptors = [BearerTokenInterceptor((), open_health_services=SERVER_HEALTH_SERVICES,
                                           denial="this plaintext port answers the server's own health only; "
                                                  "ask the gRPC port for a model's")] if config.authenticates else []
    # its own connection limit (probes open one at a time), taken from FD_RESERVE: silent sockets on it
    # cannot take the process's file descriptors either
    server = grpc.aio.server(interceptors=interceptors,
                             options=[("grpc.max_receive_message_length", 64 * 1024), EXCLUSIVE_PORT,
                                      handshake_timeout(config),
                                      ("grpc.max_allowed_incoming_connections", HEALTH_MAX_CONNECTIONS)])
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    return server, _bind(server, f"{config.host}:{config.health_port}", "health port")


def _read_tokens(path: Optional[Path], flag: str) -> tuple[tuple[str, ...], tuple]:
    """A token file's tokens and its fingerprint, taken before the read (a change in between is loaded
    again); none without a file."""
    if path is None:
        return (), ()
    stamp = fingerprint((path,))
    return read_token_file(path, flag), stamp


def build_server(engine, config: ServerConfig, reloader: Optional[CredentialReloader] = None,
                 ) -> tuple[grpc.aio.Server, int, HealthReporter, Optional[ConcurrencyLimit]]:
    """A configured, bound, not yet started server; returns it, the bound port, its health reporter and
    its bound on image calls (None without --max-concurrent-requests: its `in_flight` counts them from
    their start, before gRPC has read their message).
    Its TLS files and token file are registered with `reloader`, when given, to be loaded again as they
    change."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if config.authenticates or config.restricts_model_control:
        file_tokens, stamp = _read_tokens(config.auth_token_file, "--auth-token-file")
        control_tokens, control_stamp = _read_tokens(config.model_control_token_file, "--model-control-token-file")
        tokens = BearerTokenInterceptor(config.auth_tokens + file_tokens, open_health_services=SERVER_HEALTH_SERVICES,
                                        on_denied=lambda method: engine.metrics.auth_failures.labels(method).inc(),
                                        restricted=MODEL_CONTROL_METHODS,
                                        restricted_tokens=config.model_control_tokens + control_tokens,
                                        authenticate=config.authenticates)
        # exported at 0, the methods that may be refused: an alert's increase() sees the first refusal
        for method in ((f"/{VIDEOGEN_SERVICE}/Generate", f"/{kserve.SERVICE_NAME}/ModelInfer") if config.authenticates
                       else ()) + (MODEL_CONTROL_METHODS if config.restricts_model_control else ()):
            engine.metrics.auth_failures.labels(method)
        interceptors.append(tokens)
        if reloader is not None and config.auth_token_file:
            reloader.add(TokenFile(config.auth_token_file, config.auth_tokens, tokens.set_tokens), stamp)
        if reloader is not None and config.model_control_token_file:
            reloader.add(TokenFile(config.model_control_token_file, config.model_control_tokens,
                                   tokens.set_restricted_tokens, flag="--model-control-token-file",
                                   kind="model_control_tokens"), control_stamp)
    if engine.tracing.enabled:  # after authentication: a caller refused its token makes the server trace nothing
        interceptors.append(TracingInterceptor(engine.tracing.tracer))
    limit = None
    if config.max_concurrent_requests:  # innermost: a caller refused a token takes no place
        interceptors.append(limit := ConcurrencyLimit(
            config.max_concurrent_requests, {f"/{VIDEOGEN_SERVICE}/Generate": False,
                                             f"/{kserve.SERVICE_NAME}/ModelInfer": True},
            on_refused=functools.partial(refused_before_engine, engine),
            read_timeout=config.request_read_timeout_seconds or None))
    server = grpc.aio.server(options=[*channel_options(config), EXCLUSIVE_PORT], interceptors=interceptors)
    videogen_pb2_grpc.add_VideoGenServicer_to_server(
        VideoGenServicer(engine, model_control_mode=config.model_control_mode), server)
    # The Open Inference Protocol (KServe v2 / Triton) on the same port, over the same engine.
    kserve.kpb_grpc.add_GRPCInferenceServiceServicer_to_server(
        kserve.KServeServicer(engine, model_control_mode=config.model_control_mode), server)
    health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (VIDEOGEN_SERVICE, kserve.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server)
    address = f"{config.host}:{config.port}"
    credentials = None
    if config.tls_cert:
        tls = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
        credentials = tls.server_credentials()
        if reloader is not None:
            reloader.add(tls, tls.fingerprint)
    port = _bind(server, address, "gRPC port", credentials)
    return server, port, HealthReporter(engine, health), limit
