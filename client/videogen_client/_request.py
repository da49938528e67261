"""What the sync and async clients share: channel settings, call metadata, request building (private)."""
from __future__ import annotations

import ctypes
import io
import inspect
import ipaddress
import json
import logging
import math
import numbers
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import grpc
from PIL import Image, ImageOps
from videogen.v1 import videogen_pb2

from videogen_client._proto import frame_encoding_value
from videogen_client.auth import TokenSource, check_token
from videogen_client.errors import (
    NOT_STARTED_METADATA_KEY,
    REQUEST_ID_METADATA_KEY,
    RETRY_PUSHBACK_METADATA_KEY,
    DeadlineExceededError,
    InvalidArgumentError,
    ModelNotFoundError,
    UnavailableError,
    VideoGenError,
    response_too_large_for_client,
)
from videogen_client.events import Accepted

log = logging.getLogger(__name__)

#: A conditioning image: encoded bytes (PNG, JPEG or WebP), a path to such a file, or a PIL image.
ImageInput = Union[bytes, str, os.PathLike[str], Image.Image]

#: Channel options as grpc takes them: (name, value) pairs.
ChannelOptions = Sequence[tuple[str, Any]]

#: Where a client connects: one gRPC target string ("HOST:PORT", "dns:///name:port",
#: "ipv4:10.0.0.1:8001,10.0.0.2:8001", ...), "HOST:PORT,HOST:PORT", or a sequence of "HOST:PORT".
Target = Union[str, Sequence[str]]

# Every streamed message carries at most 1 MiB of payload (bigger frames are split, the MP4 comes
# in <= 1 MiB chunks), so 8 MiB leaves ample headroom, also for large ListModels answers, while
# still bounding what a misbehaving server can make the client buffer.
MAX_RECEIVE_MESSAGE_LENGTH = 8 * 1024 * 1024
# The request holds the whole conditioning image, which can be large (a 4K PNG is tens of MiB).
# grpc's client default is unlimited; 64 MiB bounds an accidental huge upload. generate() checks
# the request against this limit itself, so that the mistake is reported as INVALID_ARGUMENT on
# "image" rather than as grpc's RESOURCE_EXHAUSTED (which would read as a full queue).
MAX_SEND_MESSAGE_LENGTH = 64 * 1024 * 1024
# A dead server (its host gone, or the network cut: no FIN, no RST) leaves a call waiting for its
# deadline, forever without one, while the request sits queued or the stream is silent. The client
# pings after KEEPALIVE_S without a frame from the server and ends the calls UNAVAILABLE when no answer
# comes in KEEPALIVE_TIMEOUT_S. grpcio bounds every ping's answer by that timeout, flow control's (BDP)
# included, whose answer waits behind the frames and video still queued toward the client: gRPC's own
# 60 s, as below it a slow link's download was cut. The server refuses pings more often than every 10 s
# (GOAWAY too_many_pings, after strikes); the client's pings arrive a few ms later than that at 10 s,
# so the least allowed here is 15 s.
KEEPALIVE_S = 30.0
KEEPALIVE_TIMEOUT_S = 60.0
MIN_KEEPALIVE_S = 15.0
MAX_KEEPALIVE_S = (2**31 - 1) / 1000  # gRPC takes int milliseconds
#: A retry policy's backoffs (seconds): gRPC's service config takes whole milliseconds up to protobuf's
#: longest Duration
MIN_BACKOFF_S = 1e-3
MAX_BACKOFF_S = 315_576_000_000.0
_INT_MAX = 2**31 - 1  # an integer channel argument's largest value
# The server's rule for request ids (they travel as x-request-id metadata, which is printable ASCII):
# checked here too, since gRPC refuses other metadata before sending, as an INTERNAL "Invalid metadata".
MAX_REQUEST_ID_LEN = 128
# gRPC cannot represent deadlines much beyond this (1e10 s already fails at once): longer is no deadline.
_LONGEST_DEADLINE = 1e9


_RESIZE_MODES = {"stretch": videogen_pb2.RESIZE_MODE_STRETCH, "crop": videogen_pb2.RESIZE_MODE_CROP}

# The gRPC service whose methods the client's retry policy covers.
_SERVICE = "videogen.v1.VideoGen"
_RETRIED_METHODS = ("Generate", "ListModels", "GetModel")  # never Load/UnloadModel (not idempotent)
# Name-resolver schemes grpc understands; a target starting with one is passed to grpc untouched.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:", "google-c2p:")
_STATUS_NAMES = frozenset(code.name for code in grpc.StatusCode)
# The policies that need no configuration of their own (another one goes in the service config option)
_LB_POLICIES = ("round_robin", "pick_first")


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries calls the server refused before doing any work: gRPC's ``retryPolicy``.

    The client puts this into the channel's service config (``grpc.service_config``), so gRPC
    itself retries, with exponential backoff and full jitter: attempt ``n`` waits a random time up
    to ``min(initial_backoff * backoff_multiplier**(n-1), max_backoff)`` seconds. With several
    servers and ``round_robin`` a retry goes to the next server, so a request refused at admission
    (queue full: RESOURCE_EXHAUSTED; server draining or model not ready: UNAVAILABLE) or whose
    connection failed runs on another server instead. The call's deadline covers every attempt.
    A server that says how long to wait (gRPC's ``grpc-retry-pushback-ms`` trailer, which a
    videogen server sends with a full queue: its estimate of when an instance takes queued work
    again) is waited for instead of the backoff, and one whose wait would outlast the call's
    deadline is not retried: the caller hears the refusal at once.

    gRPC retries a call only until it is *committed*: for ``Generate``, a server-streaming call,
    that is when the first response arrives, so a generation that has started streaming is never
    run twice. A failure after that (e.g. the server dies mid-video) reaches the caller. gRPC also
    commits a call when the server sends response headers; a ``Generate`` that fails with a
    retryable status after headers but before any response message was refused before any work
    too, and the client itself sends it again, under the same policy and deadline.

    Attributes:
        max_attempts: attempts in all, first one included, 2..5 (gRPC's cap is 5).
        initial_backoff, max_backoff: seconds, 0.001 (gRPC's millisecond) to 315576000000.
        backoff_multiplier: > 0 (as a 32-bit float: at least ~1.4e-45).
        retryable_status_codes: gRPC status code names (or ``grpc.StatusCode`` members) that are
            retried; default UNAVAILABLE and RESOURCE_EXHAUSTED.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    backoff_multiplier: float = 2.0
    retryable_status_codes: tuple[str, ...] = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")

    def __post_init__(self) -> None:
        # checked here, not left to gRPC: a service config it refuses fails the first call, and as an
        # INVALID_ARGUMENT that reads like the request's fault
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or not 2 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be an integer 2..5 (gRPC's cap), not {self.max_attempts!r}")
        for name in ("initial_backoff", "max_backoff", "backoff_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number, not {value!r}")
            # what gRPC's service config parser takes (grpcio 1.85, measured): a backoff in whole
            # milliseconds (below 1 ms it is 0, refused) up to protobuf's longest Duration; the
            # multiplier as a 32-bit float, which must not round to 0 (below ~1.4e-45)
            if name != "backoff_multiplier" and not MIN_BACKOFF_S <= value <= MAX_BACKOFF_S:
                raise ValueError(f"{name} must be {MIN_BACKOFF_S:g}..{MAX_BACKOFF_S:g} seconds (gRPC's range), "
                                 f"not {value!r}")
            if name == "backoff_multiplier" and ctypes.c_float(value).value == 0:
                raise ValueError(f"backoff_multiplier must be > 0 as a 32-bit float (gRPC's), not {value!r}")
        if isinstance(self.retryable_status_codes, (str, grpc.StatusCode)):
            raise TypeError("retryable_status_codes must be a sequence of status code names")
        codes = tuple(c.name if isinstance(c, grpc.StatusCode) else str(c).upper()
                      for c in self.retryable_status_codes)
        unknown = [c for c in codes if c not in _STATUS_NAMES or c == "OK"]
        if not codes or unknown:
            raise ValueError(f"retryable_status_codes must name gRPC status codes other than OK, "
                             f"not {list(self.retryable_status_codes)!r}")
        object.__setattr__(self, "retryable_status_codes", codes)

    def service_config_policy(self) -> dict[str, Any]:
        """The ``retryPolicy`` object of a gRPC service config."""
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": _duration(self.initial_backoff),
            "maxBackoff": _duration(self.max_backoff),
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.retryable_status_codes),
        }

    def retries(self, code: grpc.StatusCode | None) -> bool:
        """Whether ``code`` is one of the retryable status codes."""
        return code is not None and code.name in self.retryable_status_codes

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` >= 1), with full jitter as gRPC does."""
        try:
            ceiling = self.initial_backoff * self.backoff_multiplier ** (attempt - 1)
        except OverflowError:  # (a multiplier gRPC takes, 1e300, squared)
            ceiling = math.inf
        return random.uniform(0, min(ceiling, self.max_backoff))


def deadline_seconds(timeout: float | None, name: str = "timeout") -> float | None:
    """A call's gRPC deadline in seconds as grpc takes it: ``None``, infinity or more than ~31 years
    mean no deadline; NaN, zero and negative values are refused (ValueError naming ``name``)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(timeout).__name__}")
    timeout = float(timeout)  # numpy scalars included
    if math.isnan(timeout) or timeout <= 0:
        raise ValueError(f"{name} must be > 0 seconds (or None for no deadline), not {timeout}")
    return None if timeout > _LONGEST_DEADLINE else timeout


def _duration(seconds: float) -> str:
    """A protobuf JSON Duration: "0.1s"."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(load_balancing: str, retry: RetryPolicy | None, health_check: bool = False) -> str:
    """The JSON service config of a client channel: load balancing, client-side health checking
    (honoured by ``round_robin``, not by ``pick_first``) and the retry policy."""
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if health_check:
        config["healthCheckConfig"] = {"serviceName": _SERVICE}
    if retry is not None:
        config["methodConfig"] = [{
            "name": [{"service": _SERVICE, "method": method} for method in _RETRIED_METHODS],
            "retryPolicy": retry.service_config_policy(),
        }]
    return json.dumps(config, separators=(",", ":"))


def _host_port(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; ValueError otherwise."""
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {address!r} is not HOST:PORT")
    return host, int(port)


class UnresolvedHost(ValueError):
    """A target's host name did not resolve (a ValueError, as the constructor's other refusals of a
    target; the CLI tells it apart: the resolver may answer later, unlike a malformed target)."""


def _addresses(host: str, port: int) -> tuple[list[str], list[str]]:
    """(IPv4, IPv6) addresses of ``host``: the literal itself, else its name resolved now."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        return ([str(literal)], []) if literal.version == 4 else ([], [str(literal)])
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UnresolvedHost(f"cannot resolve target host {host!r}: {err}") from None
    v4 = list(dict.fromkeys(str(info[4][0]) for info in infos if info[0] == socket.AF_INET))
    v6 = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos if info[0] == socket.AF_INET6))
    return v4, v6


def channel_target(target: Target) -> str:
    """The gRPC target string for ``target``.

    One target (a string without commas, or one that starts with a resolver scheme such as
    ``dns:``, ``ipv4:`` or ``unix:``) is used as it is. Several ``HOST:PORT`` (a sequence, or a
    comma-separated string) become one ``ipv4:`` (or ``ipv6:``) address list: IP literals as
    given, host names resolved once, now (use ``dns:///name:port`` for a name whose addresses
    change). IPv4 is used when every target has an IPv4 address, else IPv6 when every target has
    one.
    """
    if isinstance(target, str):
        text = _passed_through(target)
        if text is not None:
            if not text:
                raise ValueError("target must be HOST:PORT (or any gRPC target string)")
            return text
        parts = target.strip().split(",")
    else:
        parts = list(target)
        if not all(isinstance(part, str) for part in parts):
            raise TypeError("target must be a string or a sequence of 'HOST:PORT' strings")
    parts = [part.strip() for part in parts]
    if not parts or not all(parts):
        raise ValueError(f"target must be HOST:PORT, or several of them, not {target!r}")
    if len(parts) == 1:
        return channel_target(parts[0])
    for part in parts:
        if part.lower().startswith(_SCHEMES) or "," in part:
            raise ValueError(f"target {part!r}: a target with a scheme must be the only target; "
                             "give several targets as 'HOST:PORT' each")
    resolved = [(port, *_addresses(host, port)) for host, port in map(_host_port, parts)]
    if all(v4 for _, v4, _ in resolved):
        return "ipv4:" + ",".join(dict.fromkeys(f"{a}:{port}" for port, v4, _ in resolved for a in v4))
    if all(v6 for _, _, v6 in resolved):
        return "ipv6:" + ",".join(dict.fromkeys(f"[{a}]:{port}" for port, _, v6 in resolved for a in v6))
    raise ValueError(f"targets {parts!r} do not share an address family (all IPv4 or all IPv6)")


def _parts(target: Target) -> list[str]:
    """The HOST:PORT entries of a several-server target (see channel_target)."""
    return [part.strip() for part in (target.split(",") if isinstance(target, str) else target)]


def _passed_through(target: Target) -> str | None:
    """The target string when channel_target uses it as it is, else None."""
    if isinstance(target, str):
        text = target.strip()
        if "," not in text or text.lower().startswith(_SCHEMES):
            return text
    return None


def several_servers(grpc_target: str) -> bool:
    """Whether a gRPC target names (or may name) several servers: an ``ipv4:``/``ipv6:`` list of
    more than one address, or a ``dns:`` name (whose name may have several addresses)."""
    lowered = grpc_target.lower()
    return lowered.startswith("dns:") or (lowered.startswith(("ipv4:", "ipv6:")) and "," in lowered)


@dataclass(frozen=True)
class ConnectionSettings:
    """How a client connects: the target, channel options and credentials, and metadata for every call."""

    target: str  # the gRPC target string the channel uses
    options: list[tuple[str, Any]]
    credentials: grpc.ChannelCredentials | None  # None = plaintext
    metadata: tuple[tuple[str, str], ...]
    max_send_message_length: int  # -1 = unlimited
    retry: RetryPolicy | None  # None = no retries
    token: Callable[[], str] | None = None  # asked before each call (a token that changes: TokenFile)


def connection_settings(target: Target, *, secure: bool, root_certificates: bytes | None,
                        private_key: bytes | None, certificate_chain: bytes | None,
                        token: TokenSource | None, options: ChannelOptions | None,
                        retry: bool | RetryPolicy = True, load_balancing: str = "round_robin",
                        health_check: bool | None = None,
                        keepalive: float | None = KEEPALIVE_S) -> ConnectionSettings:
    """Validate the client constructor's arguments and turn them into :class:`ConnectionSettings`."""
    grpc_target = channel_target(target)
    token_source = None
    if callable(token):
        if inspect.iscoroutinefunction(token) or inspect.iscoroutinefunction(getattr(token, "__call__", None)):
            # (asked on the call's path, the async client's included, and never awaited: every call failed)
            raise TypeError("token: a callable returning the token, not a coroutine function; it is asked before "
                            "each call (on the event loop, for AsyncVideoGenClient: keep it quick)")
        token_source, token = token, None
    elif token is not None and token.strip():
        token = check_token(token)
    else:  # "" (an empty VIDEOGEN_TOKEN, an unset CI secret): no token, as before TokenFile
        token = None
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain must be given together (mTLS)")
    if not secure and (root_certificates or private_key or certificate_chain):
        raise ValueError("root_certificates, private_key and certificate_chain need secure=True")
    if load_balancing not in _LB_POLICIES:
        raise ValueError(f"load_balancing must be one of {list(_LB_POLICIES)}, not {load_balancing!r} (for another "
                         f"policy, give options=[('grpc.service_config', ...)])")
    if keepalive is not None and (isinstance(keepalive, bool) or not isinstance(keepalive, (int, float))
                                  or not (keepalive == 0 or MIN_KEEPALIVE_S <= keepalive <= MAX_KEEPALIVE_S)):
        raise ValueError(f"keepalive must be None or 0 (off), or seconds from {MIN_KEEPALIVE_S:g} (the server closes "
                         f"connections that ping more often than every 10 s: GOAWAY too_many_pings), not {keepalive!r}")
    if isinstance(retry, RetryPolicy):
        policy: RetryPolicy | None = retry
    elif isinstance(retry, bool):
        policy = RetryPolicy() if retry else None
    else:
        raise TypeError(f"retry must be True, False or a RetryPolicy, not {type(retry).__name__}")
    merged: dict[str, Any] = {
        "grpc.max_receive_message_length": MAX_RECEIVE_MESSAGE_LENGTH,
        "grpc.max_send_message_length": MAX_SEND_MESSAGE_LENGTH,
        "grpc.service_config": service_config(
            load_balancing, policy, several_servers(grpc_target) if health_check is None else bool(health_check)),
        # Ours, not one a DNS TXT record might carry.
        "grpc.service_config_disable_resolution": 1,
        "grpc.enable_retries": 1 if policy is not None else 0,
    }
    if keepalive:
        # pings only while calls are open (keepalive_permit_without_calls stays 0; with several servers the
        # health-check stream is one, always open), and on through a silent stream (max_pings_without_data
        # 0: the default 2 would stop them while a request is queued and the client sends nothing);
        # grpcio waits for the answer up to the ping timeout, keepalive_timeout_ms alone does not shorten it
        timeout_ms = int(KEEPALIVE_TIMEOUT_S * 1000)
        merged.update({"grpc.keepalive_time_ms": int(keepalive * 1000), "grpc.keepalive_timeout_ms": timeout_ms,
                       "grpc.http2.ping_timeout_ms": timeout_ms, "grpc.http2.max_pings_without_data": 0})
    if (secure and _passed_through(target) is None and len(_parts(target)) > 1
            and "grpc.ssl_target_name_override" not in dict(options or ())):
        # several HOST:PORT resolved to an address list: TLS would check the certificate against an
        # address; check it against the host name the caller gave instead
        # (an address list's authority is the whole list, which no certificate names)
        hosts = {_host_port(part)[0] for part in _parts(target)}
        if len(hosts) > 1:
            raise ValueError(f"with TLS, several servers must share one host name, which their certificate "
                             f"names (they have {sorted(hosts)}): use 'dns:///NAME:PORT', or give "
                             f"options=[('grpc.ssl_target_name_override', NAME)] with a name the certificates hold")
        merged["grpc.ssl_target_name_override"] = next(iter(hosts))
    merged.update(options or ())
    max_send = int(merged["grpc.max_send_message_length"])
    # gRPC keeps a call's sent messages for retries only up to this size (default 256 KiB) and
    # commits the call beyond it: the request carries the image, so allow the largest request.
    # (a C int: the largest limit a caller may give, 2**31 - 1, plus the margin overflowed it)
    merged.setdefault("grpc.per_rpc_retry_buffer_size",
                      min((max_send if max_send >= 0 else MAX_SEND_MESSAGE_LENGTH) + 4096, _INT_MAX))
    credentials = (grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=private_key,
                                                certificate_chain=certificate_chain) if secure else None)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return ConnectionSettings(
        target=grpc_target, options=list(merged.items()), credentials=credentials, metadata=metadata,
        max_send_message_length=max_send, retry=policy, token=token_source)


def _retryable(err: grpc.RpcError, settings: ConnectionSettings) -> bool:
    code_fn = getattr(err, "code", None)
    return settings.retry is not None and callable(code_fn) and settings.retry.retries(code_fn())


def _call_metadata(err: grpc.RpcError, which: str) -> Any:
    """The failed call's ``initial_metadata`` or ``trailing_metadata`` (None if it has none to give)."""
    fn = getattr(err, which, None)
    try:
        return fn() if callable(fn) else None
    except Exception:  # pragma: no cover - a call object without metadata to give
        return None


def refused_before_work(err: grpc.RpcError, settings: ConnectionSettings, *, received: bool) -> bool:
    """Whether a failed Generate call may be sent again by the client itself (see the clients' ``_stream``).

    True when retries are on, no response message arrived, the status is retryable, and the
    server had sent response headers first: gRPC commits a call once headers arrive, so it did not
    retry this one itself (a refusal without headers, a "trailers-only" response, was already
    retried by gRPC under the same policy).
    """
    if received or response_too_large_for_client(err) or not _retryable(err, settings):
        return False
    return bool(_call_metadata(err, "initial_metadata"))


def not_started(err: grpc.RpcError, settings: ConnectionSettings) -> bool:
    """Whether the server ended an accepted Generate before any work on it, marked so (its version went
    away: the drain's end, an unload, lost instances; or it would have, before the request could end)
    and with a status the retry policy retries."""
    if not _retryable(err, settings):
        return False
    return any(key == NOT_STARTED_METADATA_KEY for key, _ in _call_metadata(err, "trailing_metadata") or ())


def server_pushback(err: grpc.RpcError) -> float | None:
    """The wait the server asked for before another attempt, as gRPC's retries read it (the
    ``grpc-retry-pushback-ms`` trailer, gRFC A6): seconds, negative for "do not retry", None when the
    server gave none. An unreadable value counts as "do not retry"."""
    for key, value in _call_metadata(err, "trailing_metadata") or ():
        if key == RETRY_PUSHBACK_METADATA_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            return int(text) / 1000 if text.isdigit() else -1.0
    return None


def retry_wait(err: grpc.RpcError, settings: ConnectionSettings, attempt: int, deadline: float | None, *,
               received: bool, started: bool = False) -> float | None:
    """Seconds to wait before the client sends a refused Generate again; ``None``: do not.

    ``received``: a response arrived; ``started``: one beyond Accepted did (a step, a frame). An
    accepted request the server ended marked "not started" (see ``not_started``) is sent again too:
    nothing was done for it, and no event but Accepted reached the caller. The wait is the server's
    pushback where it sent one (see ``server_pushback``), else the policy's backoff; None when it would
    end past ``deadline``.
    """
    policy = settings.retry
    if policy is None or attempt >= policy.max_attempts:
        return None
    if not (refused_before_work(err, settings, received=received) or (not started and not_started(err, settings))):
        return None
    wait = server_pushback(err)
    if wait is None:
        wait = policy.backoff(attempt)
    elif wait < 0:  # the server said not to
        return None
    if deadline is not None and time.monotonic() + wait >= deadline:
        return None
    return min(wait, threading.TIMEOUT_MAX)  # (a wait of centuries, with no deadline: Event.wait's bound)


def call_metadata(settings: ConnectionSettings, request_id: str | None,
                  trace: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """The metadata of one call: the client's (authorization: a token source asked now), the caller's
    trace context (see `trace_metadata`), plus x-request-id when given."""
    own = settings.metadata
    if settings.token is not None:
        own = (*own, ("authorization", f"Bearer {check_token(settings.token())}"))
    if request_id:
        return (*own, *trace, (REQUEST_ID_METADATA_KEY, request_id))
    return (*own, *trace)


_TRACING_OFF = False  # set once OpenTelemetry turned out to be absent or unusable: no more attempts
_INJECT_FAILED = False  # a propagator failed once (logged once)
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The caller's trace context as call metadata: when OpenTelemetry is installed (it is optional)
    and a span is current, what its configured propagators write (W3C ``traceparent``/``tracestate`` by
    default), so the server's spans join the caller's trace. Taken when a call is made; a resent
    Generate keeps the first attempt's. Never fails a call: an OpenTelemetry that cannot be used (say
    ``OTEL_PROPAGATORS`` names a propagator that is not installed) is logged once and left out."""
    global _TRACING_OFF, _INJECT_FAILED
    if _TRACING_OFF:
        return ()
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        _TRACING_OFF = True
        return ()
    except Exception as err:  # e.g. OTEL_PROPAGATORS naming one that is not installed: raised at import
        _TRACING_OFF = True
        log.warning("videogen_client: OpenTelemetry cannot be used (%s); calls carry no trace context", err)
        return ()
    if not trace.get_current_span().get_span_context().is_valid:
        return ()
    carrier: dict[str, str] = {}
    try:
        propagate.inject(carrier)
    except Exception as err:  # a propagator's own failure is not the call's
        if not _INJECT_FAILED:
            _INJECT_FAILED = True
            log.warning("videogen_client: the OpenTelemetry propagator failed (%r); calls it fails for carry no "
                        "trace context", err)
        return ()
    # gRPC sends lower-case ASCII keys and printable ASCII values only (it refuses the call otherwise)
    return tuple((k.lower(), v) for k, v in carrier.items()
                 if isinstance(k, str) and _METADATA_KEY.fullmatch(k.lower()) and not k.lower().endswith("-bin")
                 and isinstance(v, str) and v.isascii() and v.isprintable())


def image_bytes(image: ImageInput) -> bytes:
    """The encoded bytes of ``image``: bytes as they are, a file's contents, a PIL image as PNG.

    A PIL image is sent as the server would read the file it came from: upright (its EXIF orientation
    applied, as the server applies it to a file's bytes; PNG keeps no EXIF), and in RGB when PNG cannot
    hold its mode (CMYK, YCbCr, LAB, HSV, float), converted as the server converts such a file.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if isinstance(image, Image.Image):
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # noqa: BLE001 - unreadable EXIF: the pixels as stored, as the server does
            pass
        buffer = io.BytesIO()
        try:
            image.save(buffer, format="PNG")
        except (OSError, ValueError, KeyError):  # "cannot write mode CMYK as PNG"
            buffer = io.BytesIO()
            # integer samples (I, I;16L, I;16N) as 16-bit, clipped, which the server reads as a 16-bit PNG;
            # premultiplied gray as gray + alpha; the rest (CMYK, YCbCr, LAB, HSV, F, PA, RGBa) as RGB
            if image.mode.startswith("I"):  # through 32-bit: Pillow's direct I;16L -> I;16 clips at 255
                image = image.convert("I").convert("I;16")
            else:
                image = image.convert("LA" if image.mode == "La" else "RGB")
            image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"image must be bytes, a path or a PIL.Image.Image, not {type(image).__name__}")


def build_generate_request(
    image: ImageInput, *, model: str, model_version: int | None, width: int | None, height: int | None,
    num_frames: int | None, num_inference_steps: int | None, fps: int | None, motion_bucket_id: int | None,
    noise_aug_strength: float | None, min_guidance_scale: float | None, max_guidance_scale: float | None,
    seed: int | None, decode_chunk_size: int | None, frame_encoding: str, jpeg_quality: int | None,
    resize_mode: str | None = None,
    stream_video: bool, video_fps: int | None, request_id: str | None, priority: int,
    queue_timeout: float | None, max_send_message_length: int,
) -> videogen_pb2.GenerateRequest:
    """The GenerateRequest for ``generate``'s arguments; optional fields are set only when given."""
    if not model:
        raise ValueError("model is required, e.g. model='svd-xt'")
    if queue_timeout is not None and not (isinstance(queue_timeout, numbers.Real) and 0 < queue_timeout < math.inf):
        raise ValueError(f"queue_timeout must be a finite number of seconds > 0 (or None for the model's), "
                         f"not {queue_timeout}")
    if request_id and (len(request_id) > MAX_REQUEST_ID_LEN
                       or not (request_id.isascii() and request_id.isprintable())):
        raise InvalidArgumentError(f"request_id: at most {MAX_REQUEST_ID_LEN} printable ASCII characters")
    request = videogen_pb2.GenerateRequest(model=model, image=image_bytes(image))
    request.output.frame_encoding = frame_encoding_value(frame_encoding)
    if resize_mode is not None:
        if resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(_RESIZE_MODES)}, not {resize_mode!r}")
        request.resize_mode = _RESIZE_MODES[resize_mode]
    fields: dict[str, Any] = {
        # Optional fields: set only when given, since an unset field means "the model's default".
        "model_version": model_version, "width": width, "height": height, "num_frames": num_frames,
        "num_inference_steps": num_inference_steps, "fps": fps, "motion_bucket_id": motion_bucket_id,
        "noise_aug_strength": noise_aug_strength, "min_guidance_scale": min_guidance_scale,
        "max_guidance_scale": max_guidance_scale, "seed": seed, "decode_chunk_size": decode_chunk_size,
        "output.jpeg_quality": jpeg_quality, "output.video_fps": video_fps,
        # Plain fields.
        "output.stream_video": stream_video, "request_id": request_id or "", "priority": priority,
        # a queue timeout only shortens the model's: one beyond the field's range is the model's anyway
        "timeout_microseconds": 0 if queue_timeout is None else min(max(1, round(queue_timeout * 1_000_000)),
                                                                    2**64 - 1),
    }
    for path, value in fields.items():
        if value is None:
            continue
        *parents, name = path.split(".")
        target: Any = request
        for parent in parents:
            target = getattr(target, parent)
        try:
            setattr(target, name, value)
        except (TypeError, ValueError) as err:  # out of the field's range, or of the wrong type
            raise type(err)(f"{path}: {err}") from None
    size = request.ByteSize()
    if 0 <= max_send_message_length < size:
        raise InvalidArgumentError(
            f"image: the request is {size} bytes, over this client's max_send_message_length of "
            f"{max_send_message_length} bytes (raise it with options=[('grpc.max_send_message_length', N)])",
            request_id=request_id)
    return request


class ReadinessWait:
    """The bookkeeping of ``wait_until_ready``, shared by both clients: a deadline, the last answer, and
    which answers mean "not yet" (no server yet, the model loading, the repository not scanned yet)
    rather than an error to raise now. The calls wait for a connection (gRPC's wait-for-ready), which
    says nothing of why none came; so when the wait ends with no answer at all, one last call that does
    not wait (``call``) asks gRPC why (connection refused, a TLS handshake, a name not resolved)."""

    FINAL_CALL_S = 2.0
    #: Over several servers, answers in a row that a failed load (or a model the server does not know)
    #: ends the wait on: a single one may come from the one server of several that lacks the model.
    FINAL_AFTER = 16

    def __init__(self, model: str, timeout: float | None, poll_interval: float, several: bool = False) -> None:
        if not model:
            raise ValueError("model is required, e.g. model='svd-xt'")
        limit = deadline_seconds(timeout)
        if isinstance(poll_interval, bool) or not isinstance(poll_interval, numbers.Real) \
                or not 0 < poll_interval < math.inf:
            raise ValueError(f"poll_interval must be a finite number of seconds > 0, not {poll_interval}")
        self.model, self.timeout, self.poll_interval = model, timeout, float(poll_interval)
        self._end = math.inf if limit is None else time.monotonic() + limit
        self.last = "no answer from the server"
        self.answered = False  # some answer came (the model's state, or a refusal)
        self.final = False  # the wait is over with no answer: the last call, without wait-for-ready
        # several servers: each poll reaches one of them, and a model that failed on that one (or that it
        # does not know, during a rollout) may serve on the next: only FINAL_AFTER such answers in a row
        # end the wait
        self.several = several
        self._refusals_in_row = 0

    def call(self) -> tuple[float | None, bool]:
        """The next GetModel call's deadline (None: none) and whether it waits for a connection."""
        return (self.FINAL_CALL_S, False) if self.final else (self.remaining(), True)

    def remaining(self) -> float | None:
        """What is left of the wait (None: no deadline)."""
        return None if self._end == math.inf else max(0.001, self._end - time.monotonic())

    def ready(self, info: Any) -> bool:
        """True once ``info`` (a ModelInfo) has a ready version; raises if its latest version failed."""
        self.answered = True
        if any(v.state == "ready" for v in info.versions):
            return True
        if info.state == "failed":
            reason = next((v.reason for v in info.versions if v.state == "failed" and v.reason), "") or info.reason
            failed = f"model {self.model!r} failed to load" + (f": {reason}" if reason else "")
            if self._final_refusal():
                raise UnavailableError(failed)
            self.last = failed + " (on the server the last poll reached)"
            return False
        self._refusals_in_row = 0
        self.last = f"model {self.model!r} is {info.state}"
        return False

    def _final_refusal(self) -> bool:
        """Whether a refusal that waiting will not cure on that server ends the wait now."""
        self._refusals_in_row += 1
        return not self.several or self._refusals_in_row >= self.FINAL_AFTER

    def not_yet(self, error: VideoGenError) -> None:
        """Record a refusal that waiting may cure (no server yet, the model loading), or raise ``error``
        (NOT_FOUND included: the server reads its repositories before its port answers; over several
        servers, once FINAL_AFTER answers in a row were NOT_FOUND or a failed load)."""
        if isinstance(error, ModelNotFoundError) and not self._final_refusal():
            self.answered = True
            self.last = error.details + " (on the server the last poll reached)"
            return
        if not isinstance(error, (UnavailableError, DeadlineExceededError)):
            raise error
        if self.final:
            self.last = f"no answer from the server: {error.details}"
        elif isinstance(error, DeadlineExceededError):  # gRPC's own: the call waited for a connection
            self.last = "no answer from the server"
        else:  # the server's refusal, or its health (client-side health checking) saying it takes no calls
            self.answered = True
            self.last = error.details

    def pause(self) -> float:
        """Seconds to sleep before asking again; DeadlineExceededError once the wait is over (after one
        last call, at once, when nothing ever answered)."""
        left = self._end - time.monotonic()
        if left <= 0:
            if not self.answered and not self.final:
                self.final = True
                return 0.0
            raise DeadlineExceededError(f"model {self.model!r} not ready after {self.timeout} s ({self.last})")
        return min(self.poll_interval, left)


class StreamAttempts:
    """One Generate's attempts, as the caller sees them: one Accepted event however often the request is
    sent again (another only if the server that runs it resolved the request otherwise, e.g. another
    model version during a rollout, or estimated when it starts and ends: the first server's estimate no
    longer holds), and whether the current attempt got beyond it (a step, a frame: work that started)."""

    def __init__(self) -> None:
        self.first: Accepted | None = None
        self.last: Accepted | None = None  # the last given to the caller
        self.started = False
        self.accepted_at: float | None = None  # time.monotonic() of the first Accepted
        self._queue_timeout_us: int | None = None  # the request's own queue timeout (0: the model's)

    def next_attempt(self) -> None:
        self.started = False

    def passes(self, event: Any) -> bool:
        """Whether to give ``event`` (a decoded event or None) to the caller."""
        if event is None:
            return False
        if isinstance(event, Accepted):
            if self.first is None:
                self.first = self.last = event
                self.accepted_at = time.monotonic()
                return True
            last = self.last
            assert last is not None
            news = (event.model_version, event.parameters) != (last.model_version, last.parameters) or (
                event.estimated_end_seconds is not None)
            if news:
                self.last = event
            return news
        self.started = True
        return True

    def again(self, request: videogen_pb2.GenerateRequest, after: float = 0.0) -> videogen_pb2.GenerateRequest | None:
        """The request to send again ``after`` seconds from now (the retry's wait): with the seed the
        first server drew when the caller set none, so the video is the one its Accepted event
        described, and with what will be left then of the caller's queue timeout since the request was
        first accepted (a request handed back unstarted waited in a queue meanwhile: each server
        counting the whole timeout afresh would let it wait several times as long). None when nothing
        will be left: not to be sent again (see ``queue_timeout_passed``)."""
        if self._queue_timeout_us is None:
            self._queue_timeout_us = request.timeout_microseconds
        seed = self.first.parameters.get("seed") if self.first is not None else None
        pin = not request.HasField("seed") and seed is not None
        left_us = self._queue_timeout_us
        if left_us and self.accepted_at is not None:
            left_us -= round((time.monotonic() + after - self.accepted_at) * 1_000_000)
            if left_us <= 0:
                return None
        if not pin and left_us == request.timeout_microseconds:
            return request
        again = videogen_pb2.GenerateRequest()
        again.CopyFrom(request)
        if pin:
            again.seed = int(seed)
        again.timeout_microseconds = left_us
        return again

    def queue_timeout_passed(self, request_id: str | None) -> DeadlineExceededError:
        """The error for a request whose queue timeout ran out between servers (``again`` gave None): what
        one server would have said had the request waited there as long."""
        error = DeadlineExceededError(f"the request's queue timeout ({self._queue_timeout_us / 1e6:g} s) would pass "
                                      f"before it reached another server (it was handed back unstarted)",
                                      request_id=request_id)
        error.error_reason = "QUEUE_TIMEOUT"
        return error
