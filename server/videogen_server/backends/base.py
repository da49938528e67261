"""The backend contract (Triton's initialize / execute / finalize, decoupled responses).

A backend runs one model instance on one device. The engine creates one backend object per
instance and calls every method of it from that instance's own worker thread, so a backend may
keep per-thread state (compiled graphs, CUDA graphs) and never needs locks.

    class EchoBackend(Backend):
        name = "echo"

        def initialize(self, context):
            self.device = context.device

        def execute(self, requests):
            for r in requests:
                p = r.params
                for step in range(1, p.num_inference_steps + 1):
                    if r.sender.is_cancelled():
                        break
                    r.sender.send(StepDone(step, p.num_inference_steps))
                frames = numpy.zeros((p.num_frames, p.height, p.width, 3), numpy.uint8)
                r.sender.send(FramesDecoded(chunk_index=0, start_index=0, frames=frames))

        def finalize(self):
            pass

`execute` streams any number of events per request through `request.sender` and returns when it
is done with all of them; the engine then closes each request. To fail one request of a batch,
call `request.sender.error(exc)` and carry on with the others; an exception out of `execute`
fails every request of the batch that is still open; so must an error that leaves the device unusable
(`Backend.device_lost`), even one met by a single request, so that the engine retires the instance
instead of failing every later request one by one. Backends are found by name: the built-ins below,
then the `videogen.backends` entry-point group (`name = "package.module:Class"`).
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Protocol

from PIL import Image

from .. import logs
from ..errors import ConfigError
from ..domain import ResolvedParams

ENTRY_POINT_GROUP = "videogen.backends"
BUILTIN_BACKENDS = {"svd": "videogen_server.backends.svd.backend:SVDBackend"}


def is_out_of_memory(exc: BaseException) -> bool:
    """Memory pressure, not a lost device: torch's OutOfMemoryError (known by name: this module does not
    import torch), CUDA's own "out of memory" (an allocation outside torch's caching allocator), or a CUDA
    library failing to allocate its workspace (CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED)."""
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    text = str(exc)
    return "out of memory" in text or "ALLOC_FAILED" in text


#: CUDA errors a request's own launch can raise that leave the device working (a grid too large for a
#: size, an argument a library does not support): the request fails, the instance serves on.
_RECOVERABLE_CUDA = ("invalid configuration argument", "invalid argument", "too many resources requested",
                     "NOT_SUPPORTED")


def is_fatal_device_error(exc: BaseException) -> bool:
    """By its text, a CUDA error that leaves the context unusable (illegal address, ECC, launch failure):
    every later call on the device fails too. Out of memory is not: the device works once memory is
    freed; nor are the launch errors of `_RECOVERABLE_CUDA`. The message is torch's ("CUDA error: ..."),
    Triton's for a compiled kernel ("Triton Error [CUDA]: ..."), the driver's or cuDNN's. A text is a
    guess: a backend that can ask its device (`Backend.device_lost`) should."""
    if is_out_of_memory(exc):
        return False
    text = f"{type(exc).__name__}: {exc}"
    if any(marker in text for marker in _RECOVERABLE_CUDA):
        return False
    return any(marker in text for marker in ("CUDA error", "cudaError", "AcceleratorError", "Triton Error [CUDA]",
                                             "CUDA driver error", "CUDNN_STATUS_EXECUTION_FAILED"))


@dataclasses.dataclass(frozen=True)
class StepDone:
    """Denoising step `step` (1-based) of `num_steps` finished."""

    step: int
    num_steps: int
    seconds: float = 0.0  # wall time of this step (device synchronised)


@dataclasses.dataclass(frozen=True)
class PhaseTiming:
    """Seconds a phase took for this request ("image_encode", "denoise", "decode")."""

    phase: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class FramesDecoded:
    """Frames of one VAE decode chunk: uint8 array [n, height, width, 3], frames start..start+n-1."""

    chunk_index: int
    start_index: int
    frames: Any  # numpy.ndarray; typed loosely so this module needs no numpy at import
    decode_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Finished:
    """Sent by the backend last for a request that completed: the peak device memory of its run, and
    the size of the batch it ran in (None: the one handed to `execute`; a backend that re-runs a
    request alone, say after running out of memory in its batch, says 1, and the scheduler then does
    not count that batch's time as a run of its size)."""

    peak_memory_bytes: int = 0
    batch_size: Optional[int] = None


class ResponseSender(Protocol):
    """How a backend streams events for one request. Safe to call from the worker thread."""

    def send(self, event: Any) -> None: ...

    def error(self, exc: BaseException) -> None: ...

    def is_cancelled(self) -> bool: ...

    def progressed(self) -> None:
        """Work for the request went on without an event to send (work re-run whose events went out
        before): each event sent counts as progress too (--instance-stall-seconds)."""


@dataclasses.dataclass
class BackendRequest:
    request_id: str
    params: ResolvedParams
    image: Image.Image
    sender: ResponseSender
    prepared: Any = None  # what `Backend.prepare` returned for this request (None if it was not run)


#: A version folder's subfolder of derived files a backend reads at load (compile artifacts: see the svd
#: backend), written by `videogen-server compile-artifacts`, not model content: a change there reloads nothing.
COMPILE_ARTIFACTS_FOLDER = "compile_artifacts"


@dataclasses.dataclass(frozen=True)
class InstanceContext:
    """What `initialize` gets: which model, which weights, where to run."""

    model_name: str
    model_version: int
    version_path: Path  # the version folder (diffusers format for svd)
    parameters: Mapping[str, str]  # the model's backend parameters from config.pbtxt
    device: str  # "cpu" or "cuda:N"
    instance_index: int
    max_batch_size: int
    cpu_threads: Optional[int] = None  # torch intra-op threads for CPU instances (None: torch's default)
    max_decode_chunk_size: int = 25  # the model's limit: no request decodes more frames in one VAE call
    #: `videogen-server compile-artifacts`: after its warm-up, a backend that compiles writes what it compiled
    #: into this folder (the version folder's compile_artifacts/, or another) for servers on other machines to
    #: start from; None: nothing is written (serving)
    compile_artifacts_out: Optional[Path] = None


class ModelSettingError(ValueError):
    """Raised by a backend's `initialize` for a model configuration this instance cannot take (a
    parameter the device or the run does not support: `cpu_offload` without a GPU, FP8 before Hopper).
    The load fails with the message as its reason, logged without a traceback: an operator's setting,
    not a bug. Name the parameter first ("<key>: <reason>"), as `validate_parameters` does."""


class Backend(abc.ABC):
    """Base class of every backend. Subclasses set `name` and implement the three calls."""

    name: ClassVar[str]

    @classmethod
    def validate_parameters(cls, parameters: Mapping[str, str]) -> None:
        """Check the config's backend parameters; raise ValueError("<key>: <reason>"). Runs at load."""
        if parameters:
            raise ValueError(f"{sorted(parameters)[0]}: unknown parameter for backend {cls.name!r}")

    @classmethod
    def model_defaults(cls, version_path: Path) -> Mapping[str, Any]:
        """Generation defaults read from the weights' metadata (no heavy work), e.g. num_frames."""
        return {}

    @abc.abstractmethod
    def initialize(self, context: InstanceContext) -> None:
        """Load weights onto the context's device, compile, get ready. Runs on the worker thread."""

    def prepare(self, params: ResolvedParams, image: Image.Image) -> Any:
        """CPU preprocessing of one request, before it is queued; the result is `BackendRequest.prepared`.

        Runs on the engine's preprocessing threads, concurrently with `execute` on the instance's
        thread, so it must only read immutable state and never touch the device. Work done here
        (decoding-size image resizes, normalisation) keeps the instance busy with device work only.
        It may still run after `finalize` (an unload that gave up waiting for it): keep what it reads
        past finalize; if it fails then, the request is answered UNAVAILABLE, not INTERNAL.
        """
        return None

    @abc.abstractmethod
    def execute(self, requests: list[BackendRequest]) -> None:
        """Run a batch (1..max_batch_size requests of equal `params.batch_key`). Each event sent (or
        `sender.progressed()`) is a sign of progress: a batch with none for --instance-stall-seconds
        (600 s by default) retires the instance as hung, so no phase of it may go longer silent."""

    def finalize(self) -> None:
        """Free everything `initialize` took."""

    def memory_stats(self) -> Mapping[str, int]:
        """Device memory in bytes: {"allocated", "reserved", "peak"} where known."""
        return {}

    def device_lost(self, exc: BaseException) -> bool:
        """On the instance thread, after `execute` raised `exc`: whether the device is unusable for good,
        so that the engine retires this instance. By the error's text unless the backend asks its device."""
        return is_fatal_device_error(exc)

    def warmed_up(self) -> None:
        """Called on the instance thread once the warm-up requests ran, before serving starts."""

    def run_stats(self) -> Mapping[str, int]:
        """Counts of this instance's life: {"batches_split": batches that ran out of device memory and
        ran again one request at a time} where the backend does it (keys it does not know are left out)."""
        return {}

    def compile_stats(self) -> Mapping[str, int]:
        """{"compiles": graphs built, "recompiles": graphs built after warm-up, "eager_fallbacks": phases run
        uncompiled after warm-up at shapes it did not compile; and of the compiles' graph-cache lookups,
        "cache_hits" (found in the compile cache or loaded compile artifacts), "cache_misses" (compiled
        from scratch), "cache_bypasses" (not cacheable)} where the backend compiles (keys it does not
        know are left out)."""
        return {}


def load_backend_class(name: str) -> type[Backend]:
    """Find a backend by name: built-ins first, then the `videogen.backends` entry points."""
    target = BUILTIN_BACKENDS.get(name)
    if target is None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                target = ep.value
                break
    if target is None:
        known = sorted(set(BUILTIN_BACKENDS) | {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})
        raise ConfigError("config.pbtxt", "backend", f"unknown backend {name!r}; installed: {known}")
    module_name, _, attr = target.partition(":")
    logs.adopt_library_loggers()  # the libraries it imports log as the server does, from their import on
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError("config.pbtxt", "backend", f"{target} is not a videogen_server Backend subclass")
    return cls
