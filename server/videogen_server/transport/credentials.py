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


def _der(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at `at`."""
    tag, size = data[at], data[at + 1]
    at += 2
    if size & 0x80:  # long form: the next (size & 0x7f) bytes hold the length
        n = size & 0x7F
        size, at = int.from_bytes(data[at:at + n], "big"), at + n
    if at + size > len(data):
        raise IndexError("truncated")
    return tag, at, at + size


def certificate_not_after(pem: bytes) -> float:
    """The end of validity (seconds since the epoch) of the first certificate of a PEM chain: the
    server's own. From its DER (Certificate > tbsCertificate > validity > notAfter), as Python's ssl
    reads no certificate outside a connection and `cryptography` is not a server dependency."""
    import base64
    import binascii
    import datetime
    import re

    block = re.search(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", pem, re.S)
    if block is None:
        raise ValueError("no PEM certificate")
    try:
        der = base64.b64decode(b"".join(block.group(1).split()), validate=True)
        _, at, _ = _der(der, 0)  # Certificate
        _, at, _ = _der(der, at)  # tbsCertificate
        tag, _, end = _der(der, at)
        if tag == 0xA0:  # [0] version
            at = end
        for _ in range(3):  # serialNumber, signature, issuer
            at = _der(der, at)[2]
        _, at, _ = _der(der, at)  # validity
        at = _der(der, at)[2]  # notBefore
        tag, start, end = _der(der, at)  # notAfter
        text = der[start:end].decode("ascii")
    except (binascii.Error, IndexError, UnicodeDecodeError) as err:
        raise ValueError(f"not a DER certificate ({err})") from None
    if tag == 0x17:  # UTCTime, YYMMDDHHMMSSZ: 50-99 are 19xx (RFC 5280)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime, YYYYMMDDHHMMSSZ
        raise ValueError(f"notAfter is not a time (DER tag {tag:#x})")
    when = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


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
        self.not_after: Optional[float] = None  # the served certificate's end of validity
        for attempt in range(3):
            #: the files' fingerprint before they were read (taken after, a change in between was never loaded)
            self.fingerprint = fingerprint(self.files())
            try:
                self._initial, self.not_after = self._read()
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

    def _read(self) -> tuple[grpc.ServerCertificateConfiguration, Optional[float]]:
        """The configuration for gRPC and the certificate's end of validity (None if unreadable)."""
        # what OpenSSL checked must be what gRPC gets: read, check the files, read again, compare
        before = self._bytes()
        check_tls_files(*self._paths)
        cert, key, ca = self._bytes()
        if (cert, key, ca) != before:
            raise FilesChanging("the TLS files changed while being read")
        try:
            not_after: Optional[float] = certificate_not_after(cert)
        except ValueError as err:  # (OpenSSL and gRPC took it: only the gauge goes without)
            log.warning("--tls-cert: its end of validity could not be read (%s): no expiry metric", err)
            not_after = None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca), not_after

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._initial, self._fetch,
                                                   require_client_authentication=self._paths[2] is not None)

    def load(self) -> None:
        configuration, not_after = self._read()
        with self._lock:
            self._pending = configuration
        self.not_after = not_after

    def _fetch(self) -> Optional[grpc.ServerCertificateConfiguration]:
        """A configuration once after each load, else None (gRPC keeps the one it has)."""
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration


class TokenFile:
    """`--auth-token-file` (or `flag`'s): its tokens, with the fixed ones (VIDEOGEN_AUTH_TOKENS), given to
    `apply`."""

    def __init__(self, path: Path, fixed: tuple[str, ...], apply: Callable[[tuple[str, ...]], None],
                 flag: str = "--auth-token-file", kind: str = "tokens") -> None:
        self.kind = kind  # (the metrics' label)
        self._path = path
        self._fixed = fixed
        self._apply = apply
        self._flag = flag

    def files(self) -> tuple[Path, ...]:
        return (self._path,)

    def load(self) -> None:
        self._apply(self._fixed + read_token_file(self._path, self._flag))


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
        self._set_expiry(item)

    def _set_expiry(self, item: Reloadable) -> None:
        not_after = getattr(item, "not_after", None)
        if self._metrics is not None and not_after is not None:
            self._metrics.tls_certificate_expiry.labels(item.kind).set(not_after)

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
        self._set_expiry(watch.item)
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
