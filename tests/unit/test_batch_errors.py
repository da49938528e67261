"""A failed batch's error, one object per request (engine/instance.py `_own_copy`): the same type, message
and attributes (what transport/status.py maps to a gRPC status), no traceback, no shared state."""
from __future__ import annotations

import pytest

from videogen_server.engine.instance import _own_copy
from videogen_server.errors import ConfigError, InvalidRequest, OutOfMemory, QueueFull


def _raised(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


@pytest.mark.parametrize("exc", [
    RuntimeError("injected error at step 2"),
    InvalidRequest("num_frames", "must be at most 25"),  # __init__ takes other parameters than its args
    ConfigError("m/config.pbtxt", "parameters", "bad"),
    QueueFull("full", retry_after=1.5),
    OutOfMemory("out of device memory for this request"),
])
def test_each_request_gets_its_own_error(exc):
    exc = _raised(exc)
    exc.__notes__ = ["note"]
    own = _own_copy(exc)
    assert own is not exc and type(own) is type(exc) and own.args == exc.args and str(own) == str(exc)
    assert vars(own) == vars(exc)
    assert own.__traceback__ is None and exc.__traceback__ is not None
    own.__notes__.append("only mine")
    assert exc.__notes__ == ["note"]


def test_torch_errors_copy_too():
    torch = pytest.importorskip("torch")
    exc = _raised(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    own = _own_copy(exc)
    assert own is not exc and type(own) is torch.OutOfMemoryError and str(own) == str(exc)


def test_an_error_that_cannot_be_made_again_is_handed_on():
    class Odd(Exception):
        def __new__(cls, *args):
            if args:
                raise TypeError("no")
            return super().__new__(cls)

    exc = Odd()
    exc.args = ("x",)
    assert _own_copy(exc) is exc
