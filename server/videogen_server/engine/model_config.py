"""Reading and validating `config.pbtxt` into typed settings.

`config.pbtxt` is protobuf text format for `videogen.v1.ModelConfig` (Triton's field names). The
typed view below is what the rest of the engine uses; every problem is reported as a ConfigError
that names the file, the field and what is wrong.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from google.protobuf import text_format

from videogen.v1 import model_config_pb2

from ..domain import GenerationParams, ResolvedParams
from ..errors import ConfigError, InvalidRequest

#: Server-wide bound on a model's queue when its config leaves max_queue_size at 0.
DEFAULT_MAX_QUEUE_SIZE = 64
#: The scheduler keeps a queue per priority level and walks them all for each request: a typo'd 10**9
#: (the field is a uint64) took seconds and gigabytes on the event loop, health probes included
MAX_PRIORITY_LEVELS = 1024


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Values an unset request field takes. They default to diffusers' own."""

    width: int = 1024
    height: int = 576
    num_frames: int = 25
    num_inference_steps: int = 25
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 3.0
    decode_chunk_size: int = 0  # 0 = all frames in one VAE call, as diffusers does
    jpeg_quality: int = 90


@dataclasses.dataclass(frozen=True)
class GenerationLimits:
    """What a request may ask for; anything outside is INVALID_ARGUMENT before any model work."""

    min_width: int = 64
    max_width: int = 1024
    min_height: int = 64
    max_height: int = 1024
    max_num_frames: int = 25
    max_decode_chunk_size: int = 0  # 0: up to max_num_frames (a whole video in one VAE call)
    max_num_inference_steps: int = 100
    max_image_bytes: int = 32 * 2**20
    max_image_pixels: int = 40_000_000

    @property
    def decode_chunk_limit(self) -> int:
        """The longest VAE decode chunk a request may ask for."""
        return min(self.max_decode_chunk_size or self.max_num_frames, self.max_num_frames)


@dataclasses.dataclass(frozen=True)
class QueuePolicy:
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    default_timeout_s: Optional[float] = None  # None: no queue timeout
    allow_timeout_override: bool = False


@dataclasses.dataclass(frozen=True)
class Batching:
    enabled: bool = False
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    priority_levels: int = 1
    default_priority_level: int = 1
    queue_policy: QueuePolicy = QueuePolicy()


@dataclasses.dataclass(frozen=True)
class InstanceGroup:
    kind: str  # "auto" | "gpu" | "cpu"
    count: int
    gpus: tuple[int, ...] = ()


def resolve_instance_groups(groups: tuple[InstanceGroup, ...], gpus_visible: int,
                            path: str = "") -> tuple[InstanceGroup, ...]:
    """The groups as they load on this host, as Triton normalises them: KIND_AUTO becomes KIND_GPU
    when a GPU is visible (else KIND_CPU), and a GPU group without `gpus` takes every visible GPU.
    A GPU that is not there is a ConfigError naming the group's field."""
    out = []
    for i, group in enumerate(groups):
        kind = group.kind
        if kind == "auto":
            kind = "gpu" if gpus_visible > 0 else "cpu"
        gpus: tuple[int, ...] = ()
        if kind == "gpu":
            gpus = group.gpus or tuple(range(gpus_visible))
            bad = [g for g in gpus if g >= gpus_visible]
            if not gpus or bad:
                raise ConfigError(path, f"instance_group[{i}].gpus", f"GPU {bad or 0} not present ({gpus_visible} visible)")
        out.append(InstanceGroup(kind=kind, count=group.count, gpus=gpus))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    kind: str = "latest"  # "latest" | "all" | "specific"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of those present on disk, highest first."""
        ordered = sorted(available, reverse=True)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[: self.num_versions]


@dataclasses.dataclass(frozen=True)
class Warmup:
    name: str
    inputs: Mapping[str, str]
    count: int = 1
    batch_size: int = 1  # run the request as a batch of this many (compiled graphs are per batch size)

    def params(self, defaults: GenerationDefaults, limits: GenerationLimits) -> ResolvedParams:
        """Its inputs resolved as a request's would be (InvalidRequest naming the input: one that is not
        a number, or one the model's limits refuse)."""
        from .admission import resolve_params  # (admission reads this module's types)

        fields = {}
        for key, text in self.inputs.items():
            try:
                fields[key] = _parse_number("float" if key in _FLOAT_REQUEST_FIELDS else "int", text)
            except ValueError:
                raise InvalidRequest(key, f"{text!r} is not a number") from None
        return resolve_params(GenerationParams(**fields), defaults, limits)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    name: str
    backend: str
    path: Path  # the model's folder in the repository
    max_batch_size: int
    version_policy: VersionPolicy
    instance_groups: tuple[InstanceGroup, ...]
    batching: Batching
    defaults: GenerationDefaults
    limits: GenerationLimits
    parameters: Mapping[str, str]  # backend-specific parameters, already validated by the backend
    warmup: tuple[Warmup, ...]
    proto: model_config_pb2.ModelConfig

    @property
    def config_path(self) -> Path:
        return self.path / "config.pbtxt"


# Core parameters: name -> (target, field, parser). Everything else goes to the backend.
_DEFAULT_FIELDS = {f.name: f.type for f in dataclasses.fields(GenerationDefaults)}
_LIMIT_FIELDS = {f.name: f.type for f in dataclasses.fields(GenerationLimits)}


def _parse_number(kind: str, text: str) -> Any:
    return float(text) if kind == "float" else int(text)


def parse_config_file(path: Path) -> model_config_pb2.ModelConfig:
    """Parse one config.pbtxt; a syntax error is a ConfigError naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(str(path), "config.pbtxt", f"cannot read: {err.strerror}") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise ConfigError(str(path), "config.pbtxt", f"not valid ModelConfig text format: {err}") from None


def version_policy_from_proto(config: model_config_pb2.ModelConfig, path: str) -> VersionPolicy:
    """The config's version_policy (latest 1 when unset); ConfigError naming `path` and the field."""
    which = config.version_policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy(kind="all")
    if which == "specific":
        versions = tuple(config.version_policy.specific.versions)
        if not versions or any(v <= 0 for v in versions):
            raise ConfigError(path, "version_policy.specific.versions", "list one or more versions > 0")
        return VersionPolicy(kind="specific", versions=versions)
    num = config.version_policy.latest.num_versions if which == "latest" else 1
    return VersionPolicy(kind="latest", num_versions=max(1, num))


def settings_from_proto(
    config: model_config_pb2.ModelConfig,
    *,
    model_dir: Path,
    validate_backend_parameters: Callable[[Mapping[str, str]], None],
    backend_defaults: Mapping[str, Any],
    default_max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
) -> ModelSettings:
    """Check every field of a parsed config and build the typed settings.

    `validate_backend_parameters` raises `ValueError("<key>: <reason>")` for a bad backend parameter.
    `backend_defaults` are defaults the backend read from the weights (e.g. the UNet's num_frames);
    explicit `default_*` parameters in the config win over them.
    """
    path = str(model_dir / "config.pbtxt")

    def fail(field: str, reason: str) -> ConfigError:
        return ConfigError(path, field, reason)

    name = config.name or model_dir.name
    if name != model_dir.name:
        raise fail("name", f"{name!r} must equal the model's folder name {model_dir.name!r}")
    if not config.backend:
        raise fail("backend", "required (e.g. backend: \"svd\")")
    if config.max_batch_size < 0:
        raise fail("max_batch_size", "must be >= 0")
    max_batch_size = max(1, config.max_batch_size)

    policy = version_policy_from_proto(config, path)

    # instance_group
    groups = []
    kinds = {0: "auto", 1: "gpu", 2: "cpu"}
    for i, group in enumerate(config.instance_group):
        if group.count < 0:
            raise fail(f"instance_group[{i}].count", "must be >= 1")
        if group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU and group.gpus:
            raise fail(f"instance_group[{i}].gpus", "KIND_CPU instances take no gpus")
        if any(g < 0 for g in group.gpus):
            raise fail(f"instance_group[{i}].gpus", "GPU ordinals are >= 0")
        groups.append(InstanceGroup(kind=kinds[group.kind], count=group.count or 1, gpus=tuple(group.gpus)))
    if not groups:
        groups.append(InstanceGroup(kind="auto", count=1))

    # dynamic_batching and queue policy
    batching = Batching(queue_policy=QueuePolicy(max_queue_size=default_max_queue_size))
    if config.HasField("dynamic_batching"):
        db = config.dynamic_batching
        levels = int(db.priority_levels) or 1
        if levels > MAX_PRIORITY_LEVELS:
            raise fail("dynamic_batching.priority_levels", f"{levels} is above {MAX_PRIORITY_LEVELS}")
        default_level = int(db.default_priority_level) or (1 if not db.priority_levels else 0)
        if not 1 <= default_level <= levels:
            raise fail("dynamic_batching.default_priority_level", f"must be in 1..{levels}")
        for size in db.preferred_batch_size:
            if not 1 <= size <= max_batch_size:
                raise fail("dynamic_batching.preferred_batch_size", f"{size} is outside 1..max_batch_size ({max_batch_size})")
        qp = db.default_queue_policy
        if qp.timeout_action != model_config_pb2.ModelQueuePolicy.REJECT:
            raise fail("dynamic_batching.default_queue_policy.timeout_action", "only REJECT is supported")
        if db.priority_queue_policy:
            raise fail("dynamic_batching.priority_queue_policy", "per-level queue policies are not supported; use default_queue_policy")
        batching = Batching(
            enabled=True,
            max_queue_delay_s=db.max_queue_delay_microseconds / 1e6,
            preferred_batch_sizes=tuple(sorted(set(db.preferred_batch_size))),
            priority_levels=levels,
            default_priority_level=default_level,
            queue_policy=QueuePolicy(
                max_queue_size=int(qp.max_queue_size) or default_max_queue_size,
                default_timeout_s=(qp.default_timeout_microseconds / 1e6) or None,
                allow_timeout_override=qp.allow_timeout_override,
            ),
        )

    # parameters: core defaults/limits, then the backend's own
    defaults: dict[str, Any] = {k: v for k, v in backend_defaults.items() if k in _DEFAULT_FIELDS}
    limits: dict[str, Any] = {}
    backend_params: dict[str, str] = {}
    for key, value in config.parameters.items():
        text = value.string_value.strip()
        field = f"parameters[{key!r}]"
        try:
            if key.startswith("default_") and key[len("default_"):] in _DEFAULT_FIELDS:
                k = key[len("default_"):]
                defaults[k] = _parse_number(_DEFAULT_FIELDS[k], text)
            elif key in _LIMIT_FIELDS:
                limits[key] = _parse_number(_LIMIT_FIELDS[key], text)
            else:
                backend_params[key] = text
        except ValueError:
            raise fail(field, f"{text!r} is not a number") from None
    try:
        validate_backend_parameters(backend_params)
    except ValueError as err:
        raise fail("parameters", str(err)) from None
    if "max_num_frames" not in limits and "num_frames" in backend_defaults:  # a model trained on more frames
        limits["max_num_frames"] = max(int(backend_defaults["num_frames"]), GenerationLimits.max_num_frames)
    gen_defaults = GenerationDefaults(**defaults)
    gen_limits = GenerationLimits(**limits)
    _check_defaults_within_limits(gen_defaults, gen_limits, fail)
    from PIL import Image  # Pillow's own limit: an image above it is refused as a bomb at its header

    if Image.MAX_IMAGE_PIXELS and gen_limits.max_image_pixels > Image.MAX_IMAGE_PIXELS:
        raise fail("parameters['max_image_pixels']", f"{gen_limits.max_image_pixels} is above "
                   f"{Image.MAX_IMAGE_PIXELS}, the most Pillow decodes (it refuses larger images as decompression "
                   f"bombs): a limit above it would not hold")

    warmups = []
    for i, w in enumerate(config.model_warmup):
        unknown = set(w.inputs) - _REQUEST_FIELDS
        if unknown:
            raise fail(f"model_warmup[{i}].inputs", f"unknown keys {sorted(unknown)}; use {sorted(_REQUEST_FIELDS)}")
        if w.batch_size > max_batch_size:
            raise fail(f"model_warmup[{i}].batch_size", f"{w.batch_size} is above max_batch_size ({max_batch_size})")
        warmup = Warmup(name=w.name or f"warmup_{i}", inputs=dict(w.inputs), count=max(1, w.count),
                        batch_size=max(1, w.batch_size))
        # each value as a request's, here: a bad one failed the load of every version, unnamed by file or
        # field ("invalid literal for int()"), after a traceback (repository review)
        try:
            warmup.params(gen_defaults, gen_limits)
        except InvalidRequest as err:
            raise fail(f"model_warmup[{i}].inputs[{err.field!r}]", err.reason) from None
        warmups.append(warmup)

    return ModelSettings(
        name=name, backend=config.backend, path=model_dir, max_batch_size=max_batch_size,
        version_policy=policy, instance_groups=tuple(groups), batching=batching,
        defaults=gen_defaults, limits=gen_limits, parameters=backend_params, warmup=tuple(warmups),
        proto=config,
    )


_REQUEST_FIELDS = {
    "width", "height", "num_frames", "num_inference_steps", "fps", "motion_bucket_id",
    "noise_aug_strength", "min_guidance_scale", "max_guidance_scale", "seed", "decode_chunk_size",
}
_FLOAT_REQUEST_FIELDS = {"noise_aug_strength", "min_guidance_scale", "max_guidance_scale"}


def _check_defaults_within_limits(d: GenerationDefaults, lim: GenerationLimits, fail: Callable[[str, str], ConfigError]) -> None:
    checks = [
        ("default_width", lim.min_width <= d.width <= lim.max_width and d.width % 8 == 0, "within min_width..max_width and a multiple of 8"),
        ("default_height", lim.min_height <= d.height <= lim.max_height and d.height % 8 == 0, "within min_height..max_height and a multiple of 8"),
        ("default_num_frames", 1 <= d.num_frames <= lim.max_num_frames, "within 1..max_num_frames"),
        ("default_num_inference_steps", 1 <= d.num_inference_steps <= lim.max_num_inference_steps, "within 1..max_num_inference_steps"),
        ("default_decode_chunk_size", 0 <= d.decode_chunk_size, "0 (all frames) or more"),
        ("max_decode_chunk_size", 0 <= lim.max_decode_chunk_size, "0 (max_num_frames) or more"),
        ("default_decode_chunk_size", not lim.max_decode_chunk_size or d.decode_chunk_size <= lim.max_decode_chunk_size,
         "at most max_decode_chunk_size, or 0 (all frames, in chunks of max_decode_chunk_size)"),
        ("min_width", 8 <= lim.min_width <= lim.max_width, "8 <= min_width <= max_width"),
        ("min_height", 8 <= lim.min_height <= lim.max_height, "8 <= min_height <= max_height"),
    ]
    for field, ok, rule in checks:
        if not ok:
            raise fail(f"parameters[{field!r}]", f"must be {rule}")
    # the rest by the rules a request's own values meet (admission's, in one place): a bad default would
    # load READY and then refuse every request that leaves the field unset, naming a field it never sent
    from ..domain import GenerationParams
    from ..errors import InvalidRequest
    from .admission import resolve_params

    try:
        resolve_params(GenerationParams(seed=0), d, lim)
    except InvalidRequest as err:
        raise fail(f"parameters['default_{err.field.removeprefix('output.')}']", err.reason) from None
