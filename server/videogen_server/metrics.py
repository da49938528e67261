"""Prometheus metrics: the engine reports into `Metrics`, prometheus-client serves them.

Base units only (`_seconds`, `_bytes`, `_total`), labels bounded: `model`, `version`, and
`instance`/`device` where it applies; `code` is a gRPC status name. Every metric is documented in
README.md ("Metrics"). Each server owns its registry, so several servers can run in one process.
"""
from __future__ import annotations

import errno
import logging
import os
import platform
import socket
import socketserver
import threading
import wsgiref.simple_server
from typing import Callable, Iterable, Optional

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, Info, PlatformCollector,
                               ProcessCollector, disable_created_metrics, make_wsgi_app)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .errors import PortUnavailable

log = logging.getLogger(__name__)

# Buckets that reach minutes: a full SVD-XT video takes 10-60 s, a cold queue longer. A second apart
# from 5 to 14 s (a compiled H200 video is 11-13 s; the target is 10 s end to end, 9 s to the first
# frame: 5 s apart, a quantile there could be off by 2.5 s), a tenth of a second below 1 s (CPU runs of
# the tiny model, 0.2-0.7 s, fell in one bucket); metrics audit.
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9, 10,
                   11, 12, 13, 14, 16, 18, 20, 25, 30, 40, 50, 60, 90, 120, 180, 300, 600)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# A signed error: how much later (+) or earlier (-) a request ended than it was told
ESTIMATE_ERROR_BUCKETS = (-60, -30, -10, -5, -2, -1, -0.5, -0.2, -0.1, -0.05, 0, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)

ML = ("model", "version")


class Metrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # no `_created` series beside each counter and histogram: the text format exposed them as
        # gauges, twice the series for a scraper that reads it (process-wide in prometheus-client)
        disable_created_metrics()
        # the process's resident memory, file descriptors (--max-connections follows their limit), CPU
        # and start time (a restart), and Python's collector: prometheus-client's standard collectors
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter("videogen_requests_total", "Generate requests by outcome and gRPC status code",
                                ML + ("outcome", "code"), registry=r)
        self.frames = Counter("videogen_frames_generated_total", "Video frames generated (sent as frames or not)",
                              ML, registry=r)
        self.request_latency = Histogram("videogen_request_duration_seconds",
                                         "End-to-end Generate latency, accepted to summary", ML,
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("videogen_queue_wait_seconds", "Time a request waited in the queue", ML,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.first_frame = Histogram("videogen_time_to_first_frame_seconds", "Accepted to first frame sent", ML,
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess = Histogram("videogen_preprocess_seconds",
                                    "Admission's CPU work on an admitted request's image (decode, resize, the "
                                    "backend's preparation), its wait for a preprocessing thread included", ML,
                                    buckets=STEP_BUCKETS, registry=r)
        self.image_encode = Histogram("videogen_image_encode_seconds", "CLIP and VAE encoding of the conditioning image",
                                      ML, buckets=STEP_BUCKETS, registry=r)
        self.denoise_step = Histogram("videogen_denoise_step_seconds",
                                      "One denoising step of a batch, observed once per request in it", ML,
                                      buckets=STEP_BUCKETS, registry=r)
        self.decode_chunk = Histogram("videogen_vae_decode_chunk_seconds", "VAE decode of one chunk of frames", ML,
                                      buckets=STEP_BUCKETS, registry=r)
        self.video_encode = Histogram("videogen_video_encode_seconds", "H.264/MP4 encoding of one video", ML,
                                      buckets=STEP_BUCKETS, registry=r)
        self.estimate_error = Histogram("videogen_estimated_end_error_seconds",
                                        "Seconds a successful request ended after (+) or before (-) the end its "
                                        "Accepted estimated", ML, buckets=ESTIMATE_ERROR_BUCKETS, registry=r)
        self.batch_size = Histogram("videogen_batch_size", "Requests per executed batch", ML,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("videogen_queue_depth", "Requests waiting in the model's queue", ML, registry=r)
        self.queue_capacity = Gauge("videogen_queue_capacity", "Requests the model's queue holds (max_queue_size): "
                                    "one more is refused RESOURCE_EXHAUSTED", ML, registry=r)
        self.inflight = Gauge("videogen_inflight_requests", "Requests admitted and not yet finished", ML, registry=r)
        self.instances_busy = Gauge("videogen_instances_busy", "Instances executing a batch", ML, registry=r)
        self.instance_busy_seconds = Counter(
            "videogen_instance_busy_seconds_total", "Seconds the instance spent executing batches (its rate: the "
            "share of the time it was busy)", ML + ("instance",), registry=r)
        self.load_duration = Gauge("videogen_model_load_duration_seconds", "Time to load the model's instances",
                                   ML, registry=r)
        self.warmup_duration = Gauge("videogen_model_warmup_duration_seconds", "Time spent in warm-up requests "
                                     "(compilation included)", ML, registry=r)
        self.model_ready = Gauge("videogen_model_ready", "1 when the model version serves requests", ML, registry=r)
        self.instances_lost = Gauge("videogen_instances_lost", "Instances of the model version that stopped for good "
                                    "(a lost device, an unexpected error, a stall) and serve nothing until it is reloaded",
                                    ML, registry=r)
        self.instances_stuck = Gauge("videogen_instances_stuck", "Instances retired for a stall whose thread is "
                                     "still in the call that did not return, holding what it holds (device "
                                     "memory): only a restart frees it. Kept across reloads and unloads",
                                     ML, registry=r)
        self.last_peak = Gauge("videogen_request_peak_memory_bytes",
                               "Peak device memory of the instance's last request (process RSS on CPU)",
                               ML + ("instance", "device"), registry=r)
        self.auth_failures = Counter("videogen_auth_failures_total",
                                     "Calls refused UNAUTHENTICATED: no bearer token, or none that matches",
                                     ("method",), registry=r)
        self.credentials_reloads = Counter("videogen_credentials_reloads_total",
                                           "Loads of changed TLS or token files (result ok, or error: the files "
                                           "cannot serve and the previous ones still do)",
                                           ("credentials", "result"), registry=r)
        self.credentials_reload_failing = Gauge("videogen_credentials_reload_failing",
                                                "1 while the TLS or token files on disk changed and cannot be "
                                                "loaded (the server serves the ones it loaded before)",
                                                ("credentials",), registry=r)
        self.tls_certificate_expiry = Gauge("videogen_tls_certificate_expiry_timestamp_seconds",
                                            "End of validity of the certificate the gRPC port serves (--tls-cert), "
                                            "seconds since the epoch", ("credentials",), registry=r)
        self.build = Info("videogen_build", "Build information", registry=r)
        self._http = None

    def set_build_info(self, **fields: str) -> None:
        self.build.info({"python": platform.python_version(), **fields})

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def serve(self, port: int, host: str = "::") -> int:
        """Serve /metrics over HTTP (prometheus_client's app, which answers in the OpenMetrics format
        when asked, exemplars included); returns the bound port (port 0 picks a free one). `::` (or `[::]`)
        listens on every IPv6 and IPv4 address (a dual-stack socket, as gRPC's `[::]`, whatever the
        host's net.ipv6.bindv6only says), falling back to every IPv4 address (0.0.0.0) on a host
        without IPv6."""
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if host == "::":
            try:
                server = _serve_dual_stack(port, make_wsgi_app(self.registry))
            except OSError as err:  # (no IPv6 shows as EAFNOSUPPORT, EADDRNOTAVAIL or a resolver error)
                if err.errno == errno.EADDRINUSE:
                    raise _cannot_bind(f"[::]:{port}", err) from None
                log.info("cannot listen on IPv6 here (%s): /metrics listens on 0.0.0.0", err)
                host = "0.0.0.0"
        if host != "::":
            try:
                server = _serve_at(host, port, make_wsgi_app(self.registry))
            except OSError as err:
                raise _cannot_bind(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", err) from None
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        if self._http:
            self._http.shutdown()  # returns once serve_forever has
            self._http.server_close()
            self._http = None


#: Connections /metrics serves at once; more wait for a slot (Prometheus scrapes one at a time).
MAX_METRICS_CONNECTIONS = 32


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True  # a scrape's thread does not hold the process up
    request_queue_size = 128  # the listen backlog (5 by default: connects stalled behind idle clients)

    def __init__(self, *args, **kwargs) -> None:
        self._slots = threading.BoundedSemaphore(MAX_METRICS_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        # a thread per connection, at most MAX_METRICS_CONNECTIONS at once: 200 idle connections held 200
        # threads for as long as their clients liked (security audit). The next connection waits here for
        # a slot (each is held at most the handler's timeout while its client is silent), not dropped
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        # a client that sent garbage or went away mid-scrape: no traceback on stderr (a JSON log stays JSON)
        log.debug("/metrics: a request from %s failed", client_address, exc_info=True)


class _DualStackWSGIServer(_ThreadingWSGIServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        # IPv4 too, as gRPC's "[::]" does, also where net.ipv6.bindv6only is 1 (its default is IPv6 only)
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    timeout = 10  # seconds a connection may stay silent (a slow or idle client) before it is closed

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # a scrape every few seconds is no news


def _cannot_bind(address: str, err: OSError) -> PortUnavailable:
    """The error of a /metrics address that cannot be bound, naming it (as the gRPC ports' do): it said
    only "[Errno 98] Address already in use"."""
    return PortUnavailable(f"cannot bind the metrics port {address}: {err.strerror or err}")


def _serve_dual_stack(port: int, app) -> wsgiref.simple_server.WSGIServer:
    """/metrics on every IPv6 and IPv4 address, served from a daemon thread."""
    return _started(wsgiref.simple_server.make_server("::", port, app, _DualStackWSGIServer,
                                                      handler_class=_QuietHandler))


def _serve_at(host: str, port: int, app) -> wsgiref.simple_server.WSGIServer:
    """/metrics on `host` (an address or a name, IPv4 or IPv6), served from a daemon thread."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_class = type("_WSGIServer", (_ThreadingWSGIServer,), {"address_family": family})
    return _started(wsgiref.simple_server.make_server(sockaddr[0], port, app, server_class,
                                                      handler_class=_QuietHandler))


def _started(server: wsgiref.simple_server.WSGIServer) -> wsgiref.simple_server.WSGIServer:
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics-http").start()
    return server


class InstanceCollector(Collector):
    """Per-instance memory, compile and run counters, read at scrape time from the live instances."""

    def __init__(self, instances: Callable[[], Iterable[tuple[str, str, str, str, object, Optional[float]]]],
                 nvml: Optional["NvmlReader"] = None) -> None:
        self._instances = instances  # yields (model, version, instance, device, backend, batch started or None)
        self._nvml = nvml

    def collect(self):
        allocated = GaugeMetricFamily("videogen_device_memory_allocated_bytes",
                                      "Device memory held by tensors (process RSS for CPU instances)",
                                      labels=["model", "version", "instance", "device"])
        reserved = GaugeMetricFamily("videogen_device_memory_reserved_bytes",
                                     "Device memory reserved by the caching allocator (process RSS on CPU)",
                                     labels=["model", "version", "instance", "device"])
        # counters (exported as videogen_compiles_total / videogen_recompiles_total): they only grow in an
        # instance's life, and rate()/increase() then treat a new instance's restart at 0 as a reset
        compiles = CounterMetricFamily("videogen_compiles", "Graphs torch.compile built for this instance",
                                       labels=["model", "version", "instance"])
        recompiles = CounterMetricFamily("videogen_recompiles", "Graphs torch.compile built for this instance "
                                         "after its warm-up (requests outside the warmed shape set)",
                                         labels=["model", "version", "instance"])
        fallbacks = CounterMetricFamily("videogen_eager_fallbacks", "Phases of a batch (denoising, VAE decode) "
                                        "this instance ran uncompiled: at a shape its warm-up did not compile, or "
                                        "past torch.compile's recompile limit", labels=["model", "version", "instance"])
        lookups = CounterMetricFamily("videogen_compile_cache_lookups", "Graph-cache lookups of this instance's "
                                      "compiles: hit (found in the compile cache or compile artifacts), miss "
                                      "(compiled from scratch), bypass (not cacheable)",
                                      labels=["model", "version", "instance", "result"])
        splits = CounterMetricFamily("videogen_batches_split", "Batches this instance ran out of device memory in "
                                     "and ran again one request at a time (the steps before were lost): a "
                                     "max_batch_size the device does not hold at that shape",
                                     labels=["model", "version", "instance"])
        started = GaugeMetricFamily("videogen_instance_batch_started_timestamp_seconds",
                                    "When the batch the instance runs now started (seconds since the epoch); "
                                    "absent while it is idle", labels=["model", "version", "instance"])
        for model, version, instance, device, backend, batch_started in self._instances():
            if batch_started is not None:
                started.add_metric([model, version, instance], batch_started)
            try:
                mem = backend.memory_stats()
                comp = backend.compile_stats()
                runs = backend.run_stats()
            except Exception:  # a dead device must not break the scrape
                log.debug("memory stats unavailable for %s/%s#%s", model, version, instance, exc_info=True)
                continue
            if "allocated" in mem:
                allocated.add_metric([model, version, instance, device], mem["allocated"])
            if "reserved" in mem:
                reserved.add_metric([model, version, instance, device], mem["reserved"])
            if "batches_split" in runs:
                splits.add_metric([model, version, instance], runs["batches_split"])
            if comp:
                compiles.add_metric([model, version, instance], comp.get("compiles", 0))
                recompiles.add_metric([model, version, instance], comp.get("recompiles", 0))
                fallbacks.add_metric([model, version, instance], comp.get("eager_fallbacks", 0))
                for result, key in (("hit", "cache_hits"), ("miss", "cache_misses"), ("bypass", "cache_bypasses")):
                    if key in comp:
                        lookups.add_metric([model, version, instance, result], comp[key])
        yield from (allocated, reserved, compiles, recompiles, fallbacks, lookups, splits, started)
        if self._nvml:
            yield from self._nvml.collect()


class NvmlReader:
    """GPU memory used/total through NVML (nvidia-ml-py), when the library and a driver are present,
    labelled by the CUDA device (`cuda:N`, as the instances' series are): `uuids` gives each CUDA
    ordinal's NVML UUID (see engine.devices.cuda_uuids); until it can, that is before a model loaded
    torch, NVML's indices stand for the ordinals only where CUDA_VISIBLE_DEVICES does not renumber them.
    A device NVML cannot read (one fallen off the bus) is left out of the scrape, not the scrape."""

    def __init__(self, uuids: Optional[Callable[[], Optional[list[str]]]] = None) -> None:
        import pynvml  # optional dependency: the `gpu` extra

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._count = pynvml.nvmlDeviceGetCount()
        self._uuids = uuids
        self._devices: Optional[list[tuple[str, object]]] = None  # (label, handle), once mapped by UUID

    @classmethod
    def try_create(cls, uuids: Optional[Callable[[], Optional[list[str]]]] = None) -> Optional["NvmlReader"]:
        try:
            return cls(uuids)
        except Exception:
            return None

    def _handles(self) -> list[tuple[str, object]]:
        if self._devices is not None:
            return self._devices
        try:
            uuids = self._uuids() if self._uuids else None
        except Exception:
            log.debug("CUDA device UUIDs unavailable", exc_info=True)
            uuids = None
        if uuids is not None:
            devices = [(f"cuda:{i}", handle) for i, uuid in enumerate(uuids)
                       if (handle := self._by_uuid(i, uuid)) is not None]
            if len(devices) == len(uuids):  # else asked again at the next scrape
                self._devices = devices
            return devices
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            return []  # NVML's index i is not cuda:i here
        devices = []
        for i in range(self._count):
            try:
                devices.append((f"cuda:{i}", self._nvml.nvmlDeviceGetHandleByIndex(i)))
            except Exception:
                log.debug("NVML device %d unavailable", i, exc_info=True)
        return devices

    def _by_uuid(self, ordinal: int, uuid: str):
        """NVML's handle for a CUDA device: a whole GPU ("GPU-<uuid>"), or a MIG instance ("MIG-<uuid>"),
        whose memory is its own slice's (NVML reads a MIG device's memory); None if NVML knows neither."""
        for name in (uuid, f"GPU-{uuid}", f"MIG-{uuid}"):
            try:
                return self._nvml.nvmlDeviceGetHandleByUUID(name)
            except Exception:
                continue
        log.debug("no NVML device for cuda:%d (%s)", ordinal, uuid)
        return None

    def collect(self):
        used = GaugeMetricFamily("videogen_gpu_memory_used_bytes", "GPU memory used (NVML), all processes",
                                 labels=["device"])
        total = GaugeMetricFamily("videogen_gpu_memory_total_bytes", "GPU memory total (NVML)", labels=["device"])
        for label, handle in self._handles():
            try:
                info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception:  # a lost GPU: the rest of the scrape matters most then
                log.debug("NVML memory of %s unavailable", label, exc_info=True)
                continue
            used.add_metric([label], info.used)
            total.add_metric([label], info.total)
        yield used
        yield total
