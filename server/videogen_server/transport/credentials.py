"""TLS certificates and bearer-token files read again when they change on disk, without a restart.

cert-manager renews a certificate at two thirds of its life and Kubernetes rewrites a mounted Secret's
files in place (an atomic swap of the `..data` link); a token file is rotated the same way. A server
that read them once served the old certificate until it expired, or refused the new tokens, unless
restarted, and a restart here is a model load and warm-up (minutes of a GPU serving nothing).

Each file set is polled (`os.stat`: device, inode, size, mtime, ctime) every
`--credentials-reload-seconds`. A change is loaded once the files have stayed the same for one more
interval (a writer copying the certificate, then the key, is not caught halfway), checked as at start
(OpenSSL loads the certificate with its key, then gRPC builds a TLS server of them; tokens as printable
ASCII, at least one); a set that does not pass is logged once and the server keeps serving what it
loaded before (`videogen_credentials_reload_failing` 1 until the files load). A new certificate serves
the connections opened after it is loaded: gRPC asks for it before each TLS handshake; open
connections keep theirs until they close (`--max-connection-age-seconds` bounds how long).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import grpc

from ..config import check_tls_files, read_token_file

log = logging.getLogger(__name__)


def fingerprint(paths: Sequence[Path]) -> tuple:
    """What says a file changed, for each path (a file that cannot be read: its error)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as err:
            out.append(("error", err.errno))
        else:
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


class FilesChanging(Exception):
    """The files changed while being read: not a failure, a load to try once they have settled."""


class Reloadable(Protocol):
    #: the `credentials` label: "tls" or "tokens"
    kind: str

    def files(self) -> tuple[Path, ...]: ...

    def load(self) -> None:
        """Reads the files and serves them from now on; ValueError (naming the flag) if they cannot serve."""


class TlsFiles:
    """The gRPC port's certificate, key and client CA as dynamic server credentials: gRPC calls `_fetch`
    (on one of its own threads) before each TLS handshake, and takes a configuration it returns."""

    kind = "tls"

    def __init__(self, cert: Path, key: Path, client_ca: Optional[Path]) -> None:
        self._paths = (cert, key, client_ca)
        self._lock = threading.Lock()
        self._pending: Optional[grpc.ServerCertificateConfiguration] = None
        for attempt in range(3):
            #: the files' fingerprint before they were read (taken after, a change in between was never loaded)
            self.fingerprint = fingerprint(self.files())
            try:
                self._initial = self._read()
                break
            except FilesChanging:
                if attempt == 2:
                    raise ValueError("--tls-cert/--tls-key: the files kept changing while being read") from None

    def files(self) -> tuple[Path, ...]:
        return tuple(p for p in self._paths if p is not None)

    def _bytes(self) -> tuple[Optional[bytes], ...]:
        try:
            return tuple(Path(p).read_bytes() if p is not None else None for p in self._paths)
        except OSError as err:
            raise ValueError(f"{err.filename}: {err.strerror or err}") from None

    def _read(self) -> grpc.ServerCertificateConfiguration:
        # what OpenSSL checked must be what gRPC gets: read, check the files, read again, compare
        before = self._bytes()
        check_tls_files(*self._paths)
        cert, key, ca = self._bytes()
        if (cert, key, ca) != before:
            raise FilesChanging("the TLS files changed while being read")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._initial, self._fetch,
                                                   require_client_authentication=self._paths[2] is not None)

    def load(self) -> None:
        configuration = self._read()
        with self._lock:
            self._pending = configuration

    def _fetch(self) -> Optional[grpc.ServerCertificateConfiguration]:
        """A configuration once after each load, else None (gRPC keeps the one it has)."""
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration


class TokenFile:
    """`--auth-token-file`: its tokens, with the fixed ones (VIDEOGEN_AUTH_TOKENS), given to `apply`."""

    kind = "tokens"

    def __init__(self, path: Path, fixed: tuple[str, ...], apply: Callable[[tuple[str, ...]], None]) -> None:
        self._path = path
        self._fixed = fixed
        self._apply = apply

    def files(self) -> tuple[Path, ...]:
        return (self._path,)

    def load(self) -> None:
        self._apply(self._fixed + read_token_file(self._path))


@dataclasses.dataclass
class _Watch:
    item: Reloadable
    loaded: tuple  # the files' fingerprint when last loaded
    seen: tuple  # at the last poll
    failed: Optional[tuple] = None  # a fingerprint whose load failed (reported once)


class CredentialReloader:
    """Polls each registered file set and loads it again when it changes (see the module's text)."""

    def __init__(self, metrics=None) -> None:
        self._watches: list[_Watch] = []
        self._metrics = metrics

    def add(self, item: Reloadable, loaded: tuple) -> None:
        """Registers a set already loaded: `loaded` is its files' fingerprint taken before they were read."""
        self._watches.append(_Watch(item, loaded=loaded, seen=loaded))
        if self._metrics is not None:  # exported from the start: an alert on a series born failing misses
            self._metrics.credentials_reload_failing.labels(item.kind).set(0)
            for result in ("ok", "error"):
                self._metrics.credentials_reloads.labels(item.kind, result)

    def __bool__(self) -> bool:
        return bool(self._watches)

    def poll(self) -> None:
        """One look at every set (blocking file reads: run off the event loop)."""
        for watch in self._watches:
            self._poll(watch)

    def _poll(self, watch: _Watch) -> None:
        kind = watch.item.kind
        fp = fingerprint(watch.item.files())
        if fp != watch.seen:  # changed since the last look: load it once it has settled
            watch.seen = fp
            return
        if fp == watch.loaded:  # (back to the files that serve: nothing is failing)
            if watch.failed is not None:
                watch.failed = None
                self._count(kind, None, failing=0)
            return
        if fp == watch.failed:
            return
        names = ", ".join(map(str, watch.item.files()))
        try:
            watch.item.load()
        except FilesChanging:
            watch.seen = ()  # (a change again: loaded once it has settled)
            return
        except Exception as err:  # noqa: BLE001 - any failure leaves the previous files serving
            watch.failed = fp
            self._count(kind, "error", failing=1)
            log.warning("cannot load the new %s files (%s): %s; still serving the ones loaded before",
                        kind, names, err, exc_info=not isinstance(err, ValueError))
            return
        watch.loaded, watch.failed = fp, None
        self._count(kind, "ok", failing=0)
        log.info("loaded the new %s files (%s)", kind, names)

    def _count(self, kind: str, result: Optional[str], failing: int) -> None:
        if self._metrics is not None:
            if result is not None:
                self._metrics.credentials_reloads.labels(kind, result).inc()
            self._metrics.credentials_reload_failing.labels(kind).set(failing)

    async def run(self, interval: float) -> None:
        """Polls every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.poll)
            except Exception:  # a bug here must not end the reloads for good
                log.exception("checking the credential files for changes")
