"""What a full queue tells its caller about retrying: RetryInfo's delay and gRPC's pushback trailer."""
from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from videogen_server.errors import OutOfMemory, QueueFull
from videogen_server.transport.status import retry_pushback, status_details


def _retry_info(exc) -> float | None:
    status = status_pb2.Status.FromString(status_details(exc, grpc.StatusCode.RESOURCE_EXHAUSTED, "m")[1])
    for packed in status.details:
        if packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            packed.Unpack(info)
            return info.retry_delay.ToMilliseconds() / 1000
    return None


def test_the_estimate_is_told_and_bounded():
    assert _retry_info(QueueFull("full", retry_after=12.34)) == 12.34  # the scheduler's estimate
    assert _retry_info(QueueFull("full", retry_after=0.0)) == 0.1  # an idle instance: soon, not at once
    assert _retry_info(QueueFull("full")) == 1.0  # no estimate
    assert _retry_info(OutOfMemory("oom")) is None  # the same request would fail the same way


def test_the_pushback_is_bounded_and_respects_the_deadline():
    assert retry_pushback(12.34, None) == ("grpc-retry-pushback-ms", "1000")  # the next server may have room
    assert retry_pushback(0.25, None) == ("grpc-retry-pushback-ms", "250")
    assert retry_pushback(0.25, 10.0) == ("grpc-retry-pushback-ms", "250")
    assert retry_pushback(12.34, 4.0) == ("grpc-retry-pushback-ms", "1000")  # bounded: fits the deadline
    assert retry_pushback(12.34, 0.8) == ("grpc-retry-pushback-ms", "-1")  # even the bounded wait cuts it
    assert retry_pushback(1.0, 1.0) == ("grpc-retry-pushback-ms", "-1")
