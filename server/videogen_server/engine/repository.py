"""The model repository: `<repo>/<model>/config.pbtxt` and numeric version folders `<model>/<N>/`."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Mapping

from ..backends.base import COMPILE_ARTIFACTS_FOLDER, load_backend_class
from ..errors import ConfigError, InvalidRequest
from .model_config import (DEFAULT_MAX_QUEUE_SIZE, ModelSettings, parse_config_file, settings_from_proto,
                           version_policy_from_proto)

log = logging.getLogger(__name__)

#: Longest model name: names come from callers too, and reach logs and error messages.
MAX_MODEL_NAME = 256


def is_model_name(name: str) -> bool:
    return len(name) <= MAX_MODEL_NAME and name.isprintable()


def check_model_name(name: str) -> None:
    """Refuses a name no served model has before it reaches a log line (a newline forged one) or an
    error message (an 8 MiB name came back as 8 MB of trailers)."""
    if not is_model_name(name):
        raise InvalidRequest("model", f"at most {MAX_MODEL_NAME} printable characters")


def scan(repositories: tuple[Path, ...]) -> dict[str, Path]:
    """Model name -> model folder, for every folder holding a config.pbtxt. Names must be unique."""
    found: dict[str, Path] = {}
    for repo in repositories:
        if not repo.is_dir():
            raise ConfigError(str(repo), "--model-repository", "is not a directory")
        for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (model_dir / "config.pbtxt").is_file():
                continue
            if not is_model_name(model_dir.name):
                log.error("model folder %r: a name of at most %d printable characters is needed; not served",
                          model_dir.name[:64], MAX_MODEL_NAME)
                continue
            if not model_dir.resolve().is_relative_to(repo.resolve()):
                log.error("model folder %s leads outside its repository (%s); not served", model_dir, repo)
                continue
            if model_dir.name in found:
                log.error("model %r is in two repositories (%s and %s); serving the first",
                          model_dir.name, found[model_dir.name], model_dir)
                continue
            found[model_dir.name] = model_dir
    return found


def versions_on_disk(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.is_dir() and p.name.isascii() and p.name.isdigit() and int(p.name) > 0)


def read_settings(model_dir: Path, *, default_max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE) -> ModelSettings:
    """Parse and check a model's config.pbtxt against its backend; ConfigError names file and field."""
    config = parse_config_file(model_dir / "config.pbtxt")
    try:
        backend_cls = load_backend_class(config.backend) if config.backend else None
    except ConfigError as err:
        raise ConfigError(str(model_dir / "config.pbtxt"), err.field, err.reason) from None
    versions = versions_on_disk(model_dir)
    defaults: Mapping[str, object] = {}
    if backend_cls and versions:
        # the checkpoint's own defaults (e.g. SVD's 14 frames, SVD-XT's 25) from the highest version served,
        # not the highest on disk: a policy may serve an older version whose model differs
        served = version_policy_from_proto(config, str(model_dir / "config.pbtxt")).select(versions) or versions[::-1]
        defaults = backend_cls.model_defaults(model_dir / str(served[0]))
    return settings_from_proto(
        config, model_dir=model_dir,
        validate_backend_parameters=backend_cls.validate_parameters if backend_cls else (lambda p: None),
        backend_defaults=defaults, default_max_queue_size=default_max_queue_size)


def fingerprint(model_dir: Path) -> str:
    """Changes when config.pbtxt or any file under a version folder changes (for poll mode), except the
    compile artifacts a `videogen-server compile-artifacts` job writes beside the weights while servers run."""
    h = hashlib.sha256()
    for path in sorted(model_dir.rglob("*")):
        relative = path.relative_to(model_dir)
        if len(relative.parts) > 2 and relative.parts[1] == COMPILE_ARTIFACTS_FOLDER:
            continue
        if path.is_file():
            st = path.stat()
            h.update(f"{relative}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
