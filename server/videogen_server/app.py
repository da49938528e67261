"""Server lifecycle: explicit start-up, graceful drain, shutdown in `finally`.

    server = VideoGenServer(config)
    await server.start()          # gRPC port open (health NOT_SERVING), models load and warm up
    await server.wait()           # until stop() (e.g. from a SIGTERM handler)

Start-up order: bind the gRPC port and the metrics port first, so that probes and scrapes see a
NOT_SERVING server while models load; health "" turns SERVING once every model is warm, the API's
service names once start-up is done (see transport.server.HealthReporter). Stop order:
health NOT_SERVING, a second of lame duck, then GOAWAY and the gRPC port closed (new calls go to
other servers), in-flight requests finish within the grace period, then the engine frees the
instances.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Optional

from . import __version__
from .config import ServerConfig
from .errors import NotReady
from .engine.engine import Engine
from .metrics import Metrics
from .transport.credentials import CredentialReloader
from .transport.server import build_health_server, build_server, release_unstarted

log = logging.getLogger(__name__)

#: A drain's first seconds: NOT_SERVING, still serving, before the GOAWAY (see `VideoGenServer.stop`). The
#: SDK's health checks take a server out of rotation within milliseconds of its NOT_SERVING.
LAME_DUCK_SECONDS = 1.0
#: How long the drain's last streams have, once it ended them, to take their status (a caller reading
#: slowly included) before grpc cancels them; health watches end then too.
_CLOSE_SECONDS = 1.0


class VideoGenServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.engine = Engine(config, self.metrics)
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self.health_port: Optional[int] = None
        self._server = None
        self._health_server = None
        self._health = None
        self._image_calls = None  # the --max-concurrent-requests bound: its in_flight, for the drain
        self._stopped = asyncio.Event()
        self._stopping = False
        self._hurry = asyncio.Event()  # a second signal: the drain's grace ends now
        self._signals = 0
        self._credentials = CredentialReloader(self.metrics)
        self._reloads: Optional[asyncio.Task] = None

    async def start(self) -> None:
        # the repositories read, every port bound before the gRPC ones serve (a taken port fails here,
        # nothing half started: /metrics, taken last, fails before any call is answered), and health set
        # before either answers: grpc_health starts out reporting "" SERVING
        self.engine.scan()
        self.engine.tracing.start()  # before the server is built: its interceptor opens each call's span
        try:
            self._server, self.port, self._health, self._image_calls = build_server(self.engine, self.config,
                                                                                      self._credentials)
            try:
                if self.config.health_port >= 0:
                    self._health_server, self.health_port = build_health_server(self._health, self.config)
                if self.config.max_concurrent_requests:
                    # its refusals (model "") exported at 0 from the start, as each version's alerted
                    # outcomes are: increase() over a series born at its first refusal reads 0 for it
                    self.metrics.requests.labels("", "", "rejected", "RESOURCE_EXHAUSTED")
                if self.config.metrics_port >= 0:  # (serving at once: only metrics of nothing yet)
                    self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.metrics_host)
            except BaseException:
                try:
                    await release_unstarted([s for s in (self._server, self._health_server) if s is not None],
                                            self._health)
                except Exception:  # (the start's own error is the one to raise)
                    log.exception("releasing the ports of a start that failed")
                self._server = self._health_server = None
                raise
        except BaseException:
            self.engine.tracing.shutdown()  # its exporter thread too: nothing was traced yet
            raise
        try:
            await self._health.update()
            loop = asyncio.get_running_loop()  # readiness may change on any thread; health updates on the loop
            self.engine.add_listener(lambda: loop.call_soon_threadsafe(asyncio.ensure_future, self._health.update()))
            await self._server.start()
            if self._health_server is not None:
                await self._health_server.start()
            if self._credentials and self.config.credentials_reload_seconds > 0:
                self._reloads = asyncio.ensure_future(self._credentials.run(self.config.credentials_reload_seconds))
        except BaseException:  # (/metrics serves already: stop takes it down with the rest)
            await self.stop(0)
            raise
        if self._stopping:  # a signal during the above: stop() has run (or runs) without what follows
            await self._stopped.wait()
            return
        self.metrics.set_build_info(**_versions())
        log.info("gRPC on port %d%s, metrics on %s; loading models", self.port,
                 f" (health also on plaintext port {self.health_port})" if self.health_port else "",
                 f"http://{_url_host(self.config.metrics_host)}:{self.metrics_port}/metrics" if self.metrics_port else "off")
        try:
            await self.engine.start()
        except asyncio.CancelledError:
            # SIGTERM during start-up (a scale-down or an aborted rollout deletes unready pods first):
            # the stop cancelled the loads. That is this start's end, not an error; a cancellation of
            # the caller's own task still propagates.
            task = asyncio.current_task()
            if not self._stopping or (task is not None and task.cancelling()):
                await self.stop(0)
                raise
            log.info("stopped during start-up")
            await self._stopped.wait()
            return
        except BaseException:
            await self.stop(0)
            raise
        failed = self._failed_at_start()
        models = self.engine.list_models()
        if not models and self.config.model_control_mode == "none":
            # nothing to serve, ever (explicit and poll modes load models added later): an empty or
            # unmounted repository, which left a pod up and never ready
            failed = (f"no model in the model repositories ({', '.join(map(str, self.config.model_repositories))}); "
                      f"each model is a folder with a config.pbtxt")
            if not self.config.exit_on_error:
                log.error("%s: nothing will be served", failed)
        if failed and self.config.exit_on_error:
            await self.stop(0)
            raise NotReady(f"exit on error: {failed}")
        await self._health.update()
        log.info("ready: %s", ", ".join(f"{s.name} ({s.state.lower()})" for s in models) or "no models")

    def _failed_at_start(self) -> str:
        """The models and versions that failed to load, with why ("" if none)."""
        def named(what: str, reason: str) -> str:
            return f"{what} ({reason})" if reason else what

        failed = []
        for status in self.engine.list_models():
            versions = [named(f"{status.name} version {v.version}", v.reason)
                        for v in status.versions if v.state == "FAILED"]
            if not versions and status.state == "FAILED":  # no version to blame: its files cannot be read
                versions = [named(status.name, status.reason)]
            failed += versions
        return "; ".join(failed)

    async def stop(self, grace: Optional[float] = None) -> None:
        """Drain: NOT_SERVING, then GOAWAY, let in-flight requests finish within `grace`, then stop.

        Health turns NOT_SERVING on every name, for good: client-side health checks (the SDK's with
        several servers, a proxy's) take this server out of their rotation, and it serves what
        still comes for a short lame duck (`LAME_DUCK_SECONDS`, within the grace). Then the gRPC
        server stops taking calls, as grpc's graceful stop (grpc-go's GracefulStop) does: an HTTP/2
        GOAWAY on every connection and the listener closed. Calls in flight go on; new ones go
        elsewhere: a client's round_robin drops this address (its connection refused, where an open
        port refusing each call kept it in the rotation: 13 of 25 plain-gRPC calls failed in a
        lifecycle audit), and grpc sends a stream the GOAWAY refused again itself. gRPC's core
        cancels a call that had arrived but was not yet handed to the server at that instant (the
        caller reads CANCELLED): the lame duck is what spares health-checking clients that race. The
        engine turns not ready at the start (KServe's readiness, GetModel) but admits what comes,
        the calls gRPC took before the GOAWAY included (a large image still uploading), and hands
        back at once, marked not started, what would not end in time; a client of this server alone
        reads UNAVAILABLE after the GOAWAY (connection refused). The plaintext health port
        (`health_port`, what the probes should read) answers NOT_SERVING to the end; without it,
        probes on this port are refused from the GOAWAY on.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.drain_grace_seconds if grace is None else grace
        closing: Optional[asyncio.Future] = None
        try:
            finish_by = time.monotonic() + grace
            # not ready from here (KServe's readiness and GetModel too; no load), still admitting: the
            # lame duck's calls, then those gRPC took before its GOAWAY (an upload still arriving)
            self.engine.begin_drain(finish_by=finish_by, refuse_new=False)
            if self._health is not None:
                await self._health.servicer.enter_graceful_shutdown()  # every name, for good
            if self._server is not None:
                # serve on, NOT_SERVING, for the lame duck (less on a second signal)
                await self._unless_hurried(asyncio.sleep(max(min(LAME_DUCK_SECONDS, grace), 0.0)))
                # grpc's own grace outlasts the drain's: the drain's end below stops what still runs,
                # with a status saying why, and then shortens it (the most restrictive grace wins)
                closing = asyncio.ensure_future(
                    self._server.stop(max(finish_by - time.monotonic(), 0.0) + _CLOSE_SECONDS))
            if not await self._settled(finish_by):
                ended = self.engine.end_requests(grace, cut_short=self._hurry.is_set())
                # (the image calls open: the requests above, and any whose image was still arriving)
                calls = f", {self._image_calls.in_flight} image calls open" if self._image_calls is not None else ""
                log.warning("drain %s; stopping the %d requests still in flight%s",
                            "cut short by a second signal" if self._hurry.is_set() else f"grace of {grace:.0f}s passed",
                            ended, calls)
            if self._server is not None:
                # the streams ended above take their status within this; health watches end here
                await self._server.stop(_CLOSE_SECONDS)
        finally:
            if closing is not None:
                if not closing.done():  # (a stop that failed above: what still runs ends now)
                    await self._server.stop(None)
                await asyncio.gather(closing, return_exceptions=True)
            if self._reloads is not None:
                self._reloads.cancel()
            if self._health_server is not None:  # the probes' port answers NOT_SERVING until here
                await self._health_server.stop(0)
            await self.engine.shutdown(0)
            # the last requests' spans leave for the collector (bounded: an unreachable one costs seconds)
            await asyncio.get_running_loop().run_in_executor(None, self.engine.tracing.shutdown)
            self.metrics.close()
            log.info("stopped")
            self._stopped.set()

    async def _settled(self, finish_by: float) -> bool:
        """Whether every request has ended by `finish_by`, the calls gRPC took before the GOAWAY whose
        message (an image on a slow link) was still arriving included: an idle engine ended the drain at
        once, and the close's second then cancelled such a call. --max-concurrent-requests counts an
        image call from its start (without it, gRPC reads the message before the server sees the call).
        False at once on a second signal."""
        while True:
            if self._hurry.is_set() or not await self._unless_hurried(
                    self.engine.wait_idle(max(finish_by - time.monotonic(), 0.0))):
                return False
            if self._image_calls is None or self._image_calls.in_flight == 0:
                return True
            if time.monotonic() >= finish_by:  # (an image still arriving, or a call about to be admitted)
                return False
            await self._unless_hurried(asyncio.sleep(0.05))

    async def _unless_hurried(self, awaitable):
        """`awaitable`'s result, or None when a second signal comes first (or with it): it is then
        cancelled (as is everything here when the stop itself is)."""
        task = asyncio.ensure_future(awaitable)
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait((task, hurry), return_when=asyncio.FIRST_COMPLETED)
            if task.done() and not hurry.done():
                return task.result()
            if task.done() and not task.cancelled():
                task.exception()  # (retrieved: a tie's error is not left for asyncio to log)
            return None
        finally:
            hurry.cancel()
            task.cancel()

    @property
    def stopping(self) -> bool:
        """True once a stop (a signal's drain included) has begun."""
        return self._stopping

    async def wait(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: self._on_signal(s))

    def _on_signal(self, sig: signal.Signals) -> None:
        """First: drain (`stop`). Second: the drain's grace ends now. Third: exit at once, as an
        operator pressing Ctrl+C three times means (128 + the signal, the shell's convention)."""
        self._signals += 1
        if self._signals == 1:
            log.info("%s: draining (grace %.0fs; a second signal ends the grace, a third exits at once)",
                     sig.name, self.config.drain_grace_seconds)
            asyncio.ensure_future(self.stop())
        elif self._signals == 2:
            log.warning("%s again: ending the drain now (requests still in flight end UNAVAILABLE)", sig.name)
            self._hurry.set()
        else:
            log.critical("%s a third time: exiting now, without waiting for the drain", sig.name)
            _exit_now(128 + sig)


def _exit_now(status: int) -> None:
    logging.shutdown()
    os._exit(status)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"version": __version__}
    for dist in ("torch", "diffusers", "grpcio"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = ""
    return out


def _url_host(host: str) -> str:
    """A listen address as a URL's host: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
