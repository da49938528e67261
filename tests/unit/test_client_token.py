"""The SDK's token sources: a token file read again when it changes, a callable asked before each call
(a server that rotates its tokens, with such a client on it: tests/integration/test_security.py)."""
from __future__ import annotations

import logging
import os

import pytest

from videogen_client import TokenFile
from videogen_client._request import call_metadata, connection_settings


def _replace(path, text):  # a new file renamed over the old one (a Secret's update, an editor's save)
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_the_first_token_of_the_file(tmp_path):
    path = tmp_path / "token"
    path.write_bytes("\ufeff# the token for videogen\r\n\r\n  s3cret  \r\nsecond\r\n".encode())
    token = TokenFile(path)
    assert token() == "s3cret"
    assert "s3cret" not in repr(token) and str(path) in repr(token)


@pytest.mark.parametrize("text, says", [("", "no token in it"), ("# only a comment\n\n", "no token in it"),
                                        ("caf\u00e9\n", "printable ASCII"), ("two words\n", "printable ASCII")])
def test_a_file_without_a_usable_token_is_refused_where_it_is_given(tmp_path, text, says):
    path = tmp_path / "token"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"token file {path}: .*{says}"):
        TokenFile(path)
    with pytest.raises(ValueError, match="No such file"):
        TokenFile(tmp_path / "missing")


def test_a_rotated_token_is_sent_from_the_next_call(tmp_path, caplog):
    path = tmp_path / "token"
    path.write_text("old\n")
    settings = connection_settings("localhost:8001", secure=False, root_certificates=None, private_key=None,
                                   certificate_chain=None, token=TokenFile(path), options=None)
    assert ("authorization", "Bearer old") in call_metadata(settings, "r1")
    _replace(path, "new\n")
    assert call_metadata(settings, None) == (("authorization", "Bearer new"),)
    # a rewrite caught halfway (empty), then gone: the last token goes on, and the log says so once each
    caplog.set_level(logging.WARNING, logger="videogen_client.auth")
    path.write_text("")
    assert [call_metadata(settings, None) for _ in range(3)] == [(("authorization", "Bearer new"),)] * 3
    path.unlink()
    assert call_metadata(settings, None) == (("authorization", "Bearer new"),)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "no token in it; sending the token read before" in warnings[0], warnings
    _replace(path, "newer\n")
    assert call_metadata(settings, None) == (("authorization", "Bearer newer"),)


def test_any_callable_is_asked_before_each_call():
    tokens = iter(["one", "two\n", "bad token"])
    settings = connection_settings("localhost:8001", secure=False, root_certificates=None, private_key=None,
                                   certificate_chain=None, token=lambda: next(tokens), options=None)
    assert settings.metadata == ()
    assert call_metadata(settings, None) == (("authorization", "Bearer one"),)
    assert call_metadata(settings, None) == (("authorization", "Bearer two"),)  # (its newline stripped)
    with pytest.raises(ValueError, match="printable ASCII"):  # never sent: gRPC would refuse it as INTERNAL
        call_metadata(settings, None)
    async def fetch():  # asked on the call's path and never awaited: refused where it is given
        return "one"

    with pytest.raises(TypeError, match="not a coroutine function"):
        connection_settings("localhost:8001", secure=False, root_certificates=None, private_key=None,
                            certificate_chain=None, token=fetch, options=None)
    for empty in ("", "  \n"):  # no token (an empty VIDEOGEN_TOKEN), as before: not an error
        assert connection_settings("localhost:8001", secure=False, root_certificates=None, private_key=None,
                                   certificate_chain=None, token=empty, options=None).metadata == ()
    with pytest.raises(ValueError, match="printable ASCII"):  # a str is checked where it is given, as before
        connection_settings("localhost:8001", secure=False, root_certificates=None, private_key=None,
                            certificate_chain=None, token="tok one", options=None)


def test_a_resent_generate_sends_the_token_of_its_resend(tmp_path):
    """A request the SDK sends again (refused after the response headers: gRPC counts it as committed and
    does not retry it itself) carries the token of the time it is resent: rotated meanwhile, the first
    attempt's was resent, and the job ended UNAUTHENTICATED once the old token was removed (review).
    A gRPC server in this process stands in for one that refuses the first attempt."""
    import asyncio
    from concurrent import futures

    import grpc
    from videogen.v1 import videogen_pb2_grpc as pb_grpc

    from tests.helpers import sample_png
    from videogen_client import AsyncVideoGenClient, InvalidArgumentError, VideoGenClient

    path = tmp_path / "token"
    seen: list[str] = []

    class RefusesThenRotates(pb_grpc.VideoGenServicer):
        def Generate(self, request, context):
            seen.append(dict(context.invocation_metadata())["authorization"])
            context.send_initial_metadata((("x-request-id", "r1"),))  # headers first: committed
            if len(seen) % 2:  # the first attempt: the token rotates while it is refused
                _replace(path, "new\n")
                context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_frames: no")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_VideoGenServicer_to_server(RefusesThenRotates(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for client_class in (VideoGenClient, AsyncVideoGenClient):
            path.write_text("old\n")
            if client_class is VideoGenClient:
                with VideoGenClient(f"127.0.0.1:{port}", token=TokenFile(path), timeout=30) as client:
                    with pytest.raises(InvalidArgumentError):
                        client.run(sample_png(), model="m", request_id="r1")
            else:
                async def run_async():
                    async with AsyncVideoGenClient(f"127.0.0.1:{port}", token=TokenFile(path), timeout=30) as client:
                        await client.run(sample_png(), model="m", request_id="r1")

                with pytest.raises(InvalidArgumentError):
                    asyncio.run(run_async())
            assert seen[-2:] == ["Bearer old", "Bearer new"], (client_class.__name__, seen)
    finally:
        server.stop(0)
