"""`videogen-server serve | compile-artifacts | make-tiny-model`: the one place where settings come from the
command line."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .config import MODEL_CONTROL_MODES, ServerConfig


def _boolean(text: str) -> bool:
    """true/false (Triton's spelling of its boolean flags; 1/0, yes/no, on/off too)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _parser() -> argparse.ArgumentParser:
    d = ServerConfig(model_repositories=())
    p = argparse.ArgumentParser(prog="videogen-server", description="gRPC model server for Stable Video Diffusion")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the models of one or more repositories")
    s.add_argument("--model-repository", action="append", required=True, type=Path, metavar="DIR",
                   help="a model repository: <DIR>/<model>/config.pbtxt and <model>/<version>/ (repeatable)")
    s.add_argument("--host", default=d.host, help=f"gRPC listen host (default {d.host})")
    s.add_argument("--port", type=int, default=d.port, help=f"gRPC port, 0 = any free port (default {d.port})")
    s.add_argument("--metrics-port", type=int, default=d.metrics_port,
                   help=f"Prometheus /metrics port, 0 = any free port, -1 = off (default {d.metrics_port})")
    s.add_argument("--health-port", type=int, default=d.health_port,
                   help="a plaintext gRPC port serving only grpc.health.v1, for probes that cannot use TLS; "
                        "0 = any free port, -1 = none (default)")
    s.add_argument("--metrics-host", default=d.metrics_host, help=f"metrics listen address (default {d.metrics_host})")
    s.add_argument("--model-control-mode", choices=MODEL_CONTROL_MODES, default=d.model_control_mode,
                   help="none: load all at start; explicit: --load-model and Load/UnloadModel RPCs; poll: reload changed models "
                        "(default %(default)s)")
    s.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="with explicit control: load this model at start ('*' = all); repeatable")
    s.add_argument("--repository-poll-seconds", type=float, default=d.repository_poll_seconds,
                   help="with --model-control-mode poll: seconds between reads of the repositories "
                        "(default %(default)s)")
    s.add_argument("--max-queue-size", type=int, default=d.max_queue_size,
                   help="queue bound for models whose config sets none (default %(default)s)")
    s.add_argument("--cpu-threads", type=int, default=None, help="torch threads for CPU instances (default: torch's)")
    s.add_argument("--media-threads", type=int, default=d.media_threads, help="frame/MP4 encoding threads, shared by all requests "
                                                                             "(default: CPU count, at most 8)")
    s.add_argument("--exit-on-error", action="store_true",
                   help="exit 1 when a model or version fails to load at start-up (default: serve the others)")
    s.add_argument("--strict-readiness", type=_boolean, default=d.strict_readiness, metavar="{true,false}",
                   help="true: ready (health \"\", ServerReady) only while every model is loaded and warm; false: from the end "
                        "of start-up while one model at least is ready, others loading or failed included "
                        "(default %(default)s)")
    s.add_argument("--drain-grace-seconds", type=float, default=d.drain_grace_seconds,
                   help="on SIGTERM, how long in-flight requests may finish (default %(default)s)")
    s.add_argument("--unload-timeout-seconds", type=float, default=d.unload_timeout_seconds,
                   help="how long an unload (or a reload's retiring version) waits for its requests; those "
                        "still running then end UNAVAILABLE, queued ones are handed back not started "
                        "(default %(default)s)")
    s.add_argument("--stream-send-timeout-seconds", type=float, default=d.stream_send_timeout_seconds,
                   help="end a request whose caller takes none of its messages for this long (its frames are "
                        "freed; the caller reads DEADLINE_EXCEEDED); 0 = never (default %(default)s)")
    s.add_argument("--instance-stall-seconds", type=float, default=d.instance_stall_seconds,
                   help="retire an instance whose running batch shows no progress (no denoising step, no decoded "
                        "chunk) for this long: its requests end UNAVAILABLE and it takes no more work; above the "
                        "longest compile of a shape not warmed up; 0 = never (default %(default)s)")
    s.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help="largest request message, image included (default %(default)s)")
    s.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests,
                   help="requests carrying an image (Generate, ModelInfer) in flight at once, queued ones included; "
                        "one more is refused RESOURCE_EXHAUSTED before its message is read; 0 = no limit "
                        "(default %(default)s)")
    s.add_argument("--request-read-timeout-seconds", type=float, default=d.request_read_timeout_seconds,
                   help="end a call limited by --max-concurrent-requests whose request message has not arrived "
                        "this long after it started; 0 = never (default %(default)s)")
    s.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="client connections the gRPC port holds at once; one more is closed at once "
                        "(default: the open-file limit less 256); 0 = no limit")
    s.add_argument("--handshake-timeout-seconds", type=float, default=d.handshake_timeout_seconds,
                   help="close a connection that has not finished its TLS / HTTP/2 handshake in this long "
                        "(default %(default)s)")
    s.add_argument("--max-connection-age-seconds", type=float, default=d.max_connection_age_seconds,
                   help="close connections after this long so clients rebalance over new replicas; 0 = never "
                        "(default %(default)s)")
    s.add_argument("--max-connection-age-grace-seconds", type=float, default=d.max_connection_age_grace_seconds,
                   help="how long streams on an aged connection may still run (default %(default)s)")
    s.add_argument("--keepalive-seconds", type=float, default=d.keepalive_seconds,
                   help="ping a connection after this long without a frame from the client; 0 = off (default %(default)s)")
    s.add_argument("--keepalive-timeout-seconds", type=float, default=d.keepalive_timeout_seconds,
                   help="close a connection whose ping is not answered in this long, cancelling its requests "
                        "(default %(default)s)")
    s.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS (with --tls-key)")
    s.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", type=Path, help="PEM CA: require client certificates it signed (mutual TLS)")
    s.add_argument("--auth-token-file", type=Path,
                   help="file of accepted bearer tokens, one per line (at least one); also VIDEOGEN_AUTH_TOKENS "
                        "(comma-separated)")
    s.add_argument("--model-control-token-file", type=Path,
                   help="file of the bearer tokens model control (LoadModel, UnloadModel, KServe's repository "
                        "load/unload) takes, one per line; others are refused it; also "
                        "VIDEOGEN_MODEL_CONTROL_TOKENS (comma-separated); explicit mode only")
    s.add_argument("--credentials-reload-seconds", type=float, default=d.credentials_reload_seconds,
                   help="seconds between checks of the TLS files and the token files for changes, loaded again "
                        "once changed (no restart for a renewed certificate or rotated tokens); 0 = read once "
                        "(default %(default)s)")
    s.add_argument("--otlp-endpoint", metavar="URL",
                   help="export OpenTelemetry traces of requests over OTLP/gRPC to this collector, e.g. "
                        "http://otel-collector:4317 (https:// for TLS); OTEL_EXPORTER_OTLP_HEADERS adds headers. "
                        "Default: no tracing")
    s.add_argument("--otlp-service-name",
                   help=f"service.name of the traces (default: OTEL_SERVICE_NAME, else {d.otlp_service_name}); "
                        "OTEL_RESOURCE_ATTRIBUTES adds attributes")
    s.add_argument("--trace-sample-ratio", type=float, default=d.trace_sample_ratio,
                   help="share of the traces starting here to keep, 0..1 (default %(default)s); a caller's "
                        "traceparent decides for its own")
    s.add_argument("--log-format", choices=("text", "json"), default=d.log_format,
                   help="json: one JSON object per line on stderr (default %(default)s)")
    s.add_argument("--log-level", default=d.log_level, type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="any case (default %(default)s)")
    s.add_argument("--port-file", type=Path, help="write the bound ports here, \"GRPC METRICS HEALTH\" (0: none), once "
                   "start-up has loaded every model (each ready or failed)")

    c = sub.add_parser("compile-artifacts", help="load and warm up a model as `serve` would, then write what it "
                       "compiled into <model>/<version>/compile_artifacts/ for servers on machines like this one")
    c.add_argument("--model-repository", action="append", required=True, type=Path, metavar="DIR",
                   help="the model repository, as given to serve (repeatable)")
    c.add_argument("--model", action="append", required=True, metavar="NAME",
                   help="the model whose versions to compile (one a run: torch records what a process compiled "
                        "as a whole, so each file would hold every model's graphs)")
    c.add_argument("--output", type=Path, metavar="DIR",
                   help="write to DIR/<model>/<version>/compile_artifacts/ (the repository's layout, to copy into "
                        "it) instead of into the repository")
    c.add_argument("--cpu-threads", type=int, default=None, help="torch threads for CPU instances (default: torch's)")
    c.add_argument("--log-format", choices=("text", "json"), default=d.log_format,
                   help="json: one JSON object per line on stderr (default %(default)s)")
    c.add_argument("--log-level", default=d.log_level, type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="any case (default %(default)s)")

    t = sub.add_parser("make-tiny-model", help="write a model repository holding a tiny random SVD (tests, demo)")
    t.add_argument("repository", type=Path, help="the repository folder (created): NAME/config.pbtxt and the weights in NAME/VERSION/")
    t.add_argument("--name", default="svd-tiny", help="model name (default %(default)s)")
    t.add_argument("--version", type=int, default=1, help="version folder (default %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights (default %(default)s)")
    return p


def compile_artifacts_config(args: argparse.Namespace) -> ServerConfig:
    """The named models only, loaded as `serve` loads them; no port is opened."""
    return ServerConfig(model_repositories=tuple(args.model_repository), model_control_mode="explicit",
                        load_models=tuple(args.model), cpu_threads=args.cpu_threads, metrics_port=-1,
                        log_format=args.log_format, log_level=args.log_level.upper(), write_compile_artifacts=True,
                        compile_artifacts_output=args.output)


async def _compile_artifacts(config: ServerConfig) -> int:
    """Loads and warms up the model's versions (each compiling instance writes its artifacts after its
    warm-up, and fails its load if it cannot); prints the files written. 0 if every version loaded, else 1."""
    from .engine.engine import Engine
    from .engine.repository import check_model_name, versions_on_disk
    from .errors import InvalidRequest
    from .metrics import Metrics

    (name,) = config.load_models
    check_model_name(name)
    if name == "*":
        raise InvalidRequest("--model", "one model a run, by name ('*' would put every model's graphs in each file)")
    engine = Engine(config, Metrics())
    engine.scan()
    before: dict[Path, tuple[int, int, int]] = {}
    if name in engine.models:  # a file is written when its identity changes (atomic replace: a new inode)
        before = {p: _identity(p) for v in versions_on_disk(engine.models[name].path)
                  for p in engine.compile_artifacts_out(name, v).glob("*.bin")}
    try:
        await engine.start()
        status = 0
        model = engine.status(name)
        if model.state == "FAILED" or not model.versions:
            print(f"{name}: failed: {model.reason or 'no version to load'}", file=sys.stderr)
            status = 1
        for v in model.versions:
            if v.state != "READY":
                print(f"{name} version {v.version}: {v.state.lower()}: {v.reason}", file=sys.stderr)
                status = 1
                continue
            folder = engine.compile_artifacts_out(name, v.version)
            written = sorted(p for p in folder.glob("*.bin") if _identity(p) != before.get(p))
            for path in written:
                print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
            if not written:
                print(f"{name} version {v.version}: no compile artifacts written", file=sys.stderr)
                status = 1
        return status
    finally:
        await engine.shutdown(0)


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _auth_tokens(environ: Mapping[str, str], name: str = "VIDEOGEN_AUTH_TOKENS") -> tuple[str, ...]:
    """VIDEOGEN_AUTH_TOKENS, or `name` (the file's tokens are read by the server: again when it changes)."""
    return tuple(t for t in (t.strip() for t in environ.get(name, "").split(",")) if t)


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ServerConfig:
    return ServerConfig(
        model_repositories=tuple(args.model_repository), host=args.host, port=args.port,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host, health_port=args.health_port, model_control_mode=args.model_control_mode,
        load_models=tuple(args.load_model), repository_poll_seconds=args.repository_poll_seconds,
        max_queue_size=args.max_queue_size, cpu_threads=args.cpu_threads, media_threads=args.media_threads,
        drain_grace_seconds=args.drain_grace_seconds, unload_timeout_seconds=args.unload_timeout_seconds,
        stream_send_timeout_seconds=args.stream_send_timeout_seconds,
        instance_stall_seconds=args.instance_stall_seconds,
        max_request_bytes=args.max_request_bytes, max_concurrent_requests=args.max_concurrent_requests,
        request_read_timeout_seconds=args.request_read_timeout_seconds, max_connections=args.max_connections,
        handshake_timeout_seconds=args.handshake_timeout_seconds, max_connection_age_seconds=args.max_connection_age_seconds,
        max_connection_age_grace_seconds=args.max_connection_age_grace_seconds,
        keepalive_seconds=args.keepalive_seconds, keepalive_timeout_seconds=args.keepalive_timeout_seconds,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, auth_tokens=_auth_tokens(environ),
        auth_token_file=args.auth_token_file, credentials_reload_seconds=args.credentials_reload_seconds,
        model_control_tokens=_auth_tokens(environ, "VIDEOGEN_MODEL_CONTROL_TOKENS"),
        model_control_token_file=args.model_control_token_file,
        otlp_endpoint=args.otlp_endpoint,
        otlp_service_name=args.otlp_service_name or environ.get("OTEL_SERVICE_NAME") or ServerConfig.otlp_service_name,
        trace_sample_ratio=args.trace_sample_ratio,
        log_format=args.log_format, log_level=args.log_level.upper(), exit_on_error=args.exit_on_error,
        strict_readiness=args.strict_readiness)


async def _serve(config: ServerConfig, port_file: Optional[Path]) -> None:
    from .app import VideoGenServer

    server = VideoGenServer(config)
    server.install_signal_handlers()
    try:
        await server.start()
        if port_file and not server.stopping:
            tmp = port_file.with_suffix(".tmp")
            tmp.write_text(f"{server.port} {server.metrics_port or 0} {server.health_port or 0}\n")
            tmp.replace(port_file)
        await server.wait()
    finally:
        await server.stop()


#: Import names of the `server` extra's packages (pyproject.toml): the base install is the client only.
SERVER_MODULES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "av",
                  "grpc_health", "grpc_reflection", "prometheus_client", "opentelemetry.sdk",
                  "opentelemetry.exporter.otlp.proto.grpc")


def missing_server_modules() -> list[str]:
    import importlib.util

    def missing(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ModuleNotFoundError:  # a dotted name whose parent package is absent
            return True

    return [name for name in SERVER_MODULES if missing(name)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "compile-artifacts" and len(args.model) > 1:
        parser.error("compile-artifacts: one --model a run (torch records what a process compiled as a whole, so "
                     "each file would hold every model's graphs)")
    missing = missing_server_modules()
    if missing:  # a client-only install has this command too: say what to install, not a traceback
        print(f"videogen-server: error: the server's packages are not installed ({', '.join(missing)} missing): "
              f"pip install 'videogen[server]' (with the CUDA build of torch on a GPU host, see README)",
              file=sys.stderr)
        return 2
    if args.command == "make-tiny-model":
        from .backends.svd.tiny import write_tiny_repository

        path = write_tiny_repository(args.repository, name=args.name, version=args.version, seed=args.seed)
        print(f"wrote {path}")
        return 0
    if args.command == "compile-artifacts":
        from . import logs

        try:
            config = compile_artifacts_config(args)
        except (ValueError, OSError) as err:  # a flag out of its range, as `serve` says it
            print(f"videogen-server: error: {err}", file=sys.stderr)
            return 2
        logs.setup(config.log_format, config.log_level)
        try:
            return _exit(asyncio.run(_compile_artifacts(config)))
        except Exception as err:
            import logging

            from .errors import VideoGenError

            log = logging.getLogger("videogen_server")  # logged, not printed: a JSON log stays JSON
            if not isinstance(err, VideoGenError):
                log.critical("videogen-server compile-artifacts stopped: %r", err, exc_info=err)
                return _exit(1)
            log.critical("videogen-server: %s", err.message)
            return _exit(2)
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as err:
        print(f"videogen-server: error: {err}", file=sys.stderr)
        return 2
    from . import logs

    logs.setup(config.log_format, config.log_level)
    try:
        asyncio.run(_serve(config, args.port_file))
    except KeyboardInterrupt:
        pass
    except Exception as err:
        import logging

        from .errors import PortUnavailable, VideoGenError

        # logged, not printed: a JSON log's last line, the one that says why, stays JSON
        log = logging.getLogger("videogen_server")
        if isinstance(err, VideoGenError):
            log.critical("videogen-server: %s", err.message)
        elif isinstance(err, PortUnavailable):  # an operator's setting, not a bug: no traceback
            log.critical("videogen-server: %s", err)
        else:
            log.critical("videogen-server stopped: %r", err, exc_info=err)
        return _exit(1)
    return _exit(0)


def _exit(status: int) -> int:
    """Leave now if a model's load is still running on its instance thread (a stop during start-up does
    not wait for a compile): letting the interpreter finalize around a thread inside torch's C++ aborts
    the process (SIGABRT, 'terminate called without an active exception')."""
    import threading

    from .engine.instance import INSTANCE_THREAD_PREFIX

    if any(t.is_alive() and t.name.startswith(INSTANCE_THREAD_PREFIX) for t in threading.enumerate()):
        import logging

        logging.getLogger(__name__).info("exiting with an instance thread still busy (a load or compile cut short, or "
                                          "a call that never returned)")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
