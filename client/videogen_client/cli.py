"""The ``videogen`` command: generate videos and inspect models on a videogen server.

Examples::

    videogen generate --target localhost:8001 --image cat.png --out cat.mp4 --frames-dir frames/
    videogen models --target localhost:8001
    videogen model svd-xt --target localhost:8001
    videogen generate --target 10.0.0.1:8001 --target 10.0.0.2:8001 --image cat.png --out cat.mp4
    videogen models --target 10.0.0.1:8001,10.0.0.2:8001

Several ``--target`` s (repeated or comma-separated) spread requests over the servers
(round_robin); a request a server refuses before any work (queue full, draining) is retried on
the next one unless ``--no-retry``.

Exit status: 0 on success, 1 when the server or a file refused (``error: <CODE>: <details>`` on
stderr; an INVALID_ARGUMENT the client finds itself too), 2 for bad command-line arguments (values a
request cannot hold included), 130 when interrupted, 141 (a SIGPIPE's) when the reader of its output
went away (``videogen models | head -1``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO, cast

from videogen_client._proto import FrameEncodingName
from videogen_client._request import _SCHEMES, UnresolvedHost
from videogen_client.auth import TokenFile
from videogen_client.client import VideoGenClient
from videogen_client.errors import VideoGenError
from videogen_client.events import (
    _FRAME_FILE,
    Accepted,
    Event,
    Frame,
    Progress,
    ResultBuilder,
    Summary,
    VideoChunk,
    save_frames,
    save_video,
)

__all__ = ["main"]

_TARGET_ENV = "VIDEOGEN_TARGET"
_TOKEN_ENV = "VIDEOGEN_TOKEN"

# generate's options whose request field (as errors name it: "<field>: <reason>") is not spelled as the option
_FLAG_OF_FIELD = {"num_inference_steps": "--steps", "output.frame_encoding": "--frame-encoding",
                  "output.jpeg_quality": "--jpeg-quality", "output.video_fps": "--video-fps",
                  "timeout_microseconds": "--queue-timeout"}


class _ProgressBar:
    """A one-line progress display on a terminal: denoising steps, then frames, then video bytes.

    When the stream is not a terminal it prints a line only as each phase completes.
    """

    _WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._line_length = 0
        self._num_frames = 0
        self._frames = 0
        self._video_bytes = 0

    def update(self, event: Event) -> None:
        if isinstance(event, Accepted):
            wants_frames = event.parameters.get("frame_encoding") != "none"
            self._num_frames = int(event.parameters.get("num_frames", 0)) if wants_frames else 0
            queued = f", seed {event.parameters['seed']}" if "seed" in event.parameters else ""
            if event.queue_position:
                queued += f", queue position {event.queue_position}"
            if event.estimated_end_seconds is not None:
                queued += f", done in ~{event.estimated_end_seconds:.1f}s"
            self._print(f"accepted {event.request_id} ({event.model} v{event.model_version}{queued})")
        elif isinstance(event, Progress):
            self._bar("denoising", event.step, event.num_steps, "steps")
        elif isinstance(event, Frame):
            self._frames += 1
            self._bar("frames   ", self._frames, max(self._num_frames, self._frames), "")
        elif isinstance(event, VideoChunk):
            self._video_bytes += len(event.data)
            if self._tty:
                self._draw(f"video     {self._video_bytes / 1048576:.1f} MiB")
        elif isinstance(event, Summary):
            self.finish()

    def finish(self) -> None:
        """End the line being redrawn, if any."""
        if self._line_length:
            self._stream.write("\n")
            self._stream.flush()
            self._line_length = 0

    def _bar(self, label: str, done: int, total: int, unit: str) -> None:
        filled = self._WIDTH * done // total if total else self._WIDTH
        text = f"{label} [{'#' * filled}{'.' * (self._WIDTH - filled)}] {done}/{total} {unit}".rstrip()
        if self._tty:
            self._draw(text)
        elif done == total:
            self._print(text)

    def _draw(self, text: str) -> None:
        self._stream.write("\r" + text.ljust(self._line_length))
        self._stream.flush()
        self._line_length = len(text)

    def _print(self, text: str) -> None:
        self.finish()
        self._stream.write(text + "\n")
        self._stream.flush()


def _read_pem(parser: argparse.ArgumentParser, path: str | None, flag: str) -> bytes | None:
    """The PEM file a TLS flag names, refused as a bad argument when unreadable or not PEM (gRPC would
    fail each connection's handshake with it instead, which reads as the server being unreachable)."""
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        parser.error(f"{flag}: {err}")
    if b"-----BEGIN " not in data:
        parser.error(f"{flag}: {path} is not PEM (no -----BEGIN block)")
    return data


def _targets(values: Sequence[str]) -> list[str]:
    """The servers of ``--target`` values: each repeated value, comma lists split (a value with a
    resolver scheme, such as ``dns:///name:port`` or ``ipv4:A:P,B:P``, is one target)."""
    targets: list[str] = []
    for value in values:
        text = value.strip()
        if text.lower().startswith(_SCHEMES):
            targets.append(text)
        else:
            targets.extend(part.strip() for part in text.split(","))
    return targets


def _client(args: argparse.Namespace) -> VideoGenClient:
    target: str | list[str] = args.target[0] if len(args.target) == 1 else args.target
    return VideoGenClient(
        target, secure=args.tls or bool(args.ca_cert or args.cert),
        root_certificates=args.ca_cert_pem, private_key=args.key_pem,
        certificate_chain=args.cert_pem, token=args.token, timeout=args.timeout,
        retry=not args.no_retry)


def _unwritable(path: str | Path | None, flag: str, *, directory: bool) -> str | None:
    """Why ``path`` cannot be written as the file (or the folder of files) ``flag`` names; None if it can.
    Checked before the request is sent, so that a generation is not lost to an output it cannot write,
    by what `save_video` and `save_frames` need: a file that exists must be writable (they write it in
    place where its folder takes no new file); a new file, or the frames, need their folder (the nearest
    that exists, when it is to be created) to take a new file: tried by creating one (permission bits
    say nothing for root, nor for a read-only or special file system)."""
    if path is None:
        return None
    path = Path(path)
    try:
        try:
            st: os.stat_result | None = path.stat()  # through symbolic links
        except (FileNotFoundError, NotADirectoryError):  # (a dangling link too; a file on the way: said below)
            st = None
        if st is not None:
            if directory and not stat.S_ISDIR(st.st_mode):
                return f"{flag}: {path} exists and is not a directory"
            if not directory and stat.S_ISDIR(st.st_mode):
                return f"{flag}: {path} is a directory"
            if not directory:
                return None if os.access(path, os.W_OK) else f"{flag}: {path} is not writable"
            # frames of an earlier video are replaced: each must be writable, as a file named by --out
            for old in path.iterdir():
                if _FRAME_FILE.fullmatch(old.name) and not os.access(old, os.W_OK):
                    return f"{flag}: {old} is not writable"
        folder = path if directory else Path(os.path.realpath(path)).parent  # (a dangling link: its file's)
        while not folder.exists() and folder != folder.parent:  # created on save
            folder = folder.parent
        if not folder.is_dir():
            return f"{flag}: {folder} is not a directory"
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            return f"{flag}: cannot write in {folder} ({err.strerror or err})"
    except OSError as err:  # a folder on the way it may not enter, a symbolic link loop, ...
        return f"{flag}: cannot write {path} ({err.strerror or err})"
    return None


def _generate(args: argparse.Namespace) -> int:
    frame_encoding = cast(FrameEncodingName, args.frame_encoding or ("png" if args.frames_dir else "none"))
    progress = None if args.quiet else _ProgressBar(sys.stderr)
    builder = ResultBuilder()
    with _client(args) as client:
        events = client.generate(
            Path(args.image), model=args.model, model_version=args.model_version, width=args.width,
            height=args.height, num_frames=args.num_frames, num_inference_steps=args.steps, fps=args.fps,
            motion_bucket_id=args.motion_bucket_id, noise_aug_strength=args.noise_aug_strength,
            min_guidance_scale=args.min_guidance_scale, max_guidance_scale=args.max_guidance_scale,
            seed=args.seed, decode_chunk_size=args.decode_chunk_size, resize_mode=args.resize_mode,
            frame_encoding=frame_encoding,
            jpeg_quality=args.jpeg_quality, stream_video=args.out is not None, video_fps=args.video_fps,
            request_id=args.request_id, priority=args.priority, queue_timeout=args.queue_timeout)
        try:
            with contextlib.closing(events):
                for event in events:
                    if progress:
                        progress.update(event)
                    builder.add(event)
        finally:
            if progress:
                progress.finish()
    result = builder.build()
    written = []
    if args.out is not None:
        written.append(f"out={save_video(result, args.out)}")
    if args.frames_dir is not None:
        save_frames(result, args.frames_dir)
        written.append(f"frames_dir={args.frames_dir}")
    # the video's frames, whether or not they were streamed one by one (--frame-encoding none without
    # --frames-dir streams the MP4 only); the seed the server drew when --seed was not given, to make
    # the same video again
    print(f"request_id={result.request_id} seed={result.accepted.parameters.get('seed')} "
          f"frames={result.summary.num_frames} seconds={result.summary.total_seconds:.2f} {' '.join(written)}",
          file=sys.stderr if _is_stdout(args.out) else sys.stdout)  # (after the MP4 it would spoil it)
    return 0


def _is_stdout(path: str | None) -> bool:
    """Whether ``path`` is this process's standard output (``--out /dev/stdout | ffplay -``)."""
    if path is None:
        return False
    try:
        a, b = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models()
    rows = [("NAME", "STATE", "VERSIONS", "BACKEND", "MAX_BATCH", "INSTANCES")]
    rows += [(m.name, m.state, ",".join(str(v.version) for v in m.versions) or "-", m.backend or "-",
              str(m.max_batch_size), str(m.instances)) for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _model(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.get_model(args.name)
    print(json.dumps(dataclasses.asdict(info), indent=2))
    return 0


def _load(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.load_model(args.name)
    print(json.dumps(dataclasses.asdict(info), indent=2))
    return 0


def _unload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.unload_model(args.name)
    print(f"{args.name} unloaded")
    return 0


def _wait_ready(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.wait_until_ready(args.name, timeout=args.timeout or 600.0, poll_interval=args.poll_interval)
    print(f"{info.name} ready (versions {','.join(str(v.version) for v in info.versions if v.state == 'ready')})")
    return 0


def _option_hint(args: argparse.Namespace, field: str | None) -> str:
    """The text that names generate's option (" (the --steps option)") where an error names a request
    field that the option spells otherwise; empty for any other error or command."""
    flag = _FLAG_OF_FIELD.get(field or "") if args.command == "generate" else None
    return f" (the {flag} option)" if flag else ""


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument("--target", action="append", metavar="HOST:PORT",
                       help=f"the videogen server (default: ${_TARGET_ENV}); repeat it or give a "
                            "comma-separated list for several servers (round_robin), or a gRPC "
                            "target such as dns:///NAME:PORT")
    group.add_argument("--no-retry", action="store_true",
                       help="do not retry requests refused before any work (queue full, draining, "
                            "unreachable) on another server")
    group.add_argument("--token", default=os.environ.get(_TOKEN_ENV),
                       help=f"bearer token sent as 'authorization: Bearer TOKEN' (default: ${_TOKEN_ENV}); "
                            "visible to other users in the process list: prefer --token-file")
    group.add_argument("--token-file", metavar="FILE",
                       help="read the bearer token from FILE (its first line that is not empty or a # comment; "
                            "e.g. a mounted Kubernetes Secret)")
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--ca-cert", metavar="FILE",
                       help="PEM CA certificates to trust instead of the system's (implies --tls)")
    group.add_argument("--cert", metavar="FILE",
                       help="PEM client certificate chain for mTLS (implies --tls; needs --key)")
    group.add_argument("--key", metavar="FILE", help="PEM private key of --cert")
    group.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                       help="gRPC deadline of the call (default: none; wait-ready: the whole wait, "
                            "default 600)")

    parser = argparse.ArgumentParser(
        prog="videogen",
        description="Generate videos from images with a videogen server (Stable Video Diffusion).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser(
        "generate", parents=[connection], help="generate a video from an image",
        description="Generate a video from an image. Unset parameters take the model's defaults "
                    "(see 'videogen model NAME').")
    gen.set_defaults(handler=_generate, parser=gen)
    gen.add_argument("--image", required=True, metavar="FILE", help="conditioning image (PNG, JPEG or WebP)")
    gen.add_argument("--out", metavar="FILE.mp4", help="where to write the MP4")
    gen.add_argument("--frames-dir", metavar="DIR", help="write every frame as DIR/frame_00000.png ...")
    gen.add_argument("--model", default="svd-xt", help="model name (default: %(default)s)")
    gen.add_argument("--model-version", type=int, metavar="N",
                     help="model version (default: the latest ready one)")
    params = gen.add_argument_group("generation parameters")
    params.add_argument("--width", type=int, metavar="W", help="video width, a multiple of 8")
    params.add_argument("--height", type=int, metavar="H", help="video height, a multiple of 8")
    params.add_argument("--num-frames", type=int, metavar="N", help="frames to generate")
    params.add_argument("--steps", type=int, metavar="N", help="denoising steps")
    params.add_argument("--seed", type=int, metavar="N", help="random seed (default: random, reported)")
    params.add_argument("--fps", type=int, metavar="N", help="fps conditioning value")
    params.add_argument("--motion-bucket-id", type=int, metavar="N", help="amount of motion (SVD was trained on 0..255; the server takes 0..1023)")
    params.add_argument("--noise-aug-strength", type=float, metavar="F", help="noise added to the image")
    params.add_argument("--min-guidance-scale", type=float, metavar="F", help="guidance at the first frame")
    params.add_argument("--max-guidance-scale", type=float, metavar="F", help="guidance at the last frame")
    params.add_argument("--decode-chunk-size", type=int, metavar="N", help="frames per VAE decode call")
    params.add_argument("--resize-mode", choices=["stretch", "crop"],
                        help="fit the image to WxH by resizing it (stretch, the default) or by centre-cropping it to "
                             "that aspect first (crop: no distortion)")
    output = gen.add_argument_group("output")
    output.add_argument("--frame-encoding", choices=["png", "jpeg", "raw_rgb", "none"],
                        help="how the server sends frames (default: png with --frames-dir, else none); "
                             "frames are written as PNG whatever their encoding")
    output.add_argument("--jpeg-quality", type=int, metavar="Q", help="1..100, for --frame-encoding jpeg")
    output.add_argument("--video-fps", type=int, metavar="N", help="MP4 playback rate (default: --fps)")
    output.add_argument("--quiet", action="store_true", help="draw no progress bar")
    sched = gen.add_argument_group("scheduling")
    sched.add_argument("--request-id", metavar="ID", help="your id for the request (sent as x-request-id)")
    sched.add_argument("--priority", type=_non_negative_int, default=0, metavar="N",
                       help="priority level, 1 = highest (default: the model's)")
    sched.add_argument("--queue-timeout", type=_positive_float, metavar="SECONDS",
                       help="most time to wait in the queue (default: the model's)")

    models = commands.add_parser("models", parents=[connection], help="list the server's models",
                                 description="List every model the server knows, loaded or not.")
    models.set_defaults(handler=_models, parser=models)

    model = commands.add_parser("model", parents=[connection], help="describe one model as JSON",
                                description="Print one model's versions, state, defaults, limits and "
                                            "configuration as JSON.")
    model.add_argument("name", help="model name")
    model.set_defaults(handler=_model, parser=model)

    load = commands.add_parser("load", parents=[connection], help="load or reload a model (explicit mode)",
                               description="Load or reload a model on a server run with --model-control-mode "
                                           "explicit; print its state as JSON once the load has ended.")
    load.add_argument("name", help="model name")
    load.set_defaults(handler=_load, parser=load)

    unload = commands.add_parser("unload", parents=[connection], help="unload a model (explicit mode)",
                                 description="Unload a model on a server run with --model-control-mode explicit.")
    unload.add_argument("name", help="model name")
    unload.set_defaults(handler=_unload, parser=unload)

    wait = commands.add_parser("wait-ready", parents=[connection], help="wait until a model serves",
                               description="Wait until the server answers and the model has a ready version "
                                           "(through the server starting and the model loading and warming "
                                           "up); exit 0 then, 1 when --timeout passes or the model failed to "
                                           "load. --timeout is the whole wait here (default 600 s).")
    wait.add_argument("name", help="model name")
    wait.add_argument("--poll-interval", type=_positive_float, default=1.0, metavar="SECONDS",
                      help="seconds between questions while the model loads (default 1)")
    wait.set_defaults(handler=_wait_ready, parser=wait)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``videogen`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    Bad arguments exit through ``SystemExit(2)``. Example:
    ``main(["models", "--target", "localhost:8001"])``.
    """
    args = _build_parser().parse_args(argv)
    parser: argparse.ArgumentParser = args.parser  # the subcommand's, for its usage line in errors
    if not args.target and os.environ.get(_TARGET_ENV):
        args.target = [os.environ[_TARGET_ENV]]
    args.target = _targets(args.target or [])
    if not args.target:
        parser.error(f"--target is required (or set ${_TARGET_ENV})")
    if not all(args.target):
        parser.error("--target: empty entry in the list of servers")
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    args.ca_cert_pem = _read_pem(parser, args.ca_cert, "--ca-cert")
    args.cert_pem = _read_pem(parser, args.cert, "--cert")
    args.key_pem = _read_pem(parser, args.key, "--key")
    if args.token_file is not None:
        try:
            # the file wins over $VIDEOGEN_TOKEN and --token; read again if it changes (a resend of a long run)
            args.token = TokenFile(args.token_file)
        except ValueError as err:
            parser.error(f"--token-file: {err}")
    if args.command == "generate":
        if not args.model:
            parser.error("--model: empty; give a model name (see 'videogen models')")
        try:  # (the client reads it when it builds the request: its error would not name the option)
            if stat.S_ISDIR(os.stat(args.image).st_mode):
                parser.error(f"--image: {args.image} is a directory")
            if stat.S_ISREG(os.stat(args.image).st_mode):  # (a FIFO or /dev/stdin is read once: by the request)
                Path(args.image).open("rb").close()
        except OSError as err:
            parser.error(f"--image: cannot read {args.image} ({err.strerror or err})")
        if args.out is None and args.frames_dir is None:
            parser.error("give --out, --frames-dir, or both")
        if args.frames_dir is not None and args.frame_encoding == "none":
            parser.error("--frames-dir needs frames; drop --frame-encoding none")
        # refuse outputs that cannot be written before the server spends minutes of GPU time on them
        problem = (_unwritable(args.out, "--out", directory=False)
                   or _unwritable(args.frames_dir, "--frames-dir", directory=True))
        if not problem and args.out is not None and args.frames_dir is not None and \
                os.path.realpath(args.out) == os.path.realpath(args.frames_dir):
            problem = "--out and --frames-dir name the same path: the video is a file, the frames a folder"
        if problem:
            parser.error(problem)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        status = handler(args)
        sys.stdout.flush()  # here, not at exit: a pipe's buffer written after the reader went is an error too
        return status
    except VideoGenError as err:
        reason = f" [{err.error_reason}]" if err.error_reason else ""  # the server's ErrorInfo reason
        hint = _option_hint(args, getattr(err, "field", None))  # (InvalidArgumentError's)
        print(f"error: {err.code.name}{reason}: {err.details}{hint}", file=sys.stderr)
    except BrokenPipeError:  # the reader of stdout went away (`| head -1`): quiet, as a tool killed by SIGPIPE
        with contextlib.suppress(OSError, ValueError):  # (and the interpreter's last flush must not fail again)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (OSError, UnresolvedHost) as err:  # (a name the resolver may answer later: not a bad argument)
        print(f"error: {err}", file=sys.stderr)
    except ValueError as err:  # a value the client refused before sending (out of a field's range, ...)
        field = str(err).split(": ", 1)[0] if ": " in str(err) else None
        print(f"error: {err}{_option_hint(args, field)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
