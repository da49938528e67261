"""Client SDK and CLI for videogen, a gRPC server for image-to-video generation (Stable Video Diffusion).

Example::

    from videogen_client import Progress, VideoGenClient, save_frames, save_video

    with VideoGenClient("localhost:8001") as client:
        # Everything at once:
        result = client.run("cat.png", model="svd-xt", num_frames=14, seed=42)
        save_video(result, "cat.mp4")
        save_frames(result, "frames/")        # frames/frame_00000.png ...

        # Or event by event (breaking out of the loop cancels the request):
        for event in client.generate("cat.png", model="svd-xt", frame_encoding="none"):
            if isinstance(event, Progress):
                print(f"step {event.step}/{event.num_steps}")

Several servers: ``VideoGenClient(["10.0.0.1:8001", "10.0.0.2:8001"])`` or
``VideoGenClient("dns:///videogen.svc:8001")`` spreads calls over them (``round_robin``) and retries
calls refused before any work (queue full, draining) on the next one (``retry=RetryPolicy(...)``).

``AsyncVideoGenClient`` is the same API for asyncio. Failed calls raise ``VideoGenError``
subclasses (``InvalidArgumentError``, ``QueueFullError``, ...). The ``videogen`` command
(``videogen_client.cli``) wraps the client. Importing this package needs neither torch nor numpy.
"""
from videogen_client._request import RetryPolicy
from videogen_client.auth import TokenFile
from videogen_client.client import GenerateCall, VideoGenClient
from videogen_client.client_aio import AsyncVideoGenClient
from videogen_client.errors import (
    DeadlineExceededError,
    InternalServerError,
    InvalidArgumentError,
    ModelConfigError,
    ModelNotFoundError,
    OutOfMemoryError,
    PermissionDeniedError,
    ProtocolError,
    QueueFullError,
    RequestCancelledError,
    UnauthenticatedError,
    UnavailableError,
    VideoGenError,
    from_rpc_error,
)
from videogen_client.events import (
    Accepted,
    Event,
    EventDecoder,
    Frame,
    GenerationResult,
    Progress,
    ResultBuilder,
    Summary,
    VideoChunk,
    collect,
    decode_responses,
    save_frames,
    save_video,
)
from videogen_client.models import ModelInfo, ModelVersion

__all__ = [
    "Accepted",
    "AsyncVideoGenClient",
    "DeadlineExceededError",
    "Event",
    "EventDecoder",
    "Frame",
    "GenerateCall",
    "GenerationResult",
    "InternalServerError",
    "InvalidArgumentError",
    "ModelConfigError",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelVersion",
    "OutOfMemoryError",
    "PermissionDeniedError",
    "Progress",
    "ProtocolError",
    "QueueFullError",
    "RequestCancelledError",
    "ResultBuilder",
    "RetryPolicy",
    "Summary",
    "TokenFile",
    "UnauthenticatedError",
    "UnavailableError",
    "VideoChunk",
    "VideoGenClient",
    "VideoGenError",
    "collect",
    "decode_responses",
    "from_rpc_error",
    "save_frames",
    "save_video",
]
