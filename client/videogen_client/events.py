"""Events streamed by a generation, and the result of a whole run.

``VideoGenClient.generate`` yields, in order: one :class:`Accepted`, one :class:`Progress` per
denoising step, then for each VAE decode chunk its :class:`Frame` s in index order (whole: frames
the server split into parts are put back together first) followed by the :class:`VideoChunk` s of
the MP4 encoded by then, and one :class:`Summary`::

    for event in client.generate("cat.png", model="svd-xt"):
        match event:
            case Progress(step=step, num_steps=total):
                print(f"step {step}/{total}")
            case Frame() as frame:
                frame.to_pil().save(f"frame_{frame.index:05d}.png")

:class:`ResultBuilder` (or :func:`collect`) folds the events into a :class:`GenerationResult`, and
:func:`save_video` / :func:`save_frames` write one to disk.
"""
from __future__ import annotations

import errno
import io
import os
import re
import secrets
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeAlias, Union

from PIL import Image
from videogen.v1 import videogen_pb2

from videogen_client._proto import FRAME_PAYLOAD_ENCODINGS, FramePayloadEncoding, scalar_fields
from videogen_client.errors import ProtocolError

__all__ = [
    "Accepted",
    "Event",
    "EventDecoder",
    "Frame",
    "GenerationResult",
    "Progress",
    "ResultBuilder",
    "Summary",
    "VideoChunk",
    "collect",
    "decode_responses",
    "save_frames",
    "save_video",
]


@dataclass(frozen=True)
class Accepted:
    """The server admitted the request; always the first event.

    ``parameters`` are the values the request runs with after the model's defaults were applied
    (the ResolvedParameters fields: width, height, num_frames, num_inference_steps, fps,
    motion_bucket_id, noise_aug_strength, min_guidance_scale, max_guidance_scale, seed,
    decode_chunk_size, frame_encoding ("png"/"jpeg"/"raw_rgb"/"none"), jpeg_quality,
    stream_video, video_fps). ``parameters["seed"]`` is the seed to pass to reproduce the video.

    ``estimated_start_seconds`` / ``estimated_end_seconds``: the server's estimate, at admission, of
    the seconds until an instance starts the request and until its last frame and video are sent (from
    the latest runs of requests of its shape and the work queued ahead); each None where the server does
    not know (fewer than 3 runs of the shape yet, or an instance busy with a shape it has not measured).
    A request the SDK sends again to another server (see ``VideoGenClient``) gets a second Accepted
    when that server resolved it otherwise or gives its own estimate.
    """

    request_id: str
    model: str
    model_version: int
    queue_position: int
    parameters: dict[str, Any]
    estimated_start_seconds: float | None = None
    estimated_end_seconds: float | None = None

    @classmethod
    def from_proto(cls, message: videogen_pb2.Accepted) -> Accepted:
        def seconds(field: str) -> float | None:
            return getattr(message, field) if message.HasField(field) else None

        return cls(request_id=message.request_id, model=message.model,
                   model_version=message.model_version, queue_position=message.queue_position,
                   parameters=scalar_fields(message.parameters),
                   estimated_start_seconds=seconds("estimated_start_seconds"),
                   estimated_end_seconds=seconds("estimated_end_seconds"))


@dataclass(frozen=True)
class Progress:
    """Denoising step ``step`` (1-based) of ``num_steps`` is done."""

    step: int
    num_steps: int
    elapsed_seconds: float  # since the request was accepted

    @classmethod
    def from_proto(cls, message: videogen_pb2.Progress) -> Progress:
        return cls(step=message.step, num_steps=message.num_steps, elapsed_seconds=message.elapsed_seconds)


@dataclass(frozen=True)
class Frame:
    """One whole video frame.

    ``data`` is a PNG or JPEG file, or for "raw_rgb" ``height * width * 3`` bytes of row-major
    8-bit RGB. ``chunk_index`` is the VAE decode chunk the frame came from.
    """

    index: int
    encoding: FramePayloadEncoding
    data: bytes = field(repr=False)
    width: int
    height: int
    chunk_index: int

    def to_pil(self) -> Image.Image:
        """The frame as a PIL image, e.g. ``frame.to_pil().save("frame.png")``."""
        if self.encoding == "raw_rgb":
            return Image.frombytes("RGB", (self.width, self.height), self.data)
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image


@dataclass(frozen=True)
class VideoChunk:
    """A piece of the fragmented MP4: ``data`` belongs at byte ``offset`` of the file."""

    data: bytes = field(repr=False)
    offset: int
    last: bool
    mime_type: str = "video/mp4"

    @classmethod
    def from_proto(cls, message: videogen_pb2.VideoChunk) -> VideoChunk:
        return cls(data=message.data, offset=message.offset, last=message.last,
                   mime_type=message.mime_type or "video/mp4")


@dataclass(frozen=True)
class Summary:
    """Timings and sizes of the finished request; always the last event. Times are in seconds."""

    request_id: str
    num_frames: int
    queue_seconds: float
    image_encode_seconds: float
    denoise_seconds: float
    decode_seconds: float
    video_encode_seconds: float
    total_seconds: float
    first_frame_seconds: float  # accepted -> first frame sent
    peak_memory_bytes: int  # peak device memory of the request (process RSS on CPU)
    video_bytes: int
    batch_size: int  # how many requests shared its denoising batch
    device: str

    @classmethod
    def from_proto(cls, message: videogen_pb2.Summary) -> Summary:
        return cls(**{f.name: getattr(message, f.name) for f in fields(cls)})


#: Anything ``generate`` yields.
Event: TypeAlias = Union[Accepted, Progress, Frame, VideoChunk, Summary]


@dataclass
class _PartialFrame:
    """The parts of one frame received so far."""

    first: videogen_pb2.Frame
    num_parts: int
    encoding: FramePayloadEncoding
    parts: dict[int, bytes] = field(default_factory=dict)


class EventDecoder:
    """Turns GenerateResponse messages into events, putting split frames back together.

    A frame larger than the server's message payload limit arrives as ``num_parts`` Frame messages;
    :meth:`decode` returns ``None`` for every part but the one that completes the frame, and then
    the whole :class:`Frame` (parts concatenated in ``part`` order). Example::

        decoder = EventDecoder()
        for response in stub.Generate(request):
            event = decoder.decode(response)
            if event is not None:
                handle(event)
        decoder.finish()   # ProtocolError if a frame is still missing parts
    """

    def __init__(self) -> None:
        self._partial: dict[int, _PartialFrame] = {}
        #: The request id from the Accepted event, once it was decoded.
        self.request_id: str | None = None

    def decode(self, response: videogen_pb2.GenerateResponse) -> Event | None:
        """The event in ``response``; ``None`` for a part of a frame that is not complete yet, and
        for an event kind this client does not know."""
        kind = response.WhichOneof("event")
        if kind == "accepted":
            accepted = Accepted.from_proto(response.accepted)
            self.request_id = accepted.request_id or None
            return accepted
        if kind == "progress":
            return Progress.from_proto(response.progress)
        if kind == "frame":
            return self._add_frame_part(response.frame)
        if kind == "video":
            return VideoChunk.from_proto(response.video)
        if kind == "summary":
            return Summary.from_proto(response.summary)
        return None  # an event this client does not know (from a newer server): skipped

    def finish(self) -> None:
        """Check that the stream ended with no frame missing parts."""
        if self._partial:
            incomplete = ", ".join(f"{index} ({len(p.parts)}/{p.num_parts} parts)"
                                   for index, p in sorted(self._partial.items()))
            raise self._error(f"the stream ended with frames missing parts: {incomplete}")

    def _add_frame_part(self, message: videogen_pb2.Frame) -> Frame | None:
        num_parts = max(message.num_parts, 1)
        if message.part >= num_parts:
            raise self._error(f"frame {message.index}: part {message.part} of {num_parts} parts")
        partial = self._partial.get(message.index)
        if partial is None:
            encoding = FRAME_PAYLOAD_ENCODINGS.get(message.encoding)
            if encoding is None:
                raise self._error(f"frame {message.index}: unexpected encoding {message.encoding}")
            partial = self._partial[message.index] = _PartialFrame(message, num_parts, encoding)
        elif (num_parts, message.encoding, message.width, message.height) != (
                partial.num_parts, partial.first.encoding, partial.first.width, partial.first.height):
            raise self._error(f"frame {message.index}: parts disagree on num_parts, encoding or size")
        if message.part in partial.parts:
            raise self._error(f"frame {message.index}: part {message.part} arrived twice")
        partial.parts[message.part] = message.data
        if len(partial.parts) < num_parts:
            return None
        del self._partial[message.index]
        return Frame(index=message.index, encoding=partial.encoding,
                     data=b"".join(partial.parts[i] for i in range(num_parts)),
                     width=message.width, height=message.height, chunk_index=message.chunk_index)

    def _error(self, details: str) -> ProtocolError:
        return ProtocolError(details, request_id=self.request_id)


def decode_responses(responses: Iterable[videogen_pb2.GenerateResponse]) -> Iterator[Event]:
    """The events of a stream of GenerateResponse messages, split frames reassembled.

    Example: ``events = list(decode_responses(stub.Generate(request)))``.
    """
    decoder = EventDecoder()
    for response in responses:
        event = decoder.decode(response)
        if event is not None:
            yield event
    decoder.finish()


@dataclass(frozen=True)
class GenerationResult:
    """Everything one generation streamed back.

    ``frames`` are in arrival (= index) order and empty with ``frame_encoding="none"``; ``video``
    is the whole MP4 and empty with ``stream_video=False``; ``progress_count`` is how many Progress
    events arrived (one per denoising step).
    """

    accepted: Accepted
    frames: list[Frame]
    video: bytes = field(repr=False)
    summary: Summary
    progress_count: int

    @property
    def request_id(self) -> str:
        return self.accepted.request_id


class ResultBuilder:
    """Folds events into a :class:`GenerationResult`, checking that the MP4 chunks are contiguous.

    Useful to both watch the events and keep the result::

        builder = ResultBuilder()
        async for event in client.generate(image, model="svd-xt"):
            show_progress(event)
            builder.add(event)
        result = builder.build()
    """

    def __init__(self) -> None:
        self._accepted: Accepted | None = None
        self._frames: list[Frame] = []
        self._video = bytearray()
        self._video_done = False
        self._summary: Summary | None = None
        self._progress_count = 0

    def add(self, event: Event) -> None:
        """Take one event into the result."""
        if isinstance(event, Accepted):
            self._accepted = event
        elif isinstance(event, Progress):
            self._progress_count += 1
        elif isinstance(event, Frame):
            self._frames.append(event)
        elif isinstance(event, VideoChunk):
            if self._video_done:
                raise self._error(f"video chunk at offset {event.offset} after the last chunk")
            if event.offset != len(self._video):
                raise self._error(f"video chunk at offset {event.offset} after {len(self._video)} bytes")
            self._video += event.data
            self._video_done = event.last
        elif isinstance(event, Summary):
            self._summary = event

    def build(self) -> GenerationResult:
        """The result; ProtocolError if the stream lacked its Accepted, Summary or last video chunk."""
        if self._accepted is None or self._summary is None:
            raise self._error("the stream ended without an Accepted and a Summary event")
        if self._video and not self._video_done:
            raise self._error("the stream ended before the video's last chunk")
        return GenerationResult(accepted=self._accepted, frames=list(self._frames), video=bytes(self._video),
                                summary=self._summary, progress_count=self._progress_count)

    def _error(self, details: str) -> ProtocolError:
        return ProtocolError(details, request_id=self._accepted.request_id if self._accepted else None)


def collect(events: Iterable[Event]) -> GenerationResult:
    """Run ``events`` (e.g. ``client.generate(...)``) to the end and return the result."""
    builder = ResultBuilder()
    iterator = iter(events)
    try:
        for event in iterator:
            builder.add(event)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:  # a generator: ends its call now, not when the traceback lets it go
            close()
    return builder.build()


def _replace(path: Path, write: Callable[[Path], None]) -> None:
    """Writes ``path`` through ``write``. A regular file (or a new one) is written under a temporary name
    beside it and renamed over it once complete, so a write that fails (a full disk, an interrupt) leaves
    what was there before, never a truncated file; through a symbolic link (a dangling one too), the file
    it names is written and the link stays; a replaced file keeps its permission bits, and one the
    caller may not write is refused as before. Anything else is written in place, as a plain write
    would: a device or a pipe (``/dev/stdout``, ``/dev/null``), a file with other hard links, and a file
    whose folder takes no new file or whose rename is refused (a bind-mounted output, a sticky folder)."""
    try:
        st: os.stat_result | None = path.stat()  # through symbolic links
    except FileNotFoundError:
        st = None
    if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_nlink > 1):
        write(path)
        return
    if st is not None and not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    target = Path(os.path.realpath(path))  # the file a symbolic link names, whether it exists or not
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # (less the umask, as a new file)
    except OSError:
        write(target)  # the folder takes no new file: in place
        return
    try:
        write(tmp)  # a failure here (a full disk) leaves the old file as it was
        if st is not None:
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        write(target)  # the rename is refused (a mount point, a sticky folder): in place


def save_video(result: GenerationResult, path: str | Path) -> Path:
    """Write the result's MP4 to ``path`` (parent folders are created) and return the path. A file is
    replaced whole or not at all: written beside it under a temporary name, then renamed (a device or a
    pipe is written as it stands; ``/dev/stdout`` or ``/dev/fd/N`` at the stream's position, so a file
    the shell sent it to, with ``>`` or ``>>``, keeps what was written before and after).

    Example: ``save_video(client.run("cat.png", model="svd-xt"), "cat.mp4")``.
    """
    if not result.video:
        raise ValueError("the result has no video (was it generated with stream_video=False?)")
    path = Path(path)
    fd = _standard_stream(path)
    if fd is not None:  # at the stream's position, as a shell redirection writes: a file it was sent to (>,
        if fd == 1:     # >>) keeps what came before and after; opened by name it would be truncated or replaced
            sys.stdout.flush()
        with os.fdopen(os.dup(fd), "wb") as stream:
            stream.write(result.video)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    Path(os.path.realpath(path)).parent.mkdir(parents=True, exist_ok=True)  # a symbolic link's file's folder
    _replace(path, lambda tmp: tmp.write_bytes(result.video))
    return path


def _standard_stream(path: Path) -> int | None:
    """The file descriptor ``path`` names (``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N``), or None."""
    name = str(path)
    named = {"/dev/stdout": 1, "/dev/stderr": 2}
    if name in named:
        return named[name]
    match = re.fullmatch(r"/(?:dev/fd|proc/self/fd)/(\d+)", name)
    return int(match.group(1)) if match else None


_FRAME_FILE = re.compile(r"frame_(\d{5,})\.png")


def save_frames(result: GenerationResult, directory: str | Path) -> list[Path]:
    """Write every frame as ``directory/frame_00000.png`` ... and return the paths in index order.

    PNG frames are written as received; JPEG and raw RGB frames are converted to PNG. Each file is
    replaced whole or not at all (see ``save_video``), and ``frame_NNNNN.png`` files of an earlier
    result that this one does not have (a longer video saved there before) are removed once every
    frame is written, so the folder holds one video's frames. ValueError if the result has none.
    Example: ``save_frames(client.run("cat.png", model="svd-xt"), "frames/")``.
    """
    if not result.frames:
        raise ValueError("the result has no frames (was it generated with frame_encoding='none'?)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for frame in sorted(result.frames, key=lambda f: f.index):
        path = directory / f"frame_{frame.index:05d}.png"
        if frame.encoding == "png":
            _replace(path, lambda tmp: tmp.write_bytes(frame.data))
        else:
            _replace(path, lambda tmp: frame.to_pil().save(tmp, format="PNG"))
        paths.append(path)
    written = {p.name for p in paths}
    for old in directory.iterdir():
        if _FRAME_FILE.fullmatch(old.name) and old.name not in written and old.is_file():
            old.unlink(missing_ok=True)
    return paths
