"""The client SDK (sync and asyncio), its helpers and the ``videogen`` CLI against a real server.

Every test talks to the session's tiny server over real gRPC on loopback; the CLI tests run the
installed command in a subprocess, as a user would.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
from PIL import Image

from videogen.v1 import videogen_pb2 as pb
from videogen_client import (
    Accepted,
    AsyncVideoGenClient,
    Frame,
    GenerationResult,
    InvalidArgumentError,
    ModelInfo,
    ModelNotFoundError,
    Progress,
    Summary,
    VideoChunk,
    VideoGenClient,
    save_frames,
    save_video,
)

from videogen_client._request import image_bytes

from ..helpers import collect, raw_frames, request, sample_png

MODEL = "svd-tiny"
W, H = 64, 48  # the tiny model's default size
TIMEOUT = 60.0  # gRPC deadline of every call: a hung server fails the test instead of stalling it
SAMPLE = sample_png()


@pytest.fixture
def client(tiny_server):
    with VideoGenClient(tiny_server.target, timeout=TIMEOUT) as c:
        yield c


def decode_mp4(data: bytes) -> tuple[int, object, tuple[int, int]]:
    """(decoded frame count, the stream's average_rate, (width, height)) of an MP4."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, stream.average_rate, (stream.codec_context.width, stream.codec_context.height)


def wait_for_metric(server, name: str, at_least: float, timeout: float = 5.0, **labels: str) -> float:
    """Poll the server's metric until it reaches ``at_least`` (or ``timeout`` passes); return its value."""
    deadline = time.monotonic() + timeout
    value = server.metric(name, **labels)
    while value < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
        value = server.metric(name, **labels)
    return value


# -- 1. typed events in order, run() and the MP4 ------------------------------------------------


def test_generate_yields_typed_events_in_order(client):
    events = list(client.generate(SAMPLE, model=MODEL, num_frames=3, num_inference_steps=2,
                                  decode_chunk_size=2, seed=5, request_id="client-order-1"))
    kinds = [type(e) for e in events]
    assert kinds[0] is Accepted and kinds[-1] is Summary
    assert kinds.count(Accepted) == 1 and kinds.count(Summary) == 1
    # Accepted, Progress*, then Frames with the MP4 bytes encoded so far after each chunk's frames,
    # the last VideoChunk after the last Frame, Summary
    order = {Accepted: 0, Progress: 1, Frame: 2, VideoChunk: 2, Summary: 4}
    assert [order[k] for k in kinds] == sorted(order[k] for k in kinds)
    assert kinds[-2] is VideoChunk and events[-2].last

    accepted = events[0]
    assert accepted.request_id == "client-order-1"
    assert (accepted.model, accepted.model_version) == (MODEL, 1)
    p = accepted.parameters
    assert (p["width"], p["height"], p["num_frames"], p["num_inference_steps"], p["seed"]) == (W, H, 3, 2, 5)
    assert p["frame_encoding"] == "png" and p["stream_video"] is True

    progress = [e for e in events if isinstance(e, Progress)]
    assert [(e.step, e.num_steps) for e in progress] == [(1, 2), (2, 2)]
    assert 0 <= progress[0].elapsed_seconds <= progress[1].elapsed_seconds

    frames = [e for e in events if isinstance(e, Frame)]
    assert [f.index for f in frames] == [0, 1, 2]
    assert [f.chunk_index for f in frames] == [0, 0, 1]  # decode_chunk_size 2
    assert all(f.encoding == "png" and (f.width, f.height) == (W, H) for f in frames)
    assert all(f.to_pil().format == "PNG" and f.to_pil().size == (W, H) for f in frames)

    chunks = [e for e in events if isinstance(e, VideoChunk)]
    assert chunks and chunks[-1].last and not any(c.last for c in chunks[:-1])
    assert all(c.mime_type == "video/mp4" for c in chunks)
    offsets = [0]
    for c in chunks[:-1]:
        offsets.append(offsets[-1] + len(c.data))
    assert [c.offset for c in chunks] == offsets

    summary = events[-1]
    assert summary.request_id == "client-order-1" and summary.num_frames == 3
    assert summary.video_bytes == sum(len(c.data) for c in chunks)
    assert summary.total_seconds >= summary.denoise_seconds > 0
    video = b"".join(c.data for c in chunks)
    assert decode_mp4(video)[0] == 3


def test_accepted_carries_the_servers_estimates(client, tiny_server, tmp_path, caplog):
    """Once the model has run requests of a shape to their end, Accepted says when the server expects a
    request of that shape to start and end (the CLI prints the end, the request log keeps it beside what
    happened, /metrics counts how far off it was); the figures themselves are checked in test_lifecycle."""
    caplog.set_level("INFO", logger="videogen.requests")
    for _ in range(3):  # three runs of a shape: its run time is known
        client.run(SAMPLE, model=MODEL, num_frames=2, num_inference_steps=1)
    checked = tiny_server.metric("videogen_estimated_end_error_seconds_count", model=MODEL)
    accepted = list(client.generate(SAMPLE, model=MODEL, num_frames=2, num_inference_steps=1))[0]
    # and /metrics, how far from it the request ended (here within the histogram's +-60 s)
    assert tiny_server.metric("videogen_estimated_end_error_seconds_count", model=MODEL) == checked + 1
    assert tiny_server.metric("videogen_estimated_end_error_seconds_bucket", model=MODEL, le="-60.0") == 0
    assert isinstance(accepted, Accepted)
    assert 0 <= accepted.estimated_start_seconds < accepted.estimated_end_seconds < 60, accepted
    [logged] = [r.videogen_request for r in caplog.records
                if getattr(r, "videogen_request", {}).get("request_id") == accepted.request_id]
    assert logged["estimated_end_s"] == round(accepted.estimated_end_seconds, 4), logged
    image = tmp_path / "sample.png"
    image.write_bytes(SAMPLE)
    proc = cli("generate", "--target", tiny_server.target, "--model", MODEL, "--image", str(image),
               "--out", str(tmp_path / "out.mp4"), "--num-frames", "2", "--steps", "1", "--timeout", "60")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"accepted \w+ \(svd-tiny v1, seed \d+, done in ~\d+\.\ds\)", proc.stderr), proc.stderr


def test_run_returns_result_with_decodable_video(client):
    result = client.run(SAMPLE, model=MODEL, num_frames=4, num_inference_steps=1, fps=10, seed=3)
    assert isinstance(result, GenerationResult)
    assert result.request_id and result.request_id == result.summary.request_id
    assert result.progress_count == 1
    assert len(result.frames) == 4 and [f.index for f in result.frames] == [0, 1, 2, 3]
    assert result.summary.num_frames == 4 and result.summary.video_bytes == len(result.video)
    count, rate, size = decode_mp4(result.video)
    assert count == 4
    assert rate == 10  # video_fps defaults to the requested fps
    assert size == (W, H)


def test_run_video_fps_and_no_frames(client):
    """frame_encoding="none" sends only the video; video_fps sets the MP4's rate apart from fps."""
    result = client.run(SAMPLE, model=MODEL, num_frames=2, num_inference_steps=1, fps=7, video_fps=12,
                        frame_encoding="none", seed=3)
    assert result.frames == [] and result.accepted.parameters["frame_encoding"] == "none"
    count, rate, _ = decode_mp4(result.video)
    assert (count, rate) == (2, 12)


# -- 2. raw_rgb frames equal the server's raw frames ----------------------------------------------


def test_raw_rgb_frames_match_direct_stub_call(client, tiny_server, tmp_path):
    params = dict(seed=21, num_frames=2, num_inference_steps=2, width=40, height=24)  # not square, not default
    result = client.run(SAMPLE, model=MODEL, frame_encoding="raw_rgb", stream_video=False, **params)
    assert result.video == b""
    assert all(f.encoding == "raw_rgb" and len(f.data) == 40 * 24 * 3 for f in result.frames)
    images = [f.to_pil() for f in result.frames]
    assert all(im.size == (40, 24) and im.mode == "RGB" for im in images)
    ours = np.stack([np.asarray(im) for im in images])

    direct = raw_frames(collect(tiny_server.stub(), request(
        **params, output={"frame_encoding": pb.FRAME_ENCODING_RAW_RGB, "stream_video": False})))
    assert ours.shape == direct.shape == (2, 24, 40, 3)
    assert np.array_equal(ours, direct)

    # save_frames converts raw frames to PNG without changing a pixel
    paths = save_frames(result, tmp_path / "raw")
    assert [p.name for p in paths] == ["frame_00000.png", "frame_00001.png"]
    with Image.open(paths[1]) as png:
        assert png.format == "PNG"
        assert np.array_equal(np.asarray(png.convert("RGB")), direct[1])


# -- 3. save_video / save_frames ------------------------------------------------------------------


def test_save_video_and_save_frames(client, tmp_path):
    image_path = tmp_path / "in.png"
    image_path.write_bytes(SAMPLE)
    result = client.run(str(image_path), model=MODEL, num_frames=3, num_inference_steps=1, seed=2)

    out = save_video(result, tmp_path / "nested" / "OUT.mp4")  # parent folders are created
    assert out == tmp_path / "nested" / "OUT.mp4"
    assert out.read_bytes() == result.video
    assert decode_mp4(out.read_bytes())[0] == 3

    frames_dir = tmp_path / "DIR"
    paths = save_frames(result, frames_dir)
    names = [f"frame_{i:05d}.png" for i in range(3)]
    assert [p.name for p in paths] == names
    assert sorted(p.name for p in frames_dir.iterdir()) == names
    for path, frame in zip(paths, result.frames):
        assert path.read_bytes() == frame.data  # PNG frames are written as received
        with Image.open(path) as png:
            assert png.size == (W, H)

    # a shorter video saved in the same folder leaves no frame of the longer one (a frame_%05d.png
    # reader would have joined the two videos: client review)
    shorter = client.run(str(image_path), model=MODEL, num_frames=2, num_inference_steps=1, seed=3)
    (frames_dir / "notes.txt").write_text("not a frame")
    assert [p.name for p in save_frames(shorter, frames_dir)] == names[:2]
    assert sorted(p.name for p in frames_dir.iterdir()) == names[:2] + ["notes.txt"]


def test_save_video_without_video_raises(client, tmp_path):
    result = client.run(SAMPLE, model=MODEL, num_frames=2, num_inference_steps=1, stream_video=False)
    with pytest.raises(ValueError):
        save_video(result, tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()


# -- 4. asyncio client ----------------------------------------------------------------------------


def test_async_client_run_generate_and_concurrent(tiny_server):
    async def main():
        async with AsyncVideoGenClient(tiny_server.target, timeout=TIMEOUT) as c:
            result = await c.run(Image.open(io.BytesIO(SAMPLE)), model=MODEL, num_frames=2,
                                 num_inference_steps=1, seed=8)
            events = []
            async with contextlib.aclosing(c.generate(SAMPLE, model=MODEL, num_frames=2, num_inference_steps=2,
                                                      frame_encoding="raw_rgb", stream_video=False)) as gen:
                async for event in gen:
                    events.append(event)
            pair = await asyncio.gather(
                c.run(SAMPLE, model=MODEL, num_frames=3, num_inference_steps=1, seed=1),
                c.run(SAMPLE, model=MODEL, num_frames=2, num_inference_steps=2, seed=2))
            models = await c.list_models()
            return result, events, pair, models

    result, events, (r1, r2), models = asyncio.run(main())

    assert len(result.frames) == 2 and result.progress_count == 1
    assert decode_mp4(result.video)[0] == 2

    assert [type(e) for e in events] == [Accepted, Progress, Progress, Frame, Frame, Summary]
    assert [e.index for e in events if isinstance(e, Frame)] == [0, 1]
    assert all(e.to_pil().size == (W, H) for e in events if isinstance(e, Frame))

    assert r1.request_id != r2.request_id
    assert (r1.accepted.parameters["seed"], r2.accepted.parameters["seed"]) == (1, 2)
    assert (len(r1.frames), r1.progress_count, decode_mp4(r1.video)[0]) == (3, 1, 3)
    assert (len(r2.frames), r2.progress_count, decode_mp4(r2.video)[0]) == (2, 2, 2)
    assert [m.name for m in models] == [MODEL]


def test_async_client_errors_are_typed(tiny_server):
    async def main():
        async with AsyncVideoGenClient(tiny_server.target, timeout=TIMEOUT) as c:
            with pytest.raises(InvalidArgumentError) as bad:
                await c.run(SAMPLE, model=MODEL, height=50)
            with pytest.raises(ModelNotFoundError):
                await c.get_model("no-such-model")
            return bad.value

    err = asyncio.run(main())
    assert err.field == "height" and err.code == grpc.StatusCode.INVALID_ARGUMENT


# -- 5. errors ------------------------------------------------------------------------------------


def test_errors_are_typed_and_the_server_keeps_working(client, tiny_server):
    with pytest.raises(InvalidArgumentError) as width:
        client.run(SAMPLE, model=MODEL, width=63, num_frames=2, num_inference_steps=1)
    assert width.value.field == "width" and "8" in width.value.reason
    assert width.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(width.value.__cause__, grpc.RpcError)  # it came from the server

    with pytest.raises(ModelNotFoundError) as missing:
        list(client.generate(SAMPLE, model="no-such-model"))
    assert missing.value.code == grpc.StatusCode.NOT_FOUND and "no-such-model" in missing.value.details
    with pytest.raises(ModelNotFoundError):
        client.get_model("no-such-model")

    with pytest.raises(InvalidArgumentError) as corrupt:
        client.run(b"\x89PNG\r\n\x1a\n this is not an image", model=MODEL, num_frames=2, num_inference_steps=1)
    assert corrupt.value.field == "image"

    result = client.run(SAMPLE, model=MODEL, num_frames=2, num_inference_steps=1, seed=1)
    assert len(result.frames) == 2 and decode_mp4(result.video)[0] == 2


# -- 6. breaking out of generate cancels -----------------------------------------------------------


def test_break_after_first_progress_cancels(client, tiny_server):
    labels = {"model": MODEL}
    cancelled_before = tiny_server.metric("videogen_requests_total", outcome="cancelled", **labels)
    success_before = tiny_server.metric("videogen_requests_total", outcome="success", **labels)

    seen = []
    # Many steps, so that the request cannot finish on its own before the cancel reaches the server.
    for event in client.generate(SAMPLE, model=MODEL, num_frames=4, num_inference_steps=40, seed=1):
        seen.append(event)
        if isinstance(event, Progress):
            break
    assert [type(e) for e in seen] == [Accepted, Progress]

    cancelled = wait_for_metric(tiny_server, "videogen_requests_total", cancelled_before + 1,
                                outcome="cancelled", **labels)
    assert cancelled == cancelled_before + 1
    assert tiny_server.metric("videogen_requests_total", outcome="success", **labels) == success_before

    result = client.run(SAMPLE, model=MODEL, num_frames=2, num_inference_steps=1, seed=1)
    assert len(result.frames) == 2 and result.summary.num_frames == 2
    assert wait_for_metric(tiny_server, "videogen_requests_total", success_before + 1,
                           outcome="success", **labels) == success_before + 1
    assert tiny_server.metric("videogen_requests_total", outcome="cancelled", **labels) == cancelled_before + 1


def test_cancel_from_another_thread_ends_one_call_queued_or_running(make_repo):
    """A threaded caller (a job system's "cancel", a web handler whose caller left) could stop one sync
    call only by closing the client, which ends every call: the generator's close() from another thread
    raises "generator already executing", and a flag checked between events cannot act while the
    request waits in the queue, where no event comes (client review). GenerateCall.cancel() can."""
    import threading

    from videogen_client import GenerateCall, RequestCancelledError

    from ..helpers import ServerThread, tiny_config

    cfg = tiny_config(MODEL, "dynamic_batching { default_queue_policy { max_queue_size: 4 } }")
    with ServerThread(make_repo({MODEL: cfg})) as server, VideoGenClient(server.target, timeout=TIMEOUT) as client:
        running = client.generate(SAMPLE, model=MODEL, num_frames=4, num_inference_steps=40, seed=1)
        queued = client.generate(SAMPLE, model=MODEL, num_frames=4, num_inference_steps=40, seed=2)
        assert isinstance(running, GenerateCall)
        outcomes: dict = {}

        def consume(name: str, call: GenerateCall, started: threading.Event) -> None:
            try:
                for event in call:
                    if isinstance(event, (Accepted, Progress)):
                        started.set()
                outcomes[name] = "finished"
            except RequestCancelledError as err:
                outcomes[name] = err

        events = {name: threading.Event() for name in ("running", "queued")}
        threads = [threading.Thread(target=consume, args=(name, call, events[name]))
                   for name, call in (("running", running), ("queued", queued))]
        threads[0].start()
        assert events["running"].wait(30)
        threads[1].start()
        assert events["queued"].wait(30)  # Accepted: it waits in the queue behind the running one
        wait_for_metric(server, "videogen_queue_depth", 1, model=MODEL)
        cancelled_at = time.monotonic()
        queued.cancel()  # nothing arrives for it while it waits: only cancel() can end it now
        threads[1].join(10)
        assert isinstance(outcomes.get("queued"), RequestCancelledError), outcomes
        assert time.monotonic() - cancelled_at < 5 and queued.cancelled
        left = time.monotonic() + 5  # it leaves the queue at once
        while server.metric("videogen_queue_depth", model=MODEL) and time.monotonic() < left:
            time.sleep(0.05)
        assert server.metric("videogen_queue_depth", model=MODEL) == 0
        running.cancel()
        threads[0].join(10)
        assert isinstance(outcomes.get("running"), RequestCancelledError), outcomes
        assert wait_for_metric(server, "videogen_requests_total", 2, model=MODEL, outcome="cancelled") == 2
        assert server.metric("videogen_requests_total", model=MODEL, outcome="success") == 0
        later = client.generate(SAMPLE, model=MODEL, num_frames=1, num_inference_steps=1)
        later.cancel()  # before its first event: never sent
        with pytest.raises(RequestCancelledError):
            next(later)
        assert client.run(SAMPLE, model=MODEL, num_frames=1, num_inference_steps=1).summary.num_frames == 1


def test_cancel_on_the_thread_making_the_call_does_not_hang():
    """cancel() took a lock that the iterating thread held while making an attempt's call: a signal
    handler cancelling on that thread (SIGTERM while a call starts, or resends) hung forever (review of
    this change). The moment is forced with a stub whose Generate runs the handler's cancel(); no
    server is needed (the stub stands in for the one thing under test: the call's creation)."""
    import threading

    from videogen_client import RequestCancelledError

    class Cancelled(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.CANCELLED

        def details(self):
            return "cancelled"

        def trailing_metadata(self):
            return ()

        def initial_metadata(self):
            return ()

    class Call:
        def __init__(self) -> None:
            self.cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

        def __iter__(self):
            if self.cancelled:
                raise Cancelled()
            return iter(())

    client = VideoGenClient("127.0.0.1:1")
    holder: dict = {}

    class Stub:
        def Generate(self, request, timeout=None, metadata=None):
            holder["call"].cancel()  # as a signal handler would, on this thread, mid-creation
            return Call()

    client._stub = Stub()
    holder["call"] = call = client.generate(SAMPLE, model=MODEL)
    outcome: dict = {}

    def iterate() -> None:
        try:
            next(call)
        except BaseException as err:  # noqa: BLE001 - reported below
            outcome["error"] = err

    thread = threading.Thread(target=iterate, daemon=True)
    thread.start()
    thread.join(10)
    client.close()
    assert not thread.is_alive(), "cancel() hung on the thread making the call"
    assert isinstance(outcome.get("error"), RequestCancelledError), outcome


# -- 7. models ------------------------------------------------------------------------------------


def test_list_models_and_get_model(client):
    models = client.list_models()
    assert [m.name for m in models] == [MODEL]
    info = client.get_model(MODEL)
    assert isinstance(info, ModelInfo)
    assert info == models[0]
    assert info.state == "ready" and info.backend == "svd"
    assert [(v.version, v.state) for v in info.versions] == [(1, "ready")]
    d = info.defaults
    assert (d["num_frames"], d["width"], d["height"], d["num_inference_steps"], d["decode_chunk_size"]) == (4, W, H, 4, 2)
    assert d["jpeg_quality"] == 90  # every default a request can leave unset
    assert info.limits["max_num_frames"] == 16 and info.limits["max_width"] == 256
    assert info.limits["max_decode_chunk_size"] == 16
    assert info.max_batch_size == 2 and info.instances == 1
    assert info.config["name"] == MODEL


# -- 8. the CLI -----------------------------------------------------------------------------------


def _module_cli() -> list[str]:
    return [sys.executable, "-m", "videogen_client.cli"]


def _installed_cli() -> list[str]:
    # The command installed next to this interpreter; a `videogen` elsewhere on PATH may be another install.
    found = shutil.which("videogen", path=sysconfig.get_path("scripts")) or shutil.which("videogen")
    return [found] if found else _module_cli()


def cli(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(launcher or _installed_cli()), *args], capture_output=True, text=True, timeout=120)


def test_cli_generate_writes_mp4_and_frames(tiny_server, tmp_path):
    image = tmp_path / "sample.png"
    image.write_bytes(SAMPLE)
    out, frames_dir = tmp_path / "OUT.mp4", tmp_path / "DIR"
    proc = cli("generate", "--target", tiny_server.target, "--model", MODEL, "--image", str(image),
               "--out", str(out), "--frames-dir", str(frames_dir), "--num-frames", "3", "--steps", "1",
               "--seed", "1", "--timeout", "60")
    assert proc.returncode == 0, proc.stderr
    assert "seed=1 frames=3" in proc.stdout and f"out={out}" in proc.stdout
    assert decode_mp4(out.read_bytes())[0] == 3
    assert sorted(p.name for p in frames_dir.iterdir()) == [f"frame_{i:05d}.png" for i in range(3)]
    # without --seed the server draws one, and the CLI says which: given back, it makes the same video
    # (the help promised it; only the server's log had it)
    drawn, again = tmp_path / "DRAWN", tmp_path / "AGAIN"
    proc = cli("generate", "--target", tiny_server.target, "--model", MODEL, "--image", str(image),
               "--frames-dir", str(drawn), "--num-frames", "2", "--steps", "1", "--timeout", "60")
    assert proc.returncode == 0, proc.stderr
    seed = re.search(r" seed=(\d+) ", proc.stdout)
    assert seed and seed.group(1) != "1", proc.stdout
    proc = cli("generate", "--target", tiny_server.target, "--model", MODEL, "--image", str(image),
               "--frames-dir", str(again), "--num-frames", "2", "--steps", "1", "--seed", seed.group(1),
               "--timeout", "60")
    assert proc.returncode == 0 and f" seed={seed.group(1)} " in proc.stdout, (proc.stdout, proc.stderr)
    assert [p.read_bytes() for p in sorted(drawn.iterdir())] == [p.read_bytes() for p in sorted(again.iterdir())]
    assert (drawn / "frame_00000.png").read_bytes() != (frames_dir / "frame_00000.png").read_bytes()
    # the MP4 alone (no frame streamed one by one): the line still counts the video's frames (it said 0)
    proc = cli("generate", "--target", tiny_server.target, "--model", MODEL, "--image", str(image),
               "--out", str(out), "--num-frames", "2", "--steps", "1", "--timeout", "60")
    assert proc.returncode == 0 and "frames=2" in proc.stdout, (proc.stdout, proc.stderr)
    with Image.open(frames_dir / "frame_00002.png") as png:
        assert png.size == (W, H)


@pytest.mark.parametrize("launcher", [_installed_cli, _module_cli], ids=["command", "module"])
def test_cli_models_lists_the_model(tiny_server, launcher):
    proc = cli("models", "--target", tiny_server.target, launcher=launcher())
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout  # the header and the one model
    assert lines[0].split()[:2] == ["NAME", "STATE"]
    assert lines[1].split()[:3] == [MODEL, "ready", "1"]


def test_cli_whose_reader_went_away_exits_quietly(tiny_server):
    """`videogen models | head -1`: a reader that closed the pipe ends the command as SIGPIPE ends a tool
    (status 141), without an error message (it printed "error: [Errno 32] Broken pipe", status 1)."""
    import os

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe's stdout, block-buffered
    try:
        proc = subprocess.run([*_installed_cli(), "models", "--target", tiny_server.target], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120, env=env)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc


def test_cli_model_prints_json(tiny_server):
    proc = cli("model", MODEL, "--target", tiny_server.target)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["name"] == MODEL and info["state"] == "ready" and info["defaults"]["num_frames"] == 4


def test_cli_bad_argument_exits_1(tiny_server, tmp_path):
    image = tmp_path / "sample.png"
    image.write_bytes(SAMPLE)
    out = tmp_path / "OUT.mp4"
    proc = cli("generate", "--target", tiny_server.target, "--model", MODEL, "--image", str(image),
               "--out", str(out), "--width", "63", "--steps", "1", "--quiet")
    assert proc.returncode == 1
    assert "error: INVALID_ARGUMENT [INVALID_FIELD]: width: " in proc.stderr
    assert not out.exists()

    missing = cli("model", "no-such-model", "--target", tiny_server.target)
    assert missing.returncode == 1 and "error: NOT_FOUND [MODEL_NOT_FOUND]: " in missing.stderr
    # a field the server names that the option spells otherwise: the option is named too
    steps = cli("generate", "--target", tiny_server.target, "--model", MODEL, "--image", str(image),
                "--out", str(out), "--steps", "0", "--quiet")
    assert steps.returncode == 1 and "num_inference_steps: " in steps.stderr, steps.stderr
    assert steps.stderr.rstrip().endswith("(the --steps option)"), steps.stderr

    # a command line argparse refuses exits 2 without contacting the server
    usage = cli("generate", "--target", tiny_server.target, "--image", str(image))
    assert usage.returncode == 2 and "--out" in usage.stderr
    no_image = cli("generate", "--target", tiny_server.target, "--model", MODEL, "--image", str(tmp_path / "none.png"),
                   "--out", str(out))
    assert no_image.returncode == 2 and "--image: cannot read " in no_image.stderr, no_image.stderr
    a_folder = cli("generate", "--target", tiny_server.target, "--model", MODEL, "--image", str(tmp_path), "--out", str(out))
    assert a_folder.returncode == 2 and "--image: " in a_folder.stderr and "is a directory" in a_folder.stderr
    no_model = cli("generate", "--target", tiny_server.target, "--model", "", "--image", str(image), "--out", str(out))
    assert no_model.returncode == 2 and "--model: empty" in no_model.stderr, no_model.stderr
    # a TLS file that is not PEM is a bad argument (gRPC failed each handshake with it: an outage, retried)
    not_pem = cli("models", "--target", tiny_server.target, "--ca-cert", str(image))
    assert not_pem.returncode == 2 and "--ca-cert: " in not_pem.stderr and "is not PEM" in not_pem.stderr
    # a host name that does not resolve is no bad argument: the resolver may answer later
    unresolved = cli("models", "--target", f"{tiny_server.target},no-such-host.invalid:1")
    assert unresolved.returncode == 1 and "cannot resolve target host 'no-such-host.invalid'" in unresolved.stderr

    # outputs that cannot be written are refused before the server generates (they were found after, and
    # the video lost)
    before = tiny_server.metric("videogen_requests_total", model=MODEL)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for flags, says in ((["--out", str(tmp_path)], "is a directory"),
                        (["--frames-dir", str(a_file)], "not a directory"),
                        (["--out", str(a_file / "v.mp4")], "not a directory"),
                        # permission bits pass (root, here), yet nothing can be created there
                        (["--out", "/proc/videogen-out.mp4"], "cannot write in /proc")):
        proc = cli("generate", "--target", tiny_server.target, "--model", MODEL, "--image", str(image), *flags,
                   "--steps", "1", "--quiet")
        assert proc.returncode == 2 and says in proc.stderr, (flags, proc.stderr)
    assert tiny_server.metric("videogen_requests_total", model=MODEL) == before


def test_cli_output_that_fails_to_write_leaves_the_previous_file_whole(tiny_server, tmp_path):
    """The MP4 and frames are written under a temporary name and renamed: a write that fails (here the
    file size limit, as a full disk would) leaves the previous output as it was, not a truncated file
    that a pipeline checking "does it exist" would pick up (client review)."""
    image = tmp_path / "sample.png"
    image.write_bytes(SAMPLE)
    out, frames = tmp_path / "out.mp4", tmp_path / "frames"
    frames.mkdir()
    out.write_bytes(b"the previous video")
    (frames / "frame_00000.png").write_bytes(b"the previous frame")
    command = " ".join(shlex.quote(a) for a in [*_installed_cli(), "generate", "--target", tiny_server.target,
                                                "--model", MODEL, "--image", str(image), "--num-frames", "4",
                                                "--steps", "1", "--quiet"])
    for flags in (f"--out {shlex.quote(str(out))}", f"--frames-dir {shlex.quote(str(frames))}"):
        # 1 KiB: above neither output's previous content, below any new video or frame
        proc = subprocess.run(["bash", "-c", f"ulimit -f 1; exec {command} {flags}"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1 and "File too large" in proc.stderr, proc.stderr
    assert out.read_bytes() == b"the previous video"
    assert (frames / "frame_00000.png").read_bytes() == b"the previous frame"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "out.mp4", "sample.png"]  # no temporary left
    assert [p.name for p in frames.iterdir()] == ["frame_00000.png"]


def test_outputs_are_written_through_links_devices_and_pipes(client, tiny_server, tmp_path):
    """Writing under a temporary name and renaming must not replace what is not a plain file: a rename
    turned a root's /dev/null into a regular file, replaced the symlink /dev/stdout (a pipe got
    nothing), a FIFO, a link's target or a hard link's shared file (review of the change). Those are
    written through; a replaced file keeps its mode; a result without frames saves none (it removed the
    folder's frames)."""
    import os
    import stat
    import threading

    result = client.run(SAMPLE, model=MODEL, num_frames=2, num_inference_steps=1)
    (tmp_path / "real.mp4").write_bytes(b"old")
    os.symlink(tmp_path / "real.mp4", tmp_path / "link.mp4")
    save_video(result, tmp_path / "link.mp4")
    assert (tmp_path / "link.mp4").is_symlink() and (tmp_path / "real.mp4").read_bytes() == result.video
    (tmp_path / "mode.mp4").write_bytes(b"old")
    os.chmod(tmp_path / "mode.mp4", 0o640)
    save_video(result, tmp_path / "mode.mp4")
    assert stat.S_IMODE(os.stat(tmp_path / "mode.mp4").st_mode) == 0o640
    (tmp_path / "one.mp4").write_bytes(b"old")
    os.link(tmp_path / "one.mp4", tmp_path / "two.mp4")
    save_video(result, tmp_path / "one.mp4")
    assert (tmp_path / "two.mp4").read_bytes() == result.video
    os.symlink(tmp_path / "made.mp4", tmp_path / "dangling.mp4")  # the file it names is made, the link kept
    save_video(result, tmp_path / "dangling.mp4")
    assert (tmp_path / "dangling.mp4").is_symlink() and (tmp_path / "made.mp4").read_bytes() == result.video
    os.mkfifo(tmp_path / "fifo")
    got: list = []
    reader = threading.Thread(target=lambda: got.append((tmp_path / "fifo").read_bytes()))
    reader.start()
    save_video(result, tmp_path / "fifo")
    reader.join(10)
    assert got == [result.video] and stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    frames = tmp_path / "frames"
    save_frames(result, frames)
    with pytest.raises(ValueError, match="no frames"):
        save_frames(client.run(SAMPLE, model=MODEL, num_frames=2, num_inference_steps=1, frame_encoding="none"),
                    frames)
    assert len(list(frames.iterdir())) == 2

    # the CLI into a pipe: the MP4 alone on stdout (the summary line goes to stderr)
    image = tmp_path / "in.png"
    image.write_bytes(SAMPLE)
    piped = subprocess.run([*_installed_cli(), "generate", "--target", tiny_server.target, "--model", MODEL,
                            "--image", str(image), "--num-frames", "2", "--steps", "1", "--quiet",
                            "--out", "/dev/stdout"], capture_output=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert decode_mp4(piped.stdout)[0] == 2 and b"request_id=" in piped.stderr


def _as_nobody(code: str, *args: str) -> subprocess.CompletedProcess:
    """Python `code` run as nobody (setpriv), where permissions refuse as they do for a user; skips the
    test where nobody cannot import the client (an installation only root can read)."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c"]
    probe = subprocess.run([*nobody, "import videogen_client"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot import the client here: {probe.stderr[-300:]!r}")
    return subprocess.run([*nobody, code, *args], capture_output=True, text=True, timeout=60)


NOBODY_WRITES = """
import pathlib, sys
from videogen_client.cli import _unwritable
from videogen_client.events import _replace
for name in sys.argv[1:]:
    assert _unwritable(name, "--out", directory=False) is None, name
    _replace(pathlib.Path(name), lambda t: t.write_bytes(b"new"))
print("ok")
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to run as nobody (setpriv)")
def test_an_output_whose_folder_takes_no_new_file_is_written_in_place(tmp_path):
    """Write-then-rename needs the folder to take a temporary file and the rename to be allowed; a plain
    write does not. A writable file in a folder the caller cannot write, or another user's file in a
    sticky folder (/tmp), could no longer be written, and the CLI found out after the generation (review
    of the change). They are written in place, and the CLI's check agrees. Run as nobody: as root,
    permissions do not refuse."""
    import stat
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        (locked := base / "locked").mkdir(mode=0o755)
        (sticky := base / "sticky").mkdir()
        os.chmod(sticky, 0o1777)
        files = [locked / "open.mp4", sticky / "others.mp4"]
        for f in files:
            f.write_bytes(b"old")
            os.chmod(f, 0o666)
        proc = _as_nobody(NOBODY_WRITES, *map(str, files))
        assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
        assert [f.read_bytes() for f in files] == [b"new", b"new"]
        assert sorted(p.name for p in locked.iterdir()) == ["open.mp4"] and len(list(sticky.iterdir())) == 1
        assert stat.S_IMODE(os.stat(files[1]).st_mode) == 0o666
    finally:
        shutil.rmtree(base)


# -- 9. the client imports without the server's stack ----------------------------------------------


def test_client_imports_without_torch():
    code = ("import sys, videogen_client, videogen_client.cli; "
            "heavy = [m for m in ('torch', 'numpy', 'diffusers', 'av') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- 10. what a calling service meets at the edges (found by review) -------------------------------


def test_ids_and_timeouts_the_client_cannot_send_are_refused_naming_them(client, tiny_server, tmp_path):
    """gRPC refuses metadata that is not printable ASCII locally, as INTERNAL "Invalid metadata" (which
    reads as a server failure); a deadline of infinity failed at once. The client checks both first."""
    for bad in ("é", "a\nb", "x" * 129):
        with pytest.raises(InvalidArgumentError) as err:
            client.run(SAMPLE, model=MODEL, request_id=bad)
        assert err.value.field == "request_id"
    assert client.list_models(timeout=float("inf"))[0].name == MODEL  # no deadline
    with VideoGenClient(tiny_server.target, timeout=float("inf")) as forever:
        assert forever.run(SAMPLE, model=MODEL, num_frames=1, num_inference_steps=1).summary.num_frames == 1
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            client.list_models(timeout=bad)
    with pytest.raises(ValueError, match="queue_timeout"):
        client.run(SAMPLE, model=MODEL, queue_timeout=float("inf"))
    # a finite one beyond the field's range (it was "timeout_microseconds: Value out of range"): the model's
    assert client.run(SAMPLE, model=MODEL, queue_timeout=1e300, num_frames=1, num_inference_steps=1).frames
    with pytest.raises(ValueError, match="resize_mode"):
        client.run(SAMPLE, model=MODEL, resize_mode="fill")
    cropped = client.run(SAMPLE, model=MODEL, num_frames=1, num_inference_steps=1, resize_mode="crop", width=32,
                         height=64)
    assert cropped.accepted.parameters["resize_mode"] == "crop" and len(cropped.frames) == 1
    image = tmp_path / "sample.png"
    image.write_bytes(SAMPLE)
    for flag, value, status in (("--queue-timeout", "inf", 2), ("--request-id", "é", 1)):
        proc = cli("generate", "--target", tiny_server.target, "--model", MODEL, "--image", str(image),
                   "--out", str(tmp_path / "x.mp4"), flag, value, "--quiet")
        assert proc.returncode == status and flag[2:].replace("-", "_") in proc.stderr.replace("-", "_"), proc.stderr
        assert "Traceback" not in proc.stderr and "Invalid metadata" not in proc.stderr


def test_async_client_ids_and_closing(tiny_server):
    """The asyncio client refuses the same ids; a call in flight when the client closes ends with
    RequestCancelledError (as in the sync client: not a CancelledError of a task nobody cancelled), and
    calls on a closed client raise ValueError in both clients."""
    from videogen_client import RequestCancelledError

    async def scenario():
        aclient = AsyncVideoGenClient(tiny_server.target, timeout=TIMEOUT)
        with pytest.raises(InvalidArgumentError):
            await aclient.run(SAMPLE, model=MODEL, request_id="é")

        async def consume():
            async for _ in aclient.generate(SAMPLE, model=MODEL, num_frames=8, num_inference_steps=40):
                started.set()

        started = asyncio.Event()
        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), TIMEOUT)
        await aclient.close()
        with pytest.raises(RequestCancelledError):
            await task
        assert not task.cancelled()
        with pytest.raises(ValueError, match="closed"):
            await aclient.list_models()
        # a generator made before close() and iterated after it (was grpc.aio.UsageError)
        async with AsyncVideoGenClient(tiny_server.target, timeout=TIMEOUT) as short_lived:
            late = short_lived.generate(SAMPLE, model=MODEL, num_frames=1, num_inference_steps=1)
        with pytest.raises(ValueError, match="closed"):
            await late.__anext__()

    asyncio.run(scenario())
    sync = VideoGenClient(tiny_server.target)
    late = sync.generate(SAMPLE, model=MODEL, num_frames=1, num_inference_steps=1)
    sync.close()
    with pytest.raises(ValueError, match="closed"):
        sync.list_models()
    with pytest.raises(ValueError, match="is closed"):  # was grpc's "Cannot invoke RPC: Channel closed!"
        next(late)


def test_a_request_over_the_servers_size_limit_is_invalid_argument_on_image(tiny_model_source, tmp_path):
    """gRPC refuses a message over the server's --max-request-bytes as RESOURCE_EXHAUSTED, which read as
    "queue full" (retry later); it is the image's size."""
    from ..helpers import ServerThread

    shutil.copytree(tiny_model_source, tmp_path / "repo" / MODEL)
    big = np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    assert len(buf.getvalue()) > 1 << 20
    with ServerThread(tmp_path / "repo", max_request_bytes=1 << 20) as server:
        with VideoGenClient(server.target, timeout=TIMEOUT, retry=False) as small:
            with pytest.raises(InvalidArgumentError) as err:
                small.run(buf.getvalue(), model=MODEL, num_frames=1, num_inference_steps=1)
            assert err.value.field == "image" and "larger than" in err.value.reason
            assert small.run(SAMPLE, model=MODEL, num_frames=1, num_inference_steps=1).summary.num_frames == 1


def test_a_response_over_the_clients_own_limit_is_not_the_image_and_not_sent_again(tiny_server):
    """This client's gRPC refusing a response over its grpc.max_receive_message_length read as "image: the
    request is larger than the server accepts", and as a refusal before any work, so the client sent the
    generation again: four admitted requests for one call."""
    from videogen_client import QueueFullError, VideoGenError

    before = tiny_server.metric("videogen_requests_total", model=MODEL)
    with VideoGenClient(tiny_server.target, timeout=TIMEOUT,
                        options=[("grpc.max_receive_message_length", 60)]) as tight:
        with pytest.raises(VideoGenError) as err:
            tight.run(SAMPLE, model=MODEL, num_frames=1, num_inference_steps=1)
    assert not isinstance(err.value, (InvalidArgumentError, QueueFullError)), repr(err.value)
    assert "grpc.max_receive_message_length" in str(err.value)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    deadline = time.monotonic() + 10
    while tiny_server.metric("videogen_inflight_requests", model=MODEL) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tiny_server.metric("videogen_requests_total", model=MODEL) - before == 1  # one request, not retried


def test_a_pil_image_is_sent_as_its_file_would_be_read(client):
    """A PIL image went as a PNG of its stored pixels: a phone photo's EXIF orientation (which the
    server applies to a file) was lost, so Image.open(path) made a sideways video where path made an
    upright one; and a CMYK image failed in the client ("cannot write mode CMYK as PNG")."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(pixels).save(rotated, format="JPEG", quality=95, exif=exif)
    cmyk = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(cmyk, format="JPEG", quality=95)
    params = dict(num_frames=1, num_inference_steps=1, width=W, height=H, seed=4, frame_encoding="raw_rgb",
                  stream_video=False)

    def frames(image) -> np.ndarray:
        return np.stack([np.asarray(f.to_pil()) for f in client.run(image, model=MODEL, **params).frames])

    for data in (rotated.getvalue(), cmyk.getvalue()):
        with Image.open(io.BytesIO(data)) as opened:
            assert np.array_equal(frames(opened), frames(data))
    with Image.open(io.BytesIO(rotated.getvalue())) as opened:
        upright = np.asarray(Image.open(io.BytesIO(image_bytes(opened))))
    assert upright.shape[:2] == (80, 48)  # the 80x48 photo stands 48 wide, 80 high
    # 16-bit samples in any byte order stay 16-bit (Pillow's direct I;16L -> I;16 clips at 255)
    for mode in ("I;16L", "I;16N", "I;16B", "I"):
        deep = Image.new(mode, (2, 1))
        deep.putpixel((0, 0), 30000)
        sent = Image.open(io.BytesIO(image_bytes(deep)))
        assert (sent.mode, sent.getpixel((0, 0))) == ("I;16", 30000), mode
    for mode in ("La", "PA", "RGBa", "F", "YCbCr"):  # modes PNG cannot hold: converted, not an error
        assert Image.open(io.BytesIO(image_bytes(Image.new(mode, (4, 4))))).mode in ("LA", "RGB"), mode


def test_out_of_memory_is_its_own_error_and_models_not_loaded_have_no_defaults(make_repo):
    """A request that does not fit the device (the server's fault injection stands in for a GPU's
    out-of-memory) is OutOfMemoryError, not QueueFullError (retrying will not help); a model whose
    config the server has not read reports empty defaults and limits, not zeros."""
    from videogen_client import OutOfMemoryError, QueueFullError

    from ..helpers import TINY_PARAMETERS, ServerThread, tiny_config

    cfg = tiny_config("m", parameters=TINY_PARAMETERS + 'parameters { key: "fault_injection" '
                                                        'value { string_value: "oom@1:seed=666" } }')
    with ServerThread(make_repo({"m": cfg, "idle": None}), model_control_mode="explicit",
                      load_models=("m",)) as server:
        with VideoGenClient(server.target, timeout=TIMEOUT) as c:
            with pytest.raises(OutOfMemoryError) as err:
                c.run(SAMPLE, model="m", seed=666, num_frames=1, num_inference_steps=1)
            assert not isinstance(err.value, QueueFullError) and err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            idle = c.get_model("idle")
            assert idle.state == "unavailable" and idle.defaults == {} and idle.limits == {}
            assert c.get_model("m").defaults["num_frames"] > 0


def test_async_unary_calls_in_flight_when_the_client_closes(tmp_path):
    """close() ends the calls in flight with RequestCancelledError, unary ones too (a server that answers
    ListModels slowly stands in for a busy one): not a CancelledError in a task nobody cancelled."""
    import threading
    from concurrent import futures

    from videogen.v1 import videogen_pb2_grpc as pb_grpc
    from videogen_client import RequestCancelledError

    release = threading.Event()

    class Slow(pb_grpc.VideoGenServicer):
        def ListModels(self, request, context):
            release.wait(10)
            return pb.ListModelsResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_VideoGenServicer_to_server(Slow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        async def scenario():
            client = AsyncVideoGenClient(f"127.0.0.1:{port}", timeout=TIMEOUT, retry=False)
            task = asyncio.create_task(client.list_models())
            await asyncio.sleep(0.3)
            await client.close()
            with pytest.raises(RequestCancelledError):
                await task
            assert not task.cancelled()

        asyncio.run(scenario())
    finally:
        release.set()
        server.stop(0)


def test_wait_until_ready_waits_for_the_server_and_the_model(make_repo):
    """A caller starting beside the server (compose, a job) had no way to wait for it: each call failed at
    once, first 'connection refused', then 'model is not ready', until the server had loaded."""
    import socket
    import threading

    from videogen_client import DeadlineExceededError, UnavailableError

    from ..helpers import ServerThread, tiny_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = make_repo({MODEL: None, "broken": tiny_config("broken", parameters='parameters { key: "x" }')})
    answers: dict = {}

    def wait() -> None:
        with VideoGenClient(f"127.0.0.1:{port}") as early:
            try:
                answers["info"] = early.wait_until_ready(MODEL, timeout=120, poll_interval=0.1)
            except Exception as err:  # noqa: BLE001 - reported below
                answers["error"] = err

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(1.5)  # nothing listens yet
    assert waiter.is_alive()
    with ServerThread(repo, port=port) as server:
        waiter.join(60)
        assert not waiter.is_alive() and "error" not in answers, answers
        assert answers["info"].name == MODEL and answers["info"].state == "ready"
        with VideoGenClient(server.target, timeout=TIMEOUT) as client:
            assert client.run(SAMPLE, model=MODEL, num_frames=1, num_inference_steps=1).summary.num_frames == 1
            with pytest.raises(ModelNotFoundError):  # a name the server does not know: at once
                client.wait_until_ready("no-such-model", timeout=60)
            # failed to load: waiting will not help; the message says why (the config's error)
            with pytest.raises(UnavailableError, match="broken.*failed to load: .*unknown parameter"):
                client.wait_until_ready("broken", timeout=60)
            with pytest.raises(ValueError, match="poll_interval"):
                client.wait_until_ready(MODEL, poll_interval=0)

        async def asynchronously():
            async with AsyncVideoGenClient(server.target) as aclient:
                return await aclient.wait_until_ready(MODEL, timeout=30)

        assert asyncio.run(asynchronously()).state == "ready"
        proc = cli("wait-ready", MODEL, "--target", server.target, "--timeout", "30")
        assert proc.returncode == 0 and f"{MODEL} ready (versions 1)" in proc.stdout, proc.stderr
        proc = cli("wait-ready", "broken", "--target", server.target, "--timeout", "30")
        assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr and "failed to load" in proc.stderr
    started = time.monotonic()
    with VideoGenClient(f"127.0.0.1:{port}") as nobody:  # the server has gone: the wait ends at its timeout,
        # saying that nothing answered and why (it said "model not ready (Deadline Exceeded)": client review)
        with pytest.raises(DeadlineExceededError, match="not ready after 1 s \\(no answer from the server: .*onnect"):
            nobody.wait_until_ready(MODEL, timeout=1)
    assert time.monotonic() - started < 10


def test_closing_the_client_during_wait_until_ready_ends_it_as_cancelled(make_repo):
    """Closing the client while wait_until_ready slept between polls raised ValueError("... is closed")
    from the next poll; a call in flight when the client closes ends with RequestCancelledError, as
    README says (client review)."""
    import threading

    from videogen_client import RequestCancelledError

    from ..helpers import ServerThread

    with ServerThread(make_repo({MODEL: None}), model_control_mode="explicit") as server:  # nothing loaded
        client = VideoGenClient(server.target)
        threading.Timer(0.5, client.close).start()
        with pytest.raises(RequestCancelledError):
            client.wait_until_ready(MODEL, timeout=30, poll_interval=0.2)

        async def asynchronously() -> None:
            aclient = AsyncVideoGenClient(server.target)
            asyncio.get_running_loop().call_later(0.5, lambda: asyncio.ensure_future(aclient.close()))
            await aclient.wait_until_ready(MODEL, timeout=30, poll_interval=0.2)

        with pytest.raises(RequestCancelledError):
            asyncio.run(asynchronously())


def test_load_and_unload_models_from_the_sdk_and_the_cli(make_repo, tiny_server):
    """The SDK had no way to call LoadModel/UnloadModel, which README documents (Triton's client has
    load_model/unload_model): both clients and the CLI now do, on a server with explicit model control."""
    from videogen_client import ModelConfigError, PermissionDeniedError, UnavailableError

    from ..helpers import ServerThread

    with VideoGenClient(tiny_server.target, timeout=TIMEOUT) as fixed:  # --model-control-mode none
        with pytest.raises(PermissionDeniedError) as refused:  # typed (a bare VideoGenError before: API audit)
            fixed.load_model(MODEL)
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    repo = make_repo({MODEL: None})
    with ServerThread(repo, model_control_mode="explicit") as server:
        with VideoGenClient(server.target, timeout=TIMEOUT) as client:
            assert client.get_model(MODEL).state == "unavailable"
            info = client.load_model(MODEL)
            assert info.name == MODEL and info.state == "ready" and [v.version for v in info.versions] == [1]
            assert client.run(SAMPLE, model=MODEL, num_frames=1, num_inference_steps=1).summary.num_frames == 1

            async def unload() -> str:
                async with AsyncVideoGenClient(server.target, timeout=TIMEOUT) as aclient:
                    await aclient.unload_model(MODEL)
                    return (await aclient.get_model(MODEL)).state

            assert asyncio.run(unload()) == "unavailable"
            with pytest.raises(UnavailableError):
                client.run(SAMPLE, model=MODEL, num_frames=1, num_inference_steps=1)
        loaded = cli("load", MODEL, "--target", server.target)
        assert loaded.returncode == 0 and json.loads(loaded.stdout)["state"] == "ready", loaded.stderr
        unloaded = cli("unload", MODEL, "--target", server.target)
        assert unloaded.returncode == 0 and f"{MODEL} unloaded" in unloaded.stdout, unloaded.stderr
        missing = cli("load", "no-such-model", "--target", server.target)
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
        # a config the server refuses: typed, naming its file and field
        from ..helpers import tiny_config

        (repo / MODEL / "config.pbtxt").write_text(tiny_config(MODEL, "max_batch_size: -1"))
        with VideoGenClient(server.target, timeout=TIMEOUT) as client, pytest.raises(ModelConfigError) as bad:
            client.load_model(MODEL)
        assert bad.value.field == "max_batch_size" and bad.value.file.endswith("config.pbtxt"), bad.value


def test_outputs_through_a_shell_redirection_and_links_to_new_folders(client, tiny_server, tmp_path):
    """From a review of the SDK and CLI: `--out /dev/stdout` with stdout sent to a file (`>>`, or a
    `{ ...; } > f` group) replaced that file, losing what came before and after; a link whose file's
    folder did not exist passed the CLI's check and then failed after the generation; a symbolic link
    loop, and --out and --frames-dir naming one path, too."""
    import os

    result = client.run(SAMPLE, model=MODEL, num_frames=2, num_inference_steps=1)
    os.symlink(tmp_path / "new" / "folder" / "made.mp4", tmp_path / "far.mp4")
    save_video(result, tmp_path / "far.mp4")
    assert (tmp_path / "new" / "folder" / "made.mp4").read_bytes() == result.video

    image = tmp_path / "in.png"
    image.write_bytes(SAMPLE)
    command = [*_installed_cli(), "generate", "--target", tiny_server.target, "--model", MODEL, "--image",
               str(image), "--num-frames", "2", "--steps", "1", "--quiet"]
    log = tmp_path / "log.bin"
    log.write_bytes(b"header\n")
    with open(log, "ab") as appended:
        proc = subprocess.run([*command, "--out", "/dev/stdout"], stdout=appended, stderr=subprocess.PIPE,
                              timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(log, "ab") as appended:
        appended.write(b"trailer\n")
    data = log.read_bytes()
    assert data.startswith(b"header\n") and data.endswith(b"trailer\n")
    assert decode_mp4(data[len(b"header\n"):-len(b"trailer\n")])[0] == 2

    os.symlink(tmp_path / "loop.mp4", tmp_path / "loop.mp4")
    refused = cli(*command[len(_installed_cli()):], "--out", str(tmp_path / "loop.mp4"))
    assert refused.returncode == 2 and "--out: cannot write" in refused.stderr, refused.stderr
    same = tmp_path / "both"
    refused = cli(*command[len(_installed_cli()):], "--out", str(same), "--frames-dir", str(same))
    assert refused.returncode == 2 and "same path" in refused.stderr, refused.stderr
    assert not same.exists()


NOBODY_CHECKS = """
import sys
from videogen_client.cli import _unwritable
print(_unwritable(sys.argv[1], "--out", directory=False))
print(_unwritable(sys.argv[2], "--frames-dir", directory=True))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to run as nobody (setpriv)")
def test_the_cli_check_names_outputs_it_may_not_reach_or_replace(tmp_path):
    """A folder on the way the caller may not enter crashed the CLI's check with a traceback (exit 1, not
    the usage error it is), and an earlier video's frame the caller may not replace passed the check,
    the generation then failing to save (SDK review). Run as nobody: as root, permissions do not refuse."""
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        (closed := base / "closed").mkdir(mode=0o700)  # root's: nobody may not enter it
        (frames := base / "frames").mkdir(mode=0o777)
        (frames / "frame_00000.png").write_bytes(b"root's")
        os.chmod(frames / "frame_00000.png", 0o644)
        proc = _as_nobody(NOBODY_CHECKS, str(closed / "sub" / "out.mp4"), str(frames))
        assert proc.returncode == 0, proc.stderr
        out_problem, frames_problem = proc.stdout.splitlines()
        assert out_problem.startswith("--out: cannot write") and "Permission denied" in out_problem
        assert frames_problem == f"--frames-dir: {frames / 'frame_00000.png'} is not writable"
    finally:
        shutil.rmtree(base)
