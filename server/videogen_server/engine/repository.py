"""The model repository: `<repo>/<model>/config.pbtxt` and numeric version folders `<model>/<N>/`."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import Mapping, Optional

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


def scan(repositories: tuple[Path, ...], unreadable: Optional[dict[str, str]] = None,
         skipped: Optional[list[str]] = None) -> dict[str, Path]:
    """Model name -> model folder, for every folder holding a config.pbtxt. Names must be unique (the
    first repository's wins). A folder that cannot be read (its permissions, e.g. a volume's root-owned
    lost+found) is no model and stops no other: it goes in `unreadable` (name -> why) when given. A
    folder not served for its name or place (a bad name, a link out of its repository, a name taken by
    an earlier repository) is logged, or said in `skipped` when given (a poller logs it once)."""
    found: dict[str, Path] = {}

    def skip(message: str) -> None:
        if skipped is None:
            log.error("%s", message)
        else:
            skipped.append(message)

    for repo in repositories:
        if not repo.is_dir():
            raise ConfigError(str(repo), "--model-repository", "is not a directory")
        for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:  # (os.stat: Path.is_file hides some errors, which differ between Python versions)
                if not stat.S_ISREG(os.stat(model_dir / "config.pbtxt").st_mode):
                    continue
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as err:
                if unreadable is not None:
                    unreadable[model_dir.name] = f"{model_dir}: {err.strerror or err}"
                continue
            if not is_model_name(model_dir.name):
                skip(f"model folder {model_dir.name[:64]!r}: a name of at most {MAX_MODEL_NAME} printable "
                     f"characters is needed; not served")
                continue
            if not model_dir.resolve().is_relative_to(repo.resolve()):
                skip(f"model folder {model_dir} leads outside its repository ({repo}); not served")
                continue
            if model_dir.name in found:
                skip(f"model {model_dir.name!r} is in two repositories ({found[model_dir.name]} and {model_dir}); "
                     f"serving the first")
                continue
            found[model_dir.name] = model_dir
    return found


def is_version_folder(name: str) -> bool:
    """A version folder's name: a positive integer as written in decimal (`2`, not `02`: the version is
    loaded from `<model>/<version>`, so `0002` would name a folder that does not exist)."""
    return name.isascii() and name.isdigit() and name == str(int(name)) and int(name) > 0


def versions_on_disk(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if is_version_folder(p.name) and p.is_dir())


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


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What poll mode compares to see a model change: its config.pbtxt, and each version folder apart,
    so that a change to one version reloads that one only (a reload recompiles: minutes on a GPU)."""

    config: str
    versions: tuple[tuple[int, str], ...]

    def version(self, version: int) -> Optional[str]:
        return dict(self.versions).get(version)


def _stat_line(path: Path, relative: str) -> str:
    try:
        st = path.stat()  # (a symlink: its target's)
    except OSError as err:  # a dangling or looping link (an editor's lock file), a file gone since listed
        return f"{relative}:unreadable:{err.errno}\n"
    # mode and owner too: a weights file made readable (save_pretrained writes 0600) is a change to load;
    # inode and ctime too: a file renamed over another of the same size and mtime (tar x, cp -p and
    # rsync -t copy mtimes, tar's in whole seconds) is new, and nobody sets a ctime
    return (f"{relative}:{st.st_size}:{st.st_mtime_ns}:{st.st_mode:o}:{st.st_uid}:{st.st_gid}:"
            f"{st.st_ino}:{st.st_ctime_ns}\n")


def _version_fingerprint(version_dir: Path) -> str:
    """Every file under a version folder, symlinks followed (a version folder swapped atomically through a
    symlink, as git-sync and many deploy tools do, is a change), except the compile artifacts a
    `videogen-server compile-artifacts` job writes beside the weights while servers run."""
    h = hashlib.sha256(f"{version_dir.resolve()}\n".encode())
    seen: set[tuple[int, int]] = set()  # folders walked: a symlink loop is walked once
    for root, dirs, files in os.walk(version_dir, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        base = Path(root)
        relative_root = base.relative_to(version_dir)
        # folders by name only: their times change as files come and go (a compile-artifacts job's)
        dirs[:] = sorted(d for d in dirs if not (relative_root == Path(".") and d == COMPILE_ARTIFACTS_FOLDER))
        h.update(f"{relative_root}/\n".encode())
        for name in sorted(files):
            h.update(_stat_line(base / name, str(relative_root / name)).encode())
    return h.hexdigest()


def fingerprint(model_dir: Path) -> Fingerprint:
    """config.pbtxt and each version folder (`is_version_folder`); files elsewhere in the model folder (a
    staging folder for the next version, notes) change nothing."""
    versions = tuple((int(p.name), _version_fingerprint(p)) for p in sorted(model_dir.iterdir(), key=lambda p: p.name)
                     if is_version_folder(p.name) and p.is_dir())
    return Fingerprint(config=_stat_line(model_dir / "config.pbtxt", "config.pbtxt"), versions=versions)
