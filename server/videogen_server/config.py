"""Typed server settings, built in one place from the command line (see `cli.py`)."""
from __future__ import annotations

import dataclasses
import math
import os
import ssl
import sys
import urllib.parse
from pathlib import Path
from typing import Optional

MODEL_CONTROL_MODES = ("none", "explicit", "poll")
#: File descriptors kept from the gRPC port's connections when --max-connections is left to the default
#: (the health port's 64 connections among them)
FD_RESERVE = 256
#: The shortest interval between checks of the credential files (each a few stat calls, on a thread)
MIN_RELOAD_SECONDS = 0.1
#: gRPC takes durations as int milliseconds
MAX_GRPC_SECONDS = (2**31 - 1) / 1000


def check_tls_files(cert: Path, key: Optional[Path], client_ca: Optional[Path]) -> None:
    """The certificate, its key and the client CA as gRPC will need them, by OpenSSL: gRPC's own failure
    (a key of another certificate, a file that is not PEM, an encrypted key) came as "cannot bind the
    gRPC port" after a traceback-less log line (repository review)."""
    for flag, path, kind in (("--tls-cert", cert, "CERTIFICATE"), ("--tls-key", key, "PRIVATE KEY"),
                             ("--tls-client-ca", client_ca, "CERTIFICATE")):
        if path is None:
            continue
        try:
            text = Path(path).read_bytes()
        except OSError as err:
            raise ValueError(f"{flag} {path}: {err.strerror or err}") from None
        if b"-----BEGIN " not in text or kind.encode() not in text:
            raise ValueError(f"{flag} {path}: no PEM {kind.lower()} in it")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # gRPC's BoringSSL has no security levels: a key OpenSSL's default level calls too small (RSA-1024)
    # still serves, and must not stop the start here
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        # a password of b"": an encrypted key fails here (gRPC takes none) instead of prompting
        context.load_cert_chain(cert, key, password=b"")
    except (OSError, ssl.SSLError) as err:
        why = getattr(err, "reason", None) or err
        if why == "KEY_VALUES_MISMATCH":
            why = "the key is not the certificate's"
        raise ValueError(f"--tls-cert {cert} / --tls-key {key}: {why} (a PEM certificate chain and its "
                         f"unencrypted private key)") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as err:
            raise ValueError(f"--tls-client-ca {client_ca}: {getattr(err, 'reason', None) or err} "
                             f"(PEM CA certificates)") from None
    if not _grpc_serves(Path(cert).read_bytes(), Path(key).read_bytes(),
                        Path(client_ca).read_bytes() if client_ca is not None else None):
        ca = f" / --tls-client-ca {client_ca}" if client_ca is not None else ""
        raise ValueError(f"--tls-cert {cert} / --tls-key {key}{ca}: gRPC cannot serve them, though OpenSSL reads them "
                         f"(gRPC's BoringSSL takes RSA, ECDSA on P-256, P-384 or P-521, and Ed25519 keys: not DSA or "
                         f"secp256k1; its log above says why)")


def _grpc_serves(cert: bytes, key: bytes, client_ca: Optional[bytes]) -> bool:
    """Whether gRPC builds a TLS server of these: what OpenSSL takes, BoringSSL may not (a DSA key), and
    the port's bind then failed at start, or a reload was refused at the next handshake while the old
    certificate went on serving, reported loaded (review). A throwaway server on a Linux abstract socket
    (no file, no TCP port); elsewhere, not checked."""
    if not sys.platform.startswith("linux"):
        return True
    import uuid
    from concurrent import futures

    import grpc

    credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                              require_client_auth=client_ca is not None)
    server = grpc.server(futures.ThreadPoolExecutor(1))
    try:
        try:
            return server.add_secure_port(f"unix-abstract:videogen-tls-check-{os.getpid()}-{uuid.uuid4().hex}",
                                          credentials) != 0
        except RuntimeError:  # grpcio's "Failed to bind"
            return False
        finally:
            server.start()  # then stopped: a server never started keeps its listener (grpc/grpc#23390)
    finally:
        server.stop(None)


def check_tokens(tokens, source: str) -> None:
    """gRPC metadata is ASCII: a token with anything else could never be sent, and nothing said so."""
    if any(not t or not t.isascii() or not t.isprintable() or any(c.isspace() for c in t) for t in tokens):
        raise ValueError(f"{source}: tokens must be printable ASCII without whitespace")


def read_token_file(path: Path, flag: str = "--auth-token-file") -> tuple[str, ...]:
    """The bearer tokens of `--auth-token-file` (or `flag`): one a line, `#` comments and blank lines skipped; at least
    one (a file without any left the server open to every caller)."""
    source = f"{flag} {path}"
    try:
        # utf-8-sig: a byte-order mark (an editor on Windows) is not part of the first token
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{source}: {getattr(err, 'strerror', None) or err}") from None
    tokens = tuple(t for t in (line.strip() for line in text.splitlines()) if t and not t.startswith("#"))
    if not tokens:
        raise ValueError(f"{source}: no token in it (one a line; '#' starts a comment)")
    check_tokens(tokens, source)
    return tokens


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_repositories: tuple[Path, ...]
    #: gRPC listen address. "[::]" takes IPv4 and IPv6; port 0 picks a free port (read it back).
    host: str = "[::]"
    port: int = 8001
    #: Prometheus /metrics HTTP port; 0 picks a free port, -1 disables the endpoint.
    metrics_port: int = 8002
    #: "::" takes IPv6 and IPv4 (0.0.0.0 on a host without IPv6), as gRPC's "[::]" does
    metrics_host: str = "::"
    #: A second, plaintext gRPC port serving only grpc.health.v1 (on `host`), for probes that cannot
    #: speak TLS (Kubernetes' grpc probes) when the main port uses it; 0 picks a free port, -1: none.
    health_port: int = -1
    #: none: load every model at start; explicit: only --load-model (then LoadModel/UnloadModel RPCs);
    #: poll: load everything and reload models whose files change.
    model_control_mode: str = "none"
    load_models: tuple[str, ...] = ()
    repository_poll_seconds: float = 15.0
    #: Queue bound for models whose config leaves dynamic_batching.default_queue_policy.max_queue_size at 0.
    max_queue_size: int = 64
    #: torch intra-op threads for CPU instances (None: torch's default, all cores).
    cpu_threads: Optional[int] = None
    #: Threads that encode frames (PNG/JPEG) and MP4s, shared by all requests (a chunk's frames
    #: encode in parallel). Default: the CPU count, at most 8.
    media_threads: int = dataclasses.field(default_factory=lambda: min(8, os.cpu_count() or 1))
    #: On SIGTERM: seconds in-flight requests get to finish before the server stops.
    drain_grace_seconds: float = 30.0
    #: Unload: seconds in-flight requests get before they are cancelled.
    unload_timeout_seconds: float = 60.0
    #: A caller that takes none of its stream's messages for this long is cut off (0 = never): its request
    #: ends and the frames waiting for it are freed. gRPC's flow control holds a message back until the
    #: caller reads, and the model goes on producing a finished video's frames meanwhile; a caller whose
    #: process stopped reading (yet still answers keepalive pings) otherwise holds them until its deadline,
    #: if it set one. Time a message waits to be written, as nginx's send_timeout: a slow link passes.
    stream_send_timeout_seconds: float = 120.0
    #: An instance whose running batch shows no progress (no denoising step, no decoded chunk: none of
    #: the events its backend sends) for this long is retired (0 = never): a backend call that does not
    #: return (a hung kernel or driver) otherwise held its requests and the instance for good, liveness
    #: green. Its requests end UNAVAILABLE, it takes no more work, and it counts as lost (the last one
    #: takes the version down; the server's last serving version, liveness with it) and stuck. Above
    #: the slowest step and the longest compile of a shape the warm-up did not cover.
    instance_stall_seconds: float = 600.0
    #: Largest request message accepted (the conditioning image travels in it). Per-model image limits
    #: (parameters max_image_bytes / max_image_pixels) apply on top.
    max_request_bytes: int = 64 * 2**20
    #: Calls carrying an image (Generate, KServe ModelInfer) in flight at once, from their start (before the
    #: message is read) to their end, queued and running ones included; one more is refused at once,
    #: RESOURCE_EXHAUSTED (SERVER_BUSY), unread. gRPC parses a request message whole (~1.5x its size) and
    #: bounds neither how many nor how large together: this bounds the messages the server takes in at
    #: once (not what gRPC's transport buffers for calls it has not handed over yet: README). Above the
    #: queues (64 a model by default) plus what runs, or the limit refuses before a queue is full.
    #: 0 = no limit.
    max_concurrent_requests: int = 128
    #: A limited call (above) whose request message has not arrived this long after the call started is
    #: ended (DEADLINE_EXCEEDED, REQUEST_NOT_SENT), so that streams that only open cannot hold the places.
    #: Allow the largest image's upload on the slowest link served (64 MiB at ~1 MB/s: ~60 s). 0 = never.
    request_read_timeout_seconds: float = 120.0
    #: Client connections the gRPC port holds at once (gRPC's max_allowed_incoming_connections): past it a
    #: new connection is closed at once (its caller reads UNAVAILABLE, retries, or goes to another replica),
    #: while the others go on. None: the process's open-file limit less FD_RESERVE, so that connections, idle
    #: ones included, never take the descriptors the rest of the server needs (the health and metrics ports,
    #: model files, logs). 0 = no limit.
    max_connections: Optional[int] = None
    #: A connection that has not finished its handshake (TLS, the HTTP/2 preface) in this long is closed
    #: (gRPC's own default: 120 s, which let idle sockets hold the port's places that long).
    handshake_timeout_seconds: float = 20.0
    #: Close client connections after this long (plus the grace below) so that clients balancing
    #: round_robin over a headless Service re-resolve DNS and find new replicas. 0 = never.
    max_connection_age_seconds: float = 300.0
    #: In-flight streams on an aged connection get this long to finish: above the longest a request may
    #: wait in a full queue plus its own run (64 queued SVD-XT videos at ~13 s each: ~14 minutes), since
    #: gRPC cuts what is left, queued requests included, and the caller hears UNAVAILABLE ("max connection
    #: age") for work that never started. It does not delay a drain.
    max_connection_age_grace_seconds: float = 1800.0
    #: Dead callers: the server pings each connection after this long without a frame from the client,
    #: and closes it when the ping is not answered within keepalive_timeout_seconds, cancelling its
    #: requests. A caller whose host vanished or whose network was cut (no FIN, no RST) otherwise keeps
    #: its queued requests, which then run on the GPU for nobody (gRPC's own default: 2 hours). 0 = off.
    #: The timeout bounds every ping's answer, flow control's included, which waits behind what the
    #: caller still has queued toward the server: below gRPC's 60 s, a slow caller's large upload can be cut.
    keepalive_seconds: float = 60.0
    keepalive_timeout_seconds: float = 60.0
    #: TLS: PEM server certificate chain and private key (both or neither). With a client CA, mutual
    #: TLS: every client must present a certificate signed by it.
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    tls_client_ca: Optional[Path] = None
    #: Bearer tokens accepted in `authorization: Bearer <token>` metadata (VIDEOGEN_AUTH_TOKENS), with
    #: those of auth_token_file; neither = no authentication. The server's own health checks are always
    #: allowed (probes carry no token); a model's need one.
    auth_tokens: tuple[str, ...] = ()
    auth_token_file: Optional[Path] = None
    #: Tokens for model control (LoadModel/UnloadModel, KServe's RepositoryModelLoad/Unload), as Triton's
    #: restricted "model-repository" protocol (VIDEOGEN_MODEL_CONTROL_TOKENS, with those of
    #: model_control_token_file): once any is set, model control takes one of them only (a caller with
    #: another valid token is refused PERMISSION_DENIED, one without UNAUTHENTICATED), and they are valid for
    #: every other call too; the other calls need a token only with auth_tokens/auth_token_file. Neither: any
    #: caller with a valid token (any caller, without authentication) may load and unload. Explicit mode only.
    model_control_tokens: tuple[str, ...] = ()
    model_control_token_file: Optional[Path] = None
    #: How often the TLS files and the token file are checked for changes, loaded again when they have
    #: changed (a renewed certificate, rotated tokens: no restart); 0 = read once at start.
    credentials_reload_seconds: float = 10.0
    #: Stop (exit 1) when a model or version fails to load at start-up, as Triton's --exit-on-error, so
    #: an orchestrator shows a crash loop at once instead of a pod that never turns ready.
    exit_on_error: bool = False
    #: Readiness ("" in grpc.health.v1, KServe's ServerReady), as Triton's --strict-readiness: true, SERVING
    #: only while every model asked for is loaded and warm; false, SERVING from the end of start-up while
    #: the server takes calls (`Engine.serving`) and one model at least is ready: another model failing or
    #: loading after start-up keeps the pod in its Service.
    strict_readiness: bool = True
    #: `videogen-server compile-artifacts` only: each compiling model writes what its warm-up compiled into
    #: its version folder's compile_artifacts/ (servers elsewhere load it and start warm), or with an output
    #: folder into <output>/<model>/<version>/compile_artifacts/ (the repository's layout, to copy into it).
    write_compile_artifacts: bool = False
    compile_artifacts_output: Optional[Path] = None
    #: OpenTelemetry: export traces of requests over OTLP/gRPC to this collector (http://host:4317 in
    #: plaintext, https:// with TLS); None: no tracing (the caller's trace id still reaches the request log).
    otlp_endpoint: Optional[str] = None
    otlp_service_name: str = "videogen"
    #: Share of the traces that start at this server to keep; a caller's sampling decision is followed.
    trace_sample_ratio: float = 1.0
    log_format: str = "text"  # text | json
    log_level: str = "INFO"

    @property
    def authenticates(self) -> bool:
        """Whether calls need a bearer token."""
        return bool(self.auth_tokens) or self.auth_token_file is not None

    @property
    def restricts_model_control(self) -> bool:
        """Whether model control takes only the model-control tokens."""
        return bool(self.model_control_tokens) or self.model_control_token_file is not None

    def connection_limit(self) -> int:
        """max_connections, or from the open-file limit when not set (0: none)."""
        if self.max_connections is not None:
            return self.max_connections
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft > 2**31 - 1:
            return 0
        return max(soft - FD_RESERVE, min(soft // 2, 64), 1)

    def __post_init__(self) -> None:
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            raise ValueError(f"model_control_mode: {self.model_control_mode!r} is not one of {MODEL_CONTROL_MODES}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format: {self.log_format!r} is not text or json")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.tls_cert:
            check_tls_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        check_tokens(self.auth_tokens, "VIDEOGEN_AUTH_TOKENS")
        if self.auth_token_file is not None:
            read_token_file(self.auth_token_file)
        check_tokens(self.model_control_tokens, "VIDEOGEN_MODEL_CONTROL_TOKENS")
        if self.model_control_token_file is not None:
            read_token_file(self.model_control_token_file, "--model-control-token-file")
        if (self.model_control_token_file is not None and self.auth_token_file is not None
                and Path(self.model_control_token_file).resolve() == Path(self.auth_token_file).resolve()):
            raise ValueError("--model-control-token-file is --auth-token-file: every caller's token would load "
                             "and unload models; give the model-control tokens a file of their own")
        if self.restricts_model_control and self.model_control_mode != "explicit":
            raise ValueError(f"model-control tokens (--model-control-token-file, VIDEOGEN_MODEL_CONTROL_TOKENS) need "
                             f"--model-control-mode explicit: in {self.model_control_mode!r} mode no call loads or "
                             f"unloads")
        if not (self.credentials_reload_seconds == 0 or MIN_RELOAD_SECONDS <= self.credentials_reload_seconds < math.inf):
            raise ValueError(f"--credentials-reload-seconds: {self.credentials_reload_seconds} is not 0 (read once) "
                             f"or seconds from {MIN_RELOAD_SECONDS}")
        # ranges: gRPC wraps a port above 65535 (70000 listened on 4464), takes its integer options as C
        # ints (a larger value failed the start with an OverflowError) and a negative message size as
        # "unlimited"; a poll interval of 0 scanned the repositories in a busy loop (repository review)
        for flag, value, low in (("--port", self.port, 0), ("--metrics-port", self.metrics_port, -1),
                                 ("--health-port", self.health_port, -1)):
            if not low <= value <= 65535:
                raise ValueError(f"{flag}: {value} is not a port, {low}..65535")
        if not 1 <= self.max_request_bytes <= 2**31 - 1:
            raise ValueError(f"--max-request-bytes: {self.max_request_bytes} is not in 1..{2**31 - 1}")
        for flag, seconds in (("--max-connection-age-seconds", self.max_connection_age_seconds),
                              ("--max-connection-age-grace-seconds", self.max_connection_age_grace_seconds)):
            if not 0 <= seconds <= MAX_GRPC_SECONDS:
                raise ValueError(f"{flag}: {seconds} is not 0 (never) or up to {MAX_GRPC_SECONDS:.0f} (gRPC's)")
        if not 0 < self.repository_poll_seconds < math.inf:
            raise ValueError(f"--repository-poll-seconds: {self.repository_poll_seconds} is not a positive number "
                             f"of seconds")
        if self.max_queue_size < 1:
            raise ValueError(f"--max-queue-size: {self.max_queue_size} is not a positive number of requests")
        if self.media_threads < 1:
            raise ValueError(f"--media-threads: {self.media_threads} is not a positive number of threads")
        if self.cpu_threads is not None and self.cpu_threads < 0:
            raise ValueError(f"--cpu-threads: {self.cpu_threads} is not a number of threads (0: torch's)")
        for flag, seconds in (("--drain-grace-seconds", self.drain_grace_seconds),
                              ("--unload-timeout-seconds", self.unload_timeout_seconds)):
            if not 0 <= seconds < math.inf:
                raise ValueError(f"{flag}: {seconds} is not 0 or a positive number of seconds")
        ports = [(flag, p) for flag, p in (("--port", self.port), ("--metrics-port", self.metrics_port),
                                          ("--health-port", self.health_port)) if p > 0]
        for i, (flag, port) in enumerate(ports):
            clash = next((other for other, p in ports[i + 1:] if p == port), None)
            if clash:
                raise ValueError(f"{clash} {port} is also {flag}: give each listener its own port")
        if self.otlp_endpoint is not None:
            url = urllib.parse.urlsplit(self.otlp_endpoint)
            if url.scheme not in ("http", "https") or not url.netloc:
                raise ValueError(f"--otlp-endpoint: {self.otlp_endpoint!r} needs a scheme: http://HOST:4317 "
                                 "(plaintext) or https://HOST:4317 (TLS)")
            if url.path not in ("", "/") or url.query:
                raise ValueError(f"--otlp-endpoint: {self.otlp_endpoint!r} has a path: traces go over OTLP/gRPC "
                                 "(port 4317), which takes the collector's address only, not an OTLP/HTTP URL")
        if not (self.keepalive_seconds == 0 or 1 <= self.keepalive_seconds <= MAX_GRPC_SECONDS):
            raise ValueError(f"--keepalive-seconds: {self.keepalive_seconds} is not 0 (off) or 1..{MAX_GRPC_SECONDS:.0f}")
        if not 1 <= self.keepalive_timeout_seconds <= MAX_GRPC_SECONDS:
            raise ValueError(f"--keepalive-timeout-seconds: {self.keepalive_timeout_seconds} is not in "
                             f"1..{MAX_GRPC_SECONDS:.0f}")
        if not (self.stream_send_timeout_seconds == 0 or 0 < self.stream_send_timeout_seconds < math.inf):
            raise ValueError(f"--stream-send-timeout-seconds: {self.stream_send_timeout_seconds} is not 0 (never) "
                             f"or a positive number of seconds")
        if not (self.instance_stall_seconds == 0 or 0 < self.instance_stall_seconds < math.inf):
            raise ValueError(f"--instance-stall-seconds: {self.instance_stall_seconds} is not 0 (never) or a "
                             f"positive number of seconds")
        if not (self.request_read_timeout_seconds == 0 or 0 < self.request_read_timeout_seconds < math.inf):
            raise ValueError(f"--request-read-timeout-seconds: {self.request_read_timeout_seconds} is not 0 (never) "
                             f"or a positive number of seconds")
        if self.max_concurrent_requests < 0:
            raise ValueError(f"--max-concurrent-requests: {self.max_concurrent_requests} is not 0 (no limit) or a "
                             f"positive number of requests")
        if self.max_connections is not None and self.max_connections < 0:
            raise ValueError(f"--max-connections: {self.max_connections} is not 0 (no limit) or a positive number")
        if not 0 < self.handshake_timeout_seconds <= MAX_GRPC_SECONDS:
            raise ValueError(f"--handshake-timeout-seconds: {self.handshake_timeout_seconds} is not in "
                             f"(0, {MAX_GRPC_SECONDS:.0f}]")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError(f"--trace-sample-ratio: {self.trace_sample_ratio} is outside 0..1")
        if not self.otlp_service_name:
            raise ValueError("--otlp-service-name: empty")
        if self.load_models and self.model_control_mode != "explicit":
            raise ValueError("--load-model needs --model-control-mode explicit")
