"""Bearer tokens for the client: checked once where they are given, or read from a file that may change."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Union

log = logging.getLogger(__name__)

#: What a client's ``token=`` takes: the token, or a callable returning it before each call
#: (:class:`TokenFile`, or your own: a token your identity provider renews).
TokenSource = Union[str, Callable[[], str]]


def check_token(token: str) -> str:
    """The token as it goes on the wire: stripped (read from a file, it keeps its newline), printable ASCII
    without spaces (gRPC refuses other metadata)."""
    if not isinstance(token, str):
        raise TypeError(f"a token must be a str, not {type(token).__name__}")
    token = token.strip()
    if not token or not (token.isascii() and token.isprintable()) or " " in token:
        raise ValueError("token must be printable ASCII without spaces (a bearer token)")
    return token


class TokenFile:
    """A bearer token kept in a file, read again when the file changes: give it as a client's ``token=``
    and a rotated token (a Kubernetes Secret updated in place, a renewed token written by a sidecar) is
    sent from the next call on, without a new client. A resent ``Generate`` sends the token of the time
    it is resent.

    The token is the file's first line that is neither blank nor a ``#`` comment (UTF-8, a byte-order
    mark ignored). The file is read here (a missing, unreadable or empty file raises ``ValueError``) and
    again whenever its ``stat`` changes; a change that cannot be read, or leaves no token, keeps the
    token read before (logged once). Replace the file (write a new one, rename it over) rather than
    rewrite it in place: a call made while it is half written may send half a token.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # (calls on several threads share one client)
        self._stamp = self._stat()
        self._token = self._read()
        self._failed: object = None

    def _stat(self) -> object:
        try:
            st = os.stat(self.path)
        except OSError as err:
            return ("error", err.errno)
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _read(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"token file {self.path}: {getattr(err, 'strerror', None) or err}") from None
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    return check_token(line)
                except ValueError as err:
                    raise ValueError(f"token file {self.path}: {err}") from None
        raise ValueError(f"token file {self.path}: no token in it")

    def __call__(self) -> str:
        stamp = self._stat()
        with self._lock:
            if stamp != self._stamp and stamp != self._failed:
                try:
                    self._token = self._read()
                except ValueError as err:
                    log.warning("%s; sending the token read before", err)
                    self._failed = stamp
                    return self._token
                self._stamp, self._failed = stamp, None
            return self._token

    def __repr__(self) -> str:  # never the token
        return f"TokenFile({str(self.path)!r})"
