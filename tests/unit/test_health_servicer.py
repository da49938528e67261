"""The server's grpc.health.v1 servicer (transport.server.Health) beside grpc_health's asyncio one."""
from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from videogen_server.transport.server import Health

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_forgetting_a_name_while_the_drain_sets_every_name_not_serving():
    """enter_graceful_shutdown walks the status table awaiting each watched name's lock (a Watch holds
    it while it writes to a slow reader); a `forget` (a model that left the repository) waiting on such
    a lock changed the table under the walk: the drain's stop failed with "dictionary changed size
    during iteration" (review)."""

    async def scenario() -> dict:
        health = Health()
        for name in ("", "videogen.v1.VideoGen/a", "videogen.v1.VideoGen/b"):
            await health.set(name, SERVING)
        held = health._server_watchers["videogen.v1.VideoGen/a"]  # as an open Watch on it has
        await held.acquire()
        forgetting = asyncio.ensure_future(health.forget("videogen.v1.VideoGen/a"))
        shutting = asyncio.ensure_future(health.enter_graceful_shutdown())
        await asyncio.sleep(0.01)  # both wait on the held lock
        held.release()
        await asyncio.wait_for(asyncio.gather(forgetting, shutting), 5)
        return dict(health._server_status)

    statuses = asyncio.run(scenario())
    assert statuses.get("") == NOT_SERVING and statuses.get("videogen.v1.VideoGen/b") == NOT_SERVING
    assert statuses.get("videogen.v1.VideoGen/a") in (None, NOT_SERVING)  # forgotten or shut down: not SERVING
