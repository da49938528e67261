"""The asyncio videogen client (grpc.aio)."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Any, Literal

import grpc
import grpc.aio
from videogen.v1 import videogen_pb2, videogen_pb2_grpc

from videogen_client._request import (
    KEEPALIVE_S,
    ChannelOptions,
    ImageInput,
    ReadinessWait,
    RetryPolicy,
    StreamAttempts,
    Target,
    build_generate_request,
    call_metadata,
    connection_settings,
    deadline_seconds,
    retry_wait,
    several_servers,
    trace_metadata,
)
from videogen_client.auth import TokenSource
from videogen_client.errors import (
    RequestCancelledError,
    VideoGenError,
    from_rpc_error,
)
from videogen_client.events import Event, EventDecoder, GenerationResult, ResultBuilder
from videogen_client.models import ModelInfo

__all__ = ["AsyncVideoGenClient"]


class AsyncVideoGenClient:
    """An asyncio client for a videogen server; an async context manager (or await :meth:`close`).

    Create it inside the event loop that will use it. Example::

        from videogen_client import AsyncVideoGenClient, save_video

        async with AsyncVideoGenClient("localhost:8001", token="s3cret", timeout=600) as client:
            result = await client.run("cat.png", model="svd-xt", num_frames=14, seed=42)
            save_video(result, "cat.mp4")

    Scale-out: give several servers, or a DNS name with several addresses, and calls are spread
    over them (``round_robin``); calls a server refuses before doing any work (queue full, server
    draining, connection refused) are retried on the next one::

        AsyncVideoGenClient(["10.0.0.1:8001", "10.0.0.2:8001"])      # or "10.0.0.1:8001,10.0.0.2:8001"
        AsyncVideoGenClient("dns:///videogen-headless.ml.svc:8001")  # every A record of the name

    Args:
        target: the server, as ``HOST:PORT`` (any gRPC target string works, e.g.
            ``dns:///name:port`` or ``ipv4:10.0.0.1:8001,10.0.0.2:8001``), or several servers: a
            sequence of ``HOST:PORT`` or one comma-separated string. Several targets become one
            ``ipv4:``/``ipv6:`` address list; host names among them are resolved once, when the
            client is created (blocking; ``dns:///`` re-resolves, e.g. when connections age out).
        secure: use TLS. ``root_certificates`` (PEM) replaces the system's CA roots;
            ``private_key`` and ``certificate_chain`` (PEM, both or neither) present a client
            certificate (mTLS). The three need ``secure=True``.
        token: a bearer token, sent as ``authorization: Bearer <token>`` metadata on every call; or a
            callable returning it, asked before each call (``TokenFile(path)``: a token file read
            again when it changes, so a rotated token needs no new client).
            On a plaintext channel anyone on the network path can read it.
        options: extra gRPC channel options, ``[(name, value), ...]``; they override the client's.
            The client raises grpc's receive limit to 8 MiB (a streamed message carries at most
            1 MiB of payload, so that is ample headroom) and caps sends at 64 MiB (the request
            carries the whole conditioning image, which can be large).
        timeout: the default gRPC deadline of every call, in seconds; ``None`` = no deadline. A
            generation runs for minutes on a GPU, so keep it generous. Retries happen within it.
        retry: retry calls that failed with UNAVAILABLE or RESOURCE_EXHAUSTED before the server
            did any work: ``True`` (the default :class:`RetryPolicy`: 4 attempts, backoff from
            0.1 s up to 5 s), a :class:`RetryPolicy`, or ``False``. It goes into the channel's
            gRPC service config, so gRPC retries (on the next server, with ``round_robin``).
            gRPC retries a server-streaming call only before its first response: a ``Generate``
            rejected at admission (queue full, server draining) is sent again transparently, one
            that has started streaming is not (it is never run twice).
        load_balancing: the gRPC load-balancing policy over the target's addresses:
            ``"round_robin"`` (default: each call to the next ready server) or ``"pick_first"``
            (one server at a time, the next only when it fails).
        health_check: with ``round_robin``, send calls only to servers whose gRPC health
            (``grpc.health.v1``, service ``videogen.v1.VideoGen``) is SERVING (gRPC client-side
            health checking; a server without the health service counts as healthy), so that
            servers still starting (loading their models) or draining get no new calls instead of
            refusing them. A server whose start-up is done reports SERVING there though a model
            failed to load or none is loaded yet (explicit mode), so its ready models and the
            model control calls stay reachable; not once every loaded model lost its instances
            (device errors). ``None`` (default): on
            when ``target`` names several servers (several addresses, or a ``dns:`` name), off
            for one ``HOST:PORT`` (a lone server still starting would be unreachable rather than
            answer). A draining server closes its port a second after it turns NOT_SERVING
            (GOAWAY), which takes it out of the rotation with or without health checks; calls a server refuses (queue full, a
            model not ready there) are retried (see ``retry``), but with concurrent calls a retry
            can land on the same server again.

        keepalive: with calls open, ping the server after this many seconds without a frame from
            it, and end the calls ``UNAVAILABLE`` (:class:`UnavailableError`) when no answer comes
            in 60 s: a server whose host vanished or whose network was cut (no FIN, no RST) is
            found in about 90 s instead of at the call's deadline (never, without one). With
            several servers the health-check stream is always open, so the pings go on while the
            client lives. Default 30; at least 15 (the server refuses pings more often than every
            10 s); ``0`` or ``None``: off (gRPC's default). The server pings its callers in the
            same way (``--keepalive-seconds``) and cancels the requests of one that does not answer.
            gRPC bounds every ping's answer by that 60 s, flow control's included, which waits
            behind what is queued toward the client: a slow link with a deep buffer holding more
            than a minute of frames and video cuts the call (12 MiB at 100 KB/s through an unbounded
            relay: UNAVAILABLE after 110 s). There, turn keepalive off or raise
            ``grpc.http2.ping_timeout_ms`` in ``options``.

    An ``options`` entry ``("grpc.service_config", json)`` replaces the service config that
    ``retry``, ``load_balancing`` and ``health_check`` build; ``options`` entries for the
    ``grpc.keepalive_*`` and ``grpc.http2.*ping*`` arguments replace those ``keepalive`` sets.
    """

    def __init__(self, target: Target, *, secure: bool = False, root_certificates: bytes | None = None,
                 private_key: bytes | None = None, certificate_chain: bytes | None = None,
                 token: TokenSource | None = None, options: ChannelOptions | None = None,
                 timeout: float | None = None, retry: bool | RetryPolicy = True,
                 load_balancing: str = "round_robin", health_check: bool | None = None,
                 keepalive: float | None = KEEPALIVE_S) -> None:
        self._settings = connection_settings(
            target, secure=secure, root_certificates=root_certificates, private_key=private_key,
            certificate_chain=certificate_chain, token=token, options=options, retry=retry,
            load_balancing=load_balancing, health_check=health_check, keepalive=keepalive)
        self._timeout = deadline_seconds(timeout)
        self._closed = False
        if self._settings.credentials is None:
            self._channel = grpc.aio.insecure_channel(self._settings.target, options=self._settings.options)
        else:
            self._channel = grpc.aio.secure_channel(self._settings.target, self._settings.credentials,
                                                    options=self._settings.options)
        self._stub = videogen_pb2_grpc.VideoGenStub(self._channel)

    @property
    def target(self) -> str:
        """The gRPC target this client talks to (several servers appear as ``ipv4:A:P,B:P``)."""
        return self._settings.target

    @property
    def retry(self) -> RetryPolicy | None:
        """The retry policy, ``None`` when retries are off."""
        return self._settings.retry

    def generate(
        self,
        image: ImageInput,
        *,
        model: str,
        model_version: int | None = None,
        width: int | None = None,
        height: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        fps: int | None = None,
        motion_bucket_id: int | None = None,
        noise_aug_strength: float | None = None,
        min_guidance_scale: float | None = None,
        max_guidance_scale: float | None = None,
        seed: int | None = None,
        decode_chunk_size: int | None = None,
        resize_mode: Literal["stretch", "crop"] | None = None,
        frame_encoding: Literal["png", "jpeg", "raw_rgb", "none"] = "png",
        jpeg_quality: int | None = None,
        stream_video: bool = True,
        video_fps: int | None = None,
        request_id: str | None = None,
        priority: int = 0,
        queue_timeout: float | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Generate a video from ``image`` and stream the events back as they happen.

        Example::

            async with contextlib.aclosing(client.generate("cat.png", model="svd-xt", seed=42)) as events:
                async for event in events:
                    if isinstance(event, Progress):
                        print(f"step {event.step}/{event.num_steps}")
                    elif isinstance(event, Frame):
                        event.to_pil().save(f"frame_{event.index:05d}.png")
                    elif isinstance(event, VideoChunk):
                        mp4.write(event.data)

        The events come in order: one :class:`Accepted`, one :class:`Progress` per denoising step,
        the :class:`Frame` s in index order (frames the server split into parts are reassembled),
        the :class:`VideoChunk` s of a fragmented MP4, and one :class:`Summary`. The request is
        built (and the image read, blocking) when ``generate`` is called; the RPC starts on the
        first ``anext()``. Closing the iterator early (``await events.aclose()``, which
        ``contextlib.aclosing`` does on leaving its block) or cancelling the task that iterates
        cancels the RPC, and the server stops working on it. A ``break`` without ``aclosing``
        cancels it only once the iterator is garbage-collected. With retries on (the client's
        ``retry``), a request refused before its first event (queue full, server draining) is
        sent again, to the next server with ``round_robin``, within ``timeout``; once events
        flow it is not retried.

        Args:
            image: the conditioning image: encoded bytes (PNG, JPEG or WebP), a path to such a
                file, or a PIL image (sent as PNG).
            model: the model's name in the server's repository, e.g. "svd-xt".
            model_version: a specific version; ``None`` = the latest ready one.
            width, height: output size in pixels, multiples of 8 (model default 1024x576).
            num_frames: frames to generate (model default: 14 for SVD, 25 for SVD-XT).
            num_inference_steps: denoising steps (default 25).
            fps: the fps conditioning value (default 7).
            motion_bucket_id: how much motion, 0..1023 (SVD was trained on 0..255; default 127).
            noise_aug_strength: noise added to the conditioning image (default 0.02).
            min_guidance_scale, max_guidance_scale: the classifier-free guidance ramp over the
                frames (defaults 1.0 and 3.0).
            seed: the random seed, 0..2**63-1; ``None`` = random (``Accepted.parameters["seed"]``
                reports the one used).
            decode_chunk_size: frames per VAE decode call; smaller uses less memory.
            resize_mode: how the image is fitted to width x height: "stretch" (the default, as
                diffusers' pipeline does: resized whatever its aspect) or "crop" (centre-cropped to
                the requested aspect first, so a 4:3 photo makes a 16:9 video without squashing).
            frame_encoding: "png", "jpeg", "raw_rgb" (height*width*3 bytes of RGB) or "none"
                (send no frames, only the video).
            jpeg_quality: 1..100 for "jpeg" frames (default 90).
            stream_video: stream the MP4 (H.264) as :class:`VideoChunk` s.
            video_fps: the MP4's playback rate (default: ``fps``).
            request_id: your id for the request, sent as the request's ``request_id`` and as
                ``x-request-id`` metadata; the server makes one up when it is ``None``.
            priority: scheduling priority level, 1 = highest; 0 = the model's default.
            queue_timeout: the most seconds the request may wait in the model's queue; ``None`` =
                the model's default. It may shorten the model's own queue timeout, never
                lengthen it.
            timeout: the gRPC deadline for the whole call, in seconds; ``None`` = the client's
                default.

        Only the parameters you give are sent; the others take the model's defaults
        (see ``get_model(name).defaults``).

        Raises:
            VideoGenError: a subclass per gRPC status (from the iterator): InvalidArgumentError
                (``.field`` names the bad parameter), ModelNotFoundError, QueueFullError,
                UnavailableError, DeadlineExceededError, UnauthenticatedError, ...
            OSError: ``image`` is a path that cannot be read.
            ValueError: a parameter that cannot be represented (unknown ``frame_encoding``, a
                negative ``priority``, ...).
        """
        request = build_generate_request(
            image, model=model, model_version=model_version, width=width, height=height,
            num_frames=num_frames, num_inference_steps=num_inference_steps, fps=fps,
            motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength,
            min_guidance_scale=min_guidance_scale, max_guidance_scale=max_guidance_scale, seed=seed,
            decode_chunk_size=decode_chunk_size, resize_mode=resize_mode, frame_encoding=frame_encoding,
            jpeg_quality=jpeg_quality,
            stream_video=stream_video, video_fps=video_fps, request_id=request_id, priority=priority,
            queue_timeout=queue_timeout, max_send_message_length=self._settings.max_send_message_length)
        return self._stream(request, request_id=request_id, timeout=self._deadline(timeout), trace=trace_metadata())

    async def _stream(self, request: videogen_pb2.GenerateRequest, *, request_id: str | None,
                      timeout: float | None, trace: tuple[tuple[str, str], ...] = ()) -> AsyncGenerator[Event, None]:
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 1
        attempts = StreamAttempts()
        while True:
            if self._closed:
                if attempt > 1:  # closed while waiting to send it again: a call in flight when it closed
                    raise RequestCancelledError("the client was closed during the call", request_id=request_id)
                raise ValueError(f"{self!r} is closed")  # a generator made before close() and iterated after
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            # each attempt's: the request id the server gave, a token source's token of now (rotated since?)
            metadata = call_metadata(self._settings, request_id, trace)
            call = self._stub.Generate(request, timeout=remaining, metadata=metadata)
            decoder = EventDecoder()
            received = False
            attempts.next_attempt()
            try:
                async for response in call:
                    received = True
                    event = decoder.decode(response)
                    if attempts.passes(event):
                        yield event
                decoder.finish()
                return
            except grpc.RpcError as err:
                # Refused after response headers but before any response: gRPC counts the call as
                # committed and does not retry it, so we do; and an accepted request the server ended
                # before starting it (its drain's end, an unload) goes again, under the same id (see
                # RetryPolicy).
                wait = retry_wait(err, self._settings, attempt, deadline, received=received,
                                  started=attempts.started)
                if decoder.request_id and not request_id:
                    request_id = decoder.request_id
                if wait is None:
                    raise from_rpc_error(err, request_id=decoder.request_id or request_id) from err
                again = attempts.again(request, after=wait)
                if again is None:  # its queue timeout will have passed by the time it is sent
                    raise attempts.queue_timeout_passed(decoder.request_id or request_id) from err
                request = again
            except asyncio.CancelledError:
                self._closed_under_call(decoder.request_id or request_id)
                raise
            finally:
                call.cancel()  # a no-op once the call has ended; stops the server when we stop early
            await asyncio.sleep(wait)
            attempt += 1

    async def run(
        self,
        image: ImageInput,
        *,
        model: str,
        model_version: int | None = None,
        width: int | None = None,
        height: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        fps: int | None = None,
        motion_bucket_id: int | None = None,
        noise_aug_strength: float | None = None,
        min_guidance_scale: float | None = None,
        max_guidance_scale: float | None = None,
        seed: int | None = None,
        decode_chunk_size: int | None = None,
        resize_mode: Literal["stretch", "crop"] | None = None,
        frame_encoding: Literal["png", "jpeg", "raw_rgb", "none"] = "png",
        jpeg_quality: int | None = None,
        stream_video: bool = True,
        video_fps: int | None = None,
        request_id: str | None = None,
        priority: int = 0,
        queue_timeout: float | None = None,
        timeout: float | None = None,
    ) -> GenerationResult:
        """Generate a video from ``image`` and return everything at once, when it is done.

        Takes the same arguments as :meth:`generate`. Example::

            result = await client.run("cat.png", model="svd-xt", num_frames=14, seed=42)
            save_video(result, "cat.mp4")
            save_frames(result, "frames/")          # frames/frame_00000.png ...
            print(result.request_id, len(result.frames), result.summary.total_seconds)

        Raises:
            VideoGenError: as :meth:`generate`.
        """
        builder = ResultBuilder()
        events = self.generate(
            image, model=model, model_version=model_version, width=width, height=height,
            num_frames=num_frames, num_inference_steps=num_inference_steps, fps=fps,
            motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength,
            min_guidance_scale=min_guidance_scale, max_guidance_scale=max_guidance_scale, seed=seed,
            decode_chunk_size=decode_chunk_size, resize_mode=resize_mode, frame_encoding=frame_encoding,
            jpeg_quality=jpeg_quality,
            stream_video=stream_video, video_fps=video_fps, request_id=request_id, priority=priority,
            queue_timeout=queue_timeout, timeout=timeout)
        async with contextlib.aclosing(events):
            async for event in events:
                builder.add(event)
        return builder.build()

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server's repository knows, loaded or not.

        Example: ``[m.name for m in await client.list_models() if m.state == "ready"]``.
        """
        response = await self._unary(self._stub.ListModels, videogen_pb2.ListModelsRequest(), timeout)
        return [ModelInfo.from_proto(model) for model in response.models]

    async def get_model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """One model: versions, state, defaults and limits. ModelNotFoundError if there is none.

        Example: ``(await client.get_model("svd-xt")).defaults["num_frames"]``.
        """
        return ModelInfo.from_proto(await self._unary(self._stub.GetModel, videogen_pb2.GetModelRequest(name=name),
                                                      timeout))

    async def load_model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """As :meth:`VideoGenClient.load_model`. Example: ``await client.load_model("svd-xt", timeout=900)``."""
        return ModelInfo.from_proto(await self._unary(self._stub.LoadModel,
                                                      videogen_pb2.LoadModelRequest(name=name), timeout))

    async def unload_model(self, name: str, *, timeout: float | None = None) -> None:
        """As :meth:`VideoGenClient.unload_model`. Example: ``await client.unload_model("svd-xt")``."""
        await self._unary(self._stub.UnloadModel, videogen_pb2.UnloadModelRequest(name=name), timeout)

    async def _unary(self, method: Any, request: Any, timeout: float | None, **kw: Any) -> Any:
        """One unary call with the client's metadata and deadline; errors typed as every call's."""
        try:
            return await method(request, metadata=call_metadata(self._settings, None, trace_metadata()),
                                timeout=self._deadline(timeout), **kw)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        except asyncio.CancelledError:
            self._closed_under_call(None)
            raise

    async def wait_until_ready(self, model: str, *, timeout: float | None = 600.0,
                               poll_interval: float = 1.0) -> ModelInfo:
        """Wait until the server answers and ``model`` has a ready version; return its ModelInfo.

        As :meth:`VideoGenClient.wait_until_ready`. Example::

            await client.wait_until_ready("svd-xt", timeout=900)
        """
        wait = ReadinessWait(model, timeout, poll_interval, several=several_servers(self._settings.target))
        while True:
            deadline, wait_for_ready = wait.call()
            try:
                response = await self._unary(self._stub.GetModel, videogen_pb2.GetModelRequest(name=model),
                                       deadline, wait_for_ready=wait_for_ready)
            except VideoGenError as error:
                wait.not_yet(error)
            else:
                if wait.ready(info := ModelInfo.from_proto(response)):
                    return info
            await asyncio.sleep(wait.pause())
            if self._closed:  # closed while it slept: as for a call in flight then
                raise RequestCancelledError("the client was closed during the call")

    def _closed_under_call(self, request_id: str | None) -> None:
        """In an ``except asyncio.CancelledError``: grpc.aio ends the calls of a channel that ``close()``
        closed by cancelling them. Unless this task itself is being cancelled, that is the call's end,
        reported as the sync client does (RequestCancelledError); else the caller re-raises."""
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # Python 3.11+; on 3.10 a close() wins the tie
        if self._closed and not (cancelling is not None and cancelling()):
            raise RequestCancelledError("the client was closed during the call", request_id=request_id) from None

    def _deadline(self, timeout: float | None) -> float | None:
        if self._closed:  # the same error for every call on a closed client, sync or asyncio
            raise ValueError(f"{self!r} is closed")
        return self._timeout if timeout is None else deadline_seconds(timeout)

    async def close(self) -> None:
        """Close the channel; calls in flight end with RequestCancelledError."""
        self._closed = True
        await self._channel.close()

    async def __aenter__(self) -> AsyncVideoGenClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncVideoGenClient({self.target!r})"
