"""Soak: a long mixed workload against a videogen server, sampling what the server process holds.

Usage:
    python bench/soak.py --requests 8000 [--json soak.json]       # the tiny model on its own server
    python bench/soak.py --target 127.0.0.1:8001 --pid PID --model svd-xt --width 1024 --height 576 \\
        --num-frames 25 --steps 25 --timeout 900 --requests 400 --burst-every 100 --burst-size 72

Every way a request can end, drawn at random and ``--concurrency`` at a time (KINDS): completed (at two
priorities), cancelled by its caller after Accepted, after a denoising step or after a frame, a deadline that
passes while queued or while running, refused at admission (a bad field, an undecodable image, a full queue),
a caller whose channel closes mid-stream, the Open Inference Protocol's ModelInfer and a ModelStreamInfer
cancelled after its first answer; with ``--reload-every N`` (explicit model control) the model is reloaded
in place every N requests while others run; every ``--burst-every`` requests the mix pauses and a burst of
``--burst-size`` completions goes at once, more than the server queues, so that some are refused as a full
queue (the mix alone reaches a full queue only while ``--concurrency`` exceeds what the server queues and
runs, and then for most of its requests, as refusals are quick). Every ``--sample-every`` requests the server process's resident
memory, threads and open file descriptors are read from /proc/PID and printed; at the end a table: each
figure at the first sample (after a warm-up of that many requests) and the last, RSS growth per 1000
requests (least squares over the samples), and the outcomes by kind.

Without ``--target`` it writes the tiny model to a temporary repository and starts ``videogen-server serve``
on it (explicit model control, port 0, one CPU thread), which it stops at the end; ``--target`` takes a loopback server (the figures need its ``--pid`` on this
machine).

Exit status 0 when every request ended as its kind should (UNEXPECTED lists the others: an INTERNAL, a
stream that outlived its own deadline by 10 s, a completion where only an error is possible), 1
otherwise, or when the server process could no longer be read (it exited: the run stops there, and the
table and ``--json`` keep what was gathered), 2 for bad arguments. With reloads, UNAVAILABLE is an expected end (a reload hands back the
queued requests that would not end within the server's ``--unload-timeout-seconds`` and stops those still
running at its end; retries are off). A completion's DeadlineExceededError is not: give ``--timeout`` room
for the queue's wait (``--concurrency`` requests ahead). Importable: ``run_mix(...)`` runs the requests and returns the outcomes; the tests use it.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import check_target, default_image  # noqa: E402 - a sibling script

import grpc  # noqa: E402

HANG_GRACE_S = 10.0
#: the kinds whose deadline is their own, not --timeout
SHORT_DEADLINES = {"deadline_queued": 0.02, "deadline_running": 0.3}
MIB = 2**20
#: kinds of request, drawn uniformly (completions weigh three): what each sends and how it may end
KINDS = ("ok", "ok", "ok", "priority", "cancel_accepted", "cancel_progress", "cancel_frame", "deadline_queued",
         "deadline_running", "invalid", "bad_image", "channel_closed", "kserve", "kserve_stream")
_FULL = {"QueueFullError", "grpc:UNAVAILABLE"}  # a full queue: VideoGen's RESOURCE_EXHAUSTED, KServe's UNAVAILABLE
EXPECTED: dict[str, set[str]] = {
    "ok": {"ok", "QueueFullError"}, "priority": {"ok", "QueueFullError"}, "burst": {"ok", "QueueFullError"},
    "cancel_accepted": {"ok", "QueueFullError"}, "cancel_progress": {"ok", "QueueFullError"},
    "cancel_frame": {"ok", "QueueFullError"}, "channel_closed": {"ok", "QueueFullError"},
    "deadline_queued": {"DeadlineExceededError", "QueueFullError"},
    "deadline_running": {"DeadlineExceededError", "QueueFullError", "ok"},
    # fields are checked before a queue slot is taken, the image after
    "invalid": {"InvalidArgumentError"}, "bad_image": {"InvalidArgumentError", "QueueFullError"},
    "kserve": {"ok"} | _FULL, "kserve_stream": {"ok"} | _FULL,
}


async def _one(client: Any, channel: grpc.aio.Channel, target: str, kind: str, *, model: str,
               image: bytes, sizes: dict[str, int], timeout: float) -> str:
    """Sends one request of ``kind``; returns how it ended: ``ok``, an SDK error's class name, or
    ``grpc:CODE`` for the Open Inference Protocol's calls."""
    from inference import grpc_service_pb2 as kpb
    from inference import grpc_service_pb2_grpc as kpb_grpc
    from videogen_client import Accepted, AsyncVideoGenClient, Frame, Progress, VideoGenError

    try:
        if kind in ("ok", "priority", "burst"):
            await client.run(image, model=model, **sizes, priority=1 if kind == "priority" else 0, timeout=timeout)
        elif kind.startswith("cancel_"):
            until = {"cancel_accepted": Accepted, "cancel_progress": Progress, "cancel_frame": Frame}[kind]
            async with contextlib.aclosing(client.generate(image, model=model, **sizes, timeout=timeout)) as events:
                async for event in events:
                    if isinstance(event, until):
                        break
        elif kind == "deadline_queued":  # shorter than any run: ends queued, or at its first step
            await client.run(image, model=model, **sizes, timeout=SHORT_DEADLINES[kind])
        elif kind == "deadline_running":  # ten times the steps, and a deadline a little past admission
            await client.run(image, model=model, **dict(sizes, num_inference_steps=10 * sizes["num_inference_steps"]),
                             timeout=SHORT_DEADLINES[kind])
        elif kind == "invalid":
            await client.run(image, model=model, **sizes, fps=-1, timeout=timeout)
        elif kind == "bad_image":
            await client.run(b"\x89PNG\r\n\x1a\n not an image", model=model, **sizes, timeout=timeout)
        elif kind == "channel_closed":  # a caller that goes away without cancelling: its connection closes
            async with AsyncVideoGenClient(target, retry=False) as gone:
                async for event in gone.generate(image, model=model, **sizes, timeout=timeout):
                    if isinstance(event, Progress):
                        break
        elif kind.startswith("kserve"):
            from videogen_server.transport.kserve import serialize_bytes

            infer = kpb.ModelInferRequest(model_name=model, id=kind)
            infer.inputs.add(name="image", datatype="BYTES", shape=[1])
            infer.raw_input_contents.append(serialize_bytes([image]))
            for key, value in sizes.items():
                infer.parameters[key].int64_param = value
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            if kind == "kserve":
                await stub.ModelInfer(infer, timeout=timeout)
            else:
                call = stub.ModelStreamInfer(iter([infer]), timeout=timeout)
                async for answer in call:
                    if answer.error_message:
                        code = dict(answer.infer_response.parameters).get("error_code")
                        return f"grpc:{code.string_param if code else 'UNKNOWN'}"
                    call.cancel()
                    break
        else:
            raise ValueError(f"unknown kind {kind!r}")
        return "ok"
    except VideoGenError as err:
        return type(err).__name__
    except grpc.RpcError as err:
        return f"grpc:{err.code().name}"


async def run_mix(target: str, *, model: str, requests: int, concurrency: int = 6, seed: int = 0,
                  sizes: Optional[dict[str, int]] = None, image: Optional[bytes] = None, timeout: float = 60.0,
                  reload_every: int = 0, burst_every: int = 0, burst_size: int = 0,
                  on_done: Optional[Callable[[int, int], Awaitable[None]]] = None,
                  kinds: Sequence[str] = KINDS, outcomes: Optional[dict[str, Counter]] = None) -> dict[str, Counter]:
    """Sends ``requests`` requests of kinds drawn from ``kinds`` (seeded) from ``concurrency`` workers;
    with ``reload_every`` the model is reloaded (LoadModel, explicit model control) in place after every
    that many requests, while the others run; with ``burst_every``, after every that many the mix pauses
    (its requests in flight end) and ``burst_size`` completions (kind ``burst``) go at once, more than
    the server queues and runs, so that some are refused as a full queue, then the mix goes on. (The mix
    alone reaches a full queue only while ``concurrency`` exceeds what the server queues and runs, and
    then for most of its requests, as refusals are quick: a burst beside the running mix did the same.)
    ``on_done(n, sent)`` is awaited after each drawn request (n drawn requests done so far; ``sent``:
    requests ended so far, the bursts' included). Returns {kind: Counter(outcome)}, filled into
    ``outcomes`` when given (what ended before an exception stays the caller's); a request that outlives
    its own deadline by HANG_GRACE_S is ``HANG``."""
    from videogen_client import AsyncVideoGenClient

    sizes = dict(sizes or {})
    sizes.setdefault("num_inference_steps", 2)
    image = image or default_image()
    rng = random.Random(seed)
    drawn = [rng.choice(kinds) for _ in range(requests)]
    outcomes = {} if outcomes is None else outcomes
    taken = done = busy = bursts = 0
    running = asyncio.Event()  # cleared while a burst waits for the mix to stop, and runs
    running.set()
    changed = asyncio.Condition()  # busy went down
    async with AsyncVideoGenClient(target, retry=False) as client:
        channel = grpc.aio.insecure_channel(target)

        async def one(kind: str) -> None:
            try:
                outcome = await asyncio.wait_for(
                    _one(client, channel, target, kind, model=model, image=image, sizes=sizes, timeout=timeout),
                    SHORT_DEADLINES.get(kind, timeout) + HANG_GRACE_S)
            except asyncio.TimeoutError:
                outcome = "HANG"
            outcomes.setdefault(kind, Counter())[outcome] += 1

        async def burst() -> None:
            running.clear()
            async with changed:
                await changed.wait_for(lambda: busy == 0)
            nonlocal bursts
            try:
                await asyncio.gather(*(one("burst") for _ in range(burst_size)))
            finally:
                bursts += burst_size
                running.set()

        async def worker() -> None:
            nonlocal taken, done, busy
            while True:
                await running.wait()
                if taken >= requests:
                    return
                i, taken = taken, taken + 1
                if burst_every and burst_size and i and i % burst_every == 0:
                    await burst()
                busy += 1
                try:
                    if reload_every and i and i % reload_every == 0:
                        outcome = "ok"
                        try:
                            await client.load_model(model, timeout=max(timeout, 600.0))
                        except Exception as err:  # noqa: BLE001 - reported as an outcome
                            outcome = type(err).__name__
                        outcomes.setdefault("reload", Counter())[outcome] += 1
                    await one(drawn[i])
                finally:
                    busy -= 1
                    async with changed:
                        changed.notify_all()
                done += 1
                if on_done is not None:
                    await on_done(done, done + bursts)

        workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        try:
            await asyncio.gather(*workers)
        except BaseException:  # (on_done stopped the run: the other workers' requests end here, uncounted)
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        finally:
            await channel.close()
    return outcomes


#: ends a reload gives a request: queued ones that would not end within the server's unload wait are handed
#: back not started, and running ones still running at its end stopped (retries are off here)
RELOAD_ENDS = {"UnavailableError", "grpc:UNAVAILABLE"}


def unexpected(outcomes: dict[str, Counter]) -> dict[str, dict[str, int]]:
    """The outcomes no request of that kind should have had (with reloads, UNAVAILABLE is one to expect)."""
    reloads = bool(outcomes.get("reload"))
    allowed = {kind: ends | RELOAD_ENDS if reloads and kind not in ("invalid",) else ends
               for kind, ends in EXPECTED.items()}
    allowed["reload"] = {"ok"}
    bad = {kind: {o: n for o, n in counter.items() if o not in allowed.get(kind, set())}
           for kind, counter in outcomes.items()}
    return {kind: found for kind, found in bad.items() if found}


class ServerGone(Exception):
    """The server process cannot be read any more: the run stops, keeping what it gathered."""


def process_sample(pid: int) -> dict[str, int]:
    """The process's resident memory (bytes), threads and open file descriptors, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_bytes": int(status["VmRSS"].split()[0]) * 1024, "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def slope_per_1000(samples: list[dict[str, Any]], key: str) -> Optional[float]:
    """Least-squares growth of ``key`` per 1000 requests over the samples (None for fewer than 2)."""
    if len(samples) < 2:
        return None
    xs, ys = [s["requests"] for s in samples], [s[key] for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else None


def format_table(result: dict[str, Any]) -> str:
    samples = result["samples"]
    lines = [f"videogen soak: model {result['model']} at {result['target']}, {result['sent']} requests "
             f"({result['requests']} drawn, the rest bursts), {result['concurrency']} at a time, "
             f"{result['wall_seconds']:.0f} s"]
    if result.get("server_gone"):
        lines.append(f"STOPPED: {result['server_gone']}")
    if samples:
        first, last = samples[0], samples[-1]
        lines.append(f"{'server process':<16}{'first':>12}{'last':>12}{'min':>12}{'max':>12}"
                     f"   (first: after {first['requests']} requests; last: after {last['requests']})")
        for key, label, unit in (("rss_bytes", "RSS", MIB), ("threads", "threads", 1), ("fds", "open fds", 1)):
            values = [s[key] for s in samples]
            cells = [f"{v / unit:,.1f}" if unit != 1 else str(v) for v in (first[key], last[key], min(values), max(values))]
            lines.append(f"{label + (' MiB' if unit != 1 else ''):<16}" + "".join(f"{c:>12}" for c in cells))
        growth = result["rss_growth_mib_per_1000_requests"]
        lines.append(f"RSS growth: {'-' if growth is None else f'{growth:+.2f}'} MiB per 1000 requests")
    lines.append("outcomes: " + "; ".join(f"{kind} " + ", ".join(f"{o}={n}" for o, n in sorted(c.items()))
                                          for kind, c in sorted(result["outcomes"].items())))
    bad = result["unexpected"]
    lines.append("UNEXPECTED: " + json.dumps(bad) if bad else "every request ended as its kind should")
    return "\n".join(lines)


@contextlib.contextmanager
def tiny_server(workdir: Path):
    """Starts ``videogen-server serve`` on the tiny model (explicit model control); yields (target, pid)."""
    cli = [sys.executable, "-c", "import sys; from videogen_server.cli import main; sys.exit(main())"]
    subprocess.run(cli + ["make-tiny-model", str(workdir / "repo")], check=True, stdout=subprocess.DEVNULL)
    ports, log_path = workdir / "ports", workdir / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cli + ["serve", "--model-repository", str(workdir / "repo"), "--host", "127.0.0.1",
                                       "--port", "0", "--metrics-port", "-1", "--cpu-threads", "1",
                                       "--model-control-mode", "explicit", "--load-model", "*",
                                       "--port-file", str(ports)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (ports.exists() and ports.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]  # the folder goes with this exception
                raise RuntimeError(f"the server did not start; its log ends:\n{tail}")
            time.sleep(0.2)
        yield f"127.0.0.1:{ports.read_text().split()[0]}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def soak(target: str, pid: Optional[int], *, model: str, requests: int, concurrency: int, sample_every: int,
         seed: int, sizes: dict[str, int], image: bytes, timeout: float, reload_every: int, burst_every: int,
         burst_size: int) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    outcomes: dict[str, Counter] = {}
    sent = 0

    async def on_done(n: int, total: int) -> None:
        nonlocal sent
        sent = total
        if pid is not None and (n % sample_every == 0 or n == requests):
            try:
                figures = process_sample(pid)
            except (OSError, KeyError, ValueError) as err:  # the server died: what a soak is there to find
                raise ServerGone(f"the server process {pid} could not be read after {total} requests "
                                 f"({type(err).__name__}: {err}): it has exited?") from None
            # x: every request ended so far, the bursts' included (growth per 1000 requests sent)
            sample = {"requests": total, "seconds": round(time.monotonic() - t0, 1), **figures}
            samples.append(sample)
            print(f"{total:>8} requests {sample['seconds']:>8.1f} s  RSS {sample['rss_bytes'] / MIB:,.1f} MiB  "
                  f"threads {sample['threads']}  fds {sample['fds']}", flush=True)

    t0 = time.monotonic()
    gone = None
    try:
        asyncio.run(run_mix(target, model=model, requests=requests, concurrency=concurrency, seed=seed,
                            sizes=sizes, image=image, timeout=timeout, reload_every=reload_every,
                            burst_every=burst_every, burst_size=burst_size, on_done=on_done, outcomes=outcomes))
    except ServerGone as err:
        gone = str(err)
    return {"target": target, "model": model, "requests": requests, "sent": sent, "server_gone": gone,
            "concurrency": concurrency, "seed": seed,
            "sizes": sizes, "reload_every": reload_every, "burst_every": burst_every, "burst_size": burst_size,
            "wall_seconds": time.monotonic() - t0,
            "samples": samples, "rss_growth_mib_per_1000_requests":
                None if (g := slope_per_1000(samples, "rss_bytes")) is None else g / MIB,
            "outcomes": {k: dict(v) for k, v in outcomes.items()}, "unexpected": unexpected(outcomes)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soak.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", metavar="HOST:PORT", help="a loopback server (default: start one on the tiny model)")
    p.add_argument("--pid", type=int, help="the --target server's process id, for its figures")
    p.add_argument("--model", help="model name (default: svd-tiny on the server this starts; required with --target)")
    p.add_argument("--requests", type=int, default=2000, help="requests in all (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=6, help="requests at a time (default %(default)s)")
    p.add_argument("--sample-every", type=int, default=200, help="requests between samples (default %(default)s)")
    p.add_argument("--reload-every", type=int, help="reload the model in place every N requests (explicit model "
                   "control; default: 500 on the server this starts, never with --target)")
    p.add_argument("--burst-every", type=int, default=250, help="every N requests, pause the mix and send "
                   "--burst-size completions at once, to fill the queue (default %(default)s; 0: never)")
    p.add_argument("--burst-size", type=int, default=24, help="requests of a burst: more than the server queues and "
                   "runs at once (default %(default)s, above the tiny model's queue of 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw of kinds (default %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="gRPC deadline per request, s (default %(default)s)")
    p.add_argument("--image", type=Path, help="conditioning image (default: a 64x48 gradient PNG)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--num-frames", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, dest="num_inference_steps")
    p.add_argument("--decode-chunk-size", type=int, default=1)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.target and not args.model:
        p.error("--model is required with --target")
    if args.target and (reason := check_target(args.target)):
        print(f"soak: refusing to run: {reason}", file=sys.stderr)
        return 2
    if min(args.requests, args.concurrency, args.sample_every) < 1 or not args.timeout > 0:
        p.error("--requests, --concurrency and --sample-every must be >= 1 and --timeout > 0")
    if (args.reload_every is not None and args.reload_every < 0) or args.burst_every < 0 or args.burst_size < 0:
        p.error("--reload-every, --burst-every and --burst-size must be >= 0 (0: never)")
    if args.pid is not None:
        try:
            process_sample(args.pid)
        except OSError as err:
            p.error(f"--pid {args.pid}: {err}")
    sizes = {k: getattr(args, k) for k in ("width", "height", "num_frames", "num_inference_steps", "decode_chunk_size")}
    try:
        image = args.image.read_bytes() if args.image else default_image()
    except OSError as err:
        p.error(f"--image {args.image}: {err.strerror or err}")
    with contextlib.ExitStack() as stack:
        if args.target:
            target, pid, model, reload_every = args.target, args.pid, args.model, args.reload_every or 0
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="videogen-soak-")))
            target, pid = stack.enter_context(tiny_server(workdir))
            model = args.model or "svd-tiny"
            reload_every = 500 if args.reload_every is None else args.reload_every
        result = soak(target, pid, model=model, requests=args.requests, concurrency=args.concurrency,
                      sample_every=args.sample_every, seed=args.seed, sizes=sizes, image=image,
                      timeout=args.timeout, reload_every=reload_every, burst_every=args.burst_every,
                      burst_size=args.burst_size)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["unexpected"] or result["server_gone"] else 0


if __name__ == "__main__":
    sys.exit(main())
