"""Load generator: N concurrent streaming clients send M Generate requests to local videogen servers.

Usage:
    python bench/loadgen.py --target 127.0.0.1:8001 --model svd-tiny --clients 8 --requests 40 \\
        [--metrics http://127.0.0.1:8002/metrics] [--pid PID] [--json out.json]
    python bench/loadgen.py --target 127.0.0.1:8001,127.0.0.1:8011 --model svd-xt --clients 4 --requests 8 \\
        --steps 25 --num-frames 25 --width 1024 --height 576 --timeout 900 --duration 1800

Each client is its own ``AsyncVideoGenClient`` (its own connection; several ``--target`` s are
spread with round_robin) on one asyncio loop; clients take requests from a shared count until
``--requests`` were sent or the overall deadline (``--duration``) passed, so the run always stops
by itself: every request has a gRPC deadline (``--timeout``, capped at what is left of the run),
and a stream that outlives it by 10 s is abandoned and counted as ``HANG``. Retries are off unless
``--retry`` (the point is to see what the server refuses).

Reported: queue wait (the Summary's ``queue_seconds``), time to first frame (client side: call
start to the first Frame, or first VideoChunk without frames), end-to-end latency (client side:
call start to the end of the stream) as p50/p90/p99/max, throughput (completed videos per second
of wall time), errors by gRPC status code name, how far each completed request's end (client side:
Accepted to Summary) was from Accepted's ``estimated_end_seconds`` (where the server gave one; signed,
later is positive, and absolute), and server memory before and after the run: the
sum of ``videogen_device_memory_allocated_bytes`` over ``--metrics`` endpoints (instances that
share a device report that device's per-process figure, so each device counts once; on CPU it is
the process RSS), else the RSS of ``--pid`` processes. After the run it waits up to 5 s for the
servers' ``videogen_inflight_requests`` and ``videogen_queue_depth`` to return to 0 and reports them.

Closed loop: each client sends its next request when its previous one has ended, so a slower server
is offered less load, and the latencies are those of ``--clients`` callers waiting on each other, not
of requests arriving at a fixed rate (there is no rate mode: no coordinated-omission correction is
needed or made). Raise ``--clients`` to load the servers harder.

Only loopback is loaded: targets and metrics URLs whose host is not in 127.0.0.0/8, ::1 or
``localhost`` are refused (exit status 2, with the reason). Exit status 0 when every sent request
completed or was refused with RESOURCE_EXHAUSTED (queue full) and the servers could still be read
after the run (``--metrics``, ``--pid``), else 1; the table and ``--json`` are written either way.

Importable: ``run_load(targets, model=..., clients=..., requests=..., request_kwargs=..., timeout=...)``
returns the same dict that ``--json`` writes; ``format_table(result)`` renders it.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import ipaddress
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from videogen_client import Accepted, AsyncVideoGenClient, Frame, Summary, VideoChunk, VideoGenError

HANG_GRACE_S = 10.0  # a stream still open this long after its gRPC deadline counts as hung
IDLE_WAIT_S = 5.0
MIB = 2**20

# -- loopback only ------------------------------------------------------------------------------------


def loopback_refusal(host: str) -> str | None:
    """Why ``host`` may not be loaded (``None`` when it is loopback: 127.0.0.0/8, ::1, localhost)."""
    bare = host.strip().strip("[]").lower()
    if bare in ("localhost", "localhost.", "ip6-localhost"):
        return None
    try:
        address = ipaddress.ip_address(bare.split("%")[0])
    except ValueError:
        return f"host {host!r} is not an IP literal or 'localhost' (names are not resolved: only loopback may be loaded)"
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return None
    return f"host {host!r} is not loopback (127.0.0.0/8, ::1 or localhost)"


def split_targets(values: Iterable[str]) -> list[str]:
    """``HOST:PORT`` entries of repeated and/or comma-separated target values."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def check_target(target: str) -> str | None:
    """Why ``target`` (``HOST:PORT`` or ``[V6]:PORT``) is refused, ``None`` when it is a loopback address."""
    if "://" in target or target.lower().startswith(("dns:", "ipv4:", "ipv6:", "unix:", "xds:")):
        return f"target {target!r}: give HOST:PORT (resolver schemes are not accepted here)"
    if target.startswith("["):
        host, sep, port = target[1:].partition("]:")
    else:
        host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"target {target!r} is not HOST:PORT"
    reason = loopback_refusal(host)
    return f"target {target!r}: {reason}" if reason else None


def check_metrics_url(url: str) -> str | None:
    """Why a metrics URL is refused, ``None`` when it is http(s) on a loopback host."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"metrics URL {url!r} is not http://HOST:PORT/metrics"
    reason = loopback_refusal(parsed.hostname)
    return f"metrics URL {url!r}: {reason}" if reason else None


# -- server-side figures --------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric ``name`` in Prometheus text format: (labels, value)."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) == name:
            samples.append((dict(_LABEL.findall(match.group(2) or "")), float(match.group(3))))
    return samples


def scrape(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only, checked
        return response.read().decode("utf-8", "replace")


def metrics_memory(urls: Sequence[str]) -> int:
    """Server memory from ``videogen_device_memory_allocated_bytes``: per endpoint, each device once
    (the largest of its instances' samples), summed over devices and endpoints."""
    total = 0.0
    for url in urls:
        per_device: dict[str, float] = {}
        for labels, value in parse_metrics(scrape(url), "videogen_device_memory_allocated_bytes"):
            device = labels.get("device", "")
            per_device[device] = max(per_device.get(device, 0.0), value)
        total += sum(per_device.values())
    return int(total)


def rss_memory(pids: Sequence[int]) -> int:
    """Resident set size of processes (Linux /proc), summed."""
    total = 0
    for pid in pids:
        lines = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:")]
        if not lines:  # a zombie (exited, not yet reaped): counted as 0 MiB, it read as a server that freed it all
            raise OSError(f"process {pid} has exited")
        total += int(lines[0].split()[1]) * 1024
    return total


def server_memory(metrics: Sequence[str], pids: Sequence[int]) -> tuple[str | None, int | None]:
    """(source, bytes): from the metrics endpoints when given, else the processes' RSS, else nothing."""
    if metrics:
        return "metrics:videogen_device_memory_allocated_bytes", metrics_memory(metrics)
    if pids:
        return "rss", rss_memory(pids)
    return None, None


def gauges(urls: Sequence[str]) -> dict[str, float]:
    """videogen_inflight_requests and videogen_queue_depth summed over the endpoints."""
    out = {"inflight_requests": 0.0, "queue_depth": 0.0}
    for url in urls:
        text = scrape(url)
        out["inflight_requests"] += sum(v for _, v in parse_metrics(text, "videogen_inflight_requests"))
        out["queue_depth"] += sum(v for _, v in parse_metrics(text, "videogen_queue_depth"))
    return out


def wait_idle(urls: Sequence[str], timeout: float = IDLE_WAIT_S) -> tuple[dict[str, float], float]:
    """Poll the gauges until both are 0 or ``timeout`` passes: (last gauges, seconds waited)."""
    start = time.monotonic()
    values = gauges(urls)
    while any(values.values()) and time.monotonic() - start < timeout:
        time.sleep(0.05)
        values = gauges(urls)
    return values, time.monotonic() - start


# -- statistics ----------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float]) -> dict[str, Any]:
    return {"count": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values) if values else None,
            "mean": sum(values) / len(values) if values else None}


# -- the run -------------------------------------------------------------------------------------------


def default_image(width: int = 64, height: int = 48) -> bytes:
    """A small RGB gradient PNG."""
    from PIL import Image

    image = Image.new("RGB", (width, height))
    image.putdata([(x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), 128)
                   for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def _one(client: AsyncVideoGenClient, image: bytes, model: str, kwargs: dict[str, Any],
               timeout: float) -> dict[str, Any]:
    record: dict[str, Any] = {"status": "OK", "e2e_s": None, "ttff_s": None, "queue_s": None,
                              "server_first_frame_s": None, "server_total_s": None, "eta_error_s": None}
    start = time.perf_counter()

    async def consume() -> None:
        estimate = accepted_at = None
        events = client.generate(image, model=model, timeout=timeout, **kwargs)
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Accepted):
                    estimate, accepted_at = event.estimated_end_seconds, time.perf_counter()
                elif record["ttff_s"] is None and isinstance(event, (Frame, VideoChunk)):
                    record["ttff_s"] = time.perf_counter() - start
                elif isinstance(event, Summary):
                    record.update(queue_s=event.queue_seconds, server_first_frame_s=event.first_frame_seconds,
                                  server_total_s=event.total_seconds)
                    if estimate is not None and accepted_at is not None:  # the server's estimate, checked
                        record["eta_error_s"] = time.perf_counter() - accepted_at - estimate

    try:
        await asyncio.wait_for(consume(), timeout + HANG_GRACE_S)
    except asyncio.TimeoutError:
        record["status"] = "HANG"
    except VideoGenError as err:
        record["status"] = err.code.name
        record["details"] = err.details
    except Exception as err:  # noqa: BLE001 - a client-side failure is a result too
        record["status"] = type(err).__name__
        record["details"] = str(err)
    record["e2e_s"] = time.perf_counter() - start
    return record


async def _run_async(targets: list[str], *, model: str, clients: int, requests: int,
                     request_kwargs: dict[str, Any], timeout: float, duration: float, retry: bool,
                     image: bytes) -> tuple[list[dict[str, Any]], int, float, bool]:
    target: str | list[str] = targets[0] if len(targets) == 1 else targets
    # Each simulated client gets its own connection (grpc otherwise shares subchannels between
    # channels with the same target and options).
    options = [("grpc.use_local_subchannel_pool", 1)]
    pool = [AsyncVideoGenClient(target, retry=retry, options=options) for _ in range(clients)]
    records: list[dict[str, Any]] = []
    sent = 0
    start = time.monotonic()
    deadline = start + duration

    async def worker(client: AsyncVideoGenClient) -> None:
        nonlocal sent
        while sent < requests:
            left = deadline - time.monotonic()
            if left <= 0.05:
                return
            sent += 1
            records.append(await _one(client, image, model, request_kwargs, min(timeout, left)))

    try:
        tasks = [asyncio.ensure_future(worker(client)) for client in pool]
        _, pending = await asyncio.wait(tasks, timeout=duration + HANG_GRACE_S + 5)
        for task in pending:  # cannot happen unless a stream ignores its deadline and the hang guard
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await asyncio.gather(*(client.close() for client in pool), return_exceptions=True)
    wall = time.monotonic() - start
    return records, sent, wall, time.monotonic() >= deadline


def run_load(targets: str | Sequence[str], *, model: str, clients: int, requests: int,
             request_kwargs: dict[str, Any] | None = None, timeout: float = 120.0,
             duration: float | None = None, metrics: Sequence[str] = (), pids: Sequence[int] = (),
             retry: bool = False, image: bytes | None = None) -> dict[str, Any]:
    """Send ``requests`` Generate calls from ``clients`` concurrent streaming clients; return the results.

    Args:
        targets: loopback ``HOST:PORT`` (a sequence, or comma-separated); ValueError for others.
        model: the model name.
        clients: concurrent clients (each its own connection), >= 1.
        requests: requests in all, >= 1.
        request_kwargs: ``AsyncVideoGenClient.generate`` keywords (``num_frames``,
            ``num_inference_steps``, ``width``, ``frame_encoding``, ...); ``image`` here replaces
            the default 64x48 gradient PNG.
        timeout: gRPC deadline of each request, in seconds.
        duration: overall deadline in seconds (default: enough for every request to time out
            once per client slot, ``timeout * ceil(requests / clients)``, at most 3600).
            No request starts after it; running ones are cut off by their deadlines.
        metrics: loopback /metrics URLs of the servers (memory and idle gauges).
        pids: server process ids for RSS when no ``metrics`` are given.
        retry: let the client retry refused requests (off: the server's refusals are counted).
        image: the conditioning image bytes.

    Returns a JSON-serialisable dict: ``sent``, ``completed``, ``errors`` ({status name: count}),
    ``not_sent``, ``wall_seconds``, ``throughput_videos_per_s``, ``latency`` (``e2e_s``,
    ``ttff_s``, ``queue_wait_s``, ``server_first_frame_s``: count/p50/p90/p99/max/mean; and
    ``eta_error_s``, ``eta_abs_error_s``: the end as received less Accepted's ``estimated_end_seconds``,
    over the completed requests that had one),
    ``memory`` (``source``, ``before_bytes``, ``after_bytes``, ``delta_bytes``), ``server_after``
    (gauges after the run and ``idle_wait_s``), ``deadline_reached`` and the settings.
    """
    target_list = split_targets([targets] if isinstance(targets, str) else targets)
    if not target_list:
        raise ValueError("no target given")
    for reason in [check_target(t) for t in target_list] + [check_metrics_url(u) for u in metrics]:
        if reason:
            raise ValueError(reason)
    if clients < 1 or requests < 1:
        raise ValueError("clients and requests must be >= 1")
    if not timeout > 0:
        raise ValueError("timeout must be > 0 seconds")
    kwargs = dict(request_kwargs or {})
    image = kwargs.pop("image", None) or image or default_image()
    if duration is None:
        duration = min(3600.0, timeout * math.ceil(requests / clients))
    if not duration > 0:
        raise ValueError("duration must be > 0 seconds")

    try:
        source, before = server_memory(metrics, pids)
    except (OSError, ValueError) as err:  # (URLError is an OSError)
        raise ValueError(f"cannot read the servers' memory before the run: {err}") from None
    records, sent, wall, deadline_reached = asyncio.run(_run_async(
        target_list, model=model, clients=clients, requests=requests, request_kwargs=kwargs,
        timeout=timeout, duration=duration, retry=retry, image=image))
    # after the run the servers may be gone (what a load test is there to find): the records are kept
    # and the reason reported, not lost to a traceback
    server_after: dict[str, Any] = {}
    unreadable = None
    if metrics:
        try:
            values, waited = wait_idle(metrics)
            server_after = {**values, "idle_wait_s": waited}
        except (OSError, ValueError) as err:
            unreadable = f"{type(err).__name__}: {err}"
    after = None
    if unreadable is None:
        try:
            _, after = server_memory(metrics, pids)
        except (OSError, ValueError) as err:
            unreadable = f"{type(err).__name__}: {err}"

    ok = [r for r in records if r["status"] == "OK"]
    eta_errors = [r["eta_error_s"] for r in ok if r["eta_error_s"] is not None]
    errors = Counter(r["status"] for r in records if r["status"] != "OK")
    details = {}
    for r in records:
        if r["status"] != "OK" and "details" in r:
            details.setdefault(r["status"], r["details"])
    return {
        "targets": target_list, "model": model, "clients": clients, "requests": requests,
        "request_kwargs": {k: v for k, v in kwargs.items()}, "timeout_s": timeout, "duration_s": duration,
        "retry": retry,
        "sent": sent, "completed": len(ok), "errors": dict(sorted(errors.items())), "error_details": details,
        "not_sent": requests - sent, "deadline_reached": deadline_reached,
        "wall_seconds": wall, "throughput_videos_per_s": len(ok) / wall if wall > 0 else 0.0,
        "latency": {
            "e2e_s": distribution([r["e2e_s"] for r in ok]),
            "ttff_s": distribution([r["ttff_s"] for r in ok if r["ttff_s"] is not None]),
            "queue_wait_s": distribution([r["queue_s"] for r in ok if r["queue_s"] is not None]),
            "server_first_frame_s": distribution([r["server_first_frame_s"] for r in ok
                                                  if r["server_first_frame_s"] is not None]),
            "rejected_e2e_s": distribution([r["e2e_s"] for r in records if r["status"] != "OK"]),
            "eta_error_s": distribution(eta_errors),
            "eta_abs_error_s": distribution([abs(e) for e in eta_errors]),
        },
        "memory": {"source": source, "before_bytes": before, "after_bytes": after,
                   "delta_bytes": None if before is None or after is None else after - before},
        "server_after": server_after,
        "server_unreadable_after": unreadable,
    }


# -- output --------------------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.1f} MiB"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text report of ``run_load``'s result."""
    lines = [
        f"videogen load: model {result['model']}, {result['clients']} clients, {result['requests']} requests "
        f"-> {', '.join(result['targets'])}",
        f"sent {result['sent']}  completed {result['completed']}  not sent {result['not_sent']}  "
        f"errors {', '.join(f'{k}={v}' for k, v in result['errors'].items()) or 'none'}"
        + ("  (overall deadline reached)" if result["deadline_reached"] else ""),
        f"wall {result['wall_seconds']:.2f} s  throughput {result['throughput_videos_per_s']:.3f} videos/s",
        "",
        f"{'seconds (completed)':<22}{'n':>5}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}",
    ]
    names = {"queue_wait_s": "queue wait", "ttff_s": "time to first frame", "e2e_s": "end to end",
             "server_first_frame_s": "first frame (server)", "eta_abs_error_s": "|end - estimated end|",
             "eta_error_s": "end - estimated end"}
    for key, label in names.items():
        d = result["latency"][key]
        lines.append(f"{label:<22}{d['count']:>5}{_seconds(d['p50']):>10}{_seconds(d['p90']):>10}"
                     f"{_seconds(d['p99']):>10}{_seconds(d['max']):>10}")
    memory = result["memory"]
    if memory["source"]:
        delta = memory["delta_bytes"]
        change = "" if delta is None else f" ({'+' if delta >= 0 else '-'}{_bytes(abs(delta))})"
        lines += ["", f"server memory ({memory['source']}): before {_bytes(memory['before_bytes'])}, "
                      f"after {_bytes(memory['after_bytes'])}{change}"]
    if result.get("server_unreadable_after"):
        lines.append(f"the servers could not be read after the run (gone?): {result['server_unreadable_after']}")
    if result["server_after"]:
        s = result["server_after"]
        lines.append(f"server after the run: inflight {s['inflight_requests']:g}, queue depth {s['queue_depth']:g} "
                     f"(waited {s['idle_wait_s']:.2f} s)")
    for code, text in result.get("error_details", {}).items():
        lines.append(f"{code}: {text}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loadgen.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", required=True, metavar="HOST:PORT",
                   help="a loopback server (repeat it or give a comma-separated list)")
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default %(default)s)")
    p.add_argument("--requests", type=int, default=40, help="requests in all (default %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="gRPC deadline per request, s (default %(default)s)")
    p.add_argument("--duration", type=float, help="overall deadline, s (default: timeout * requests/clients, <= 3600)")
    p.add_argument("--metrics", action="append", default=[], metavar="URL",
                   help="a server's /metrics URL for memory and idle gauges (repeatable)")
    p.add_argument("--pid", action="append", type=int, default=[], help="server PID for RSS (without --metrics)")
    p.add_argument("--retry", action="store_true", help="let the client retry refused requests")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    g = p.add_argument_group("request")
    g.add_argument("--image", type=Path, help="conditioning image (default: a 64x48 gradient PNG)")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--num-frames", type=int)
    g.add_argument("--steps", type=int, dest="num_inference_steps")
    g.add_argument("--decode-chunk-size", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--frame-encoding", choices=["png", "jpeg", "raw_rgb", "none"], default="png")
    g.add_argument("--no-video", action="store_true", help="do not stream the MP4")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    kwargs: dict[str, Any] = {k: getattr(args, k) for k in (
        "width", "height", "num_frames", "num_inference_steps", "decode_chunk_size", "seed")
        if getattr(args, k) is not None}
    kwargs["frame_encoding"] = args.frame_encoding
    kwargs["stream_video"] = not args.no_video
    try:
        try:
            image = args.image.read_bytes() if args.image else None
        except OSError as err:
            raise ValueError(f"--image {args.image}: {err.strerror or err}") from None
        result = run_load(split_targets(args.target), model=args.model, clients=args.clients,
                          requests=args.requests, request_kwargs=kwargs, timeout=args.timeout,
                          duration=args.duration, metrics=args.metrics, pids=args.pid, retry=args.retry,
                          image=image)
    except ValueError as err:
        print(f"loadgen: refusing to run: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    accepted = {"RESOURCE_EXHAUSTED"}
    return 0 if all(code in accepted for code in result["errors"]) and not result["server_unreadable_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
