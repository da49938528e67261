"""The request log's refusal limit (the server at its limits: tests/integration/test_observability.py)."""
from __future__ import annotations

import asyncio
import logging

from videogen_server.engine import engine


def test_refusals_past_the_second_s_share_are_summed_in_one_line(caplog):
    async def burst() -> list[bool]:
        log = engine._RefusalLog()
        taken = [log.take("RESOURCE_EXHAUSTED") for _ in range(20)] + [log.take("NOT_FOUND") for _ in range(5)]
        await asyncio.sleep(1.2)  # the summary's time
        taken.append(log.take("RESOURCE_EXHAUSTED"))  # a new second: logged one by one again
        return taken

    with caplog.at_level(logging.INFO, logger="videogen.requests"):
        taken = asyncio.run(burst())
    assert taken[:10] == [True] * 10 and taken[10:25] == [False] * 15 and taken[25] is True
    [summary] = [r.getMessage() for r in caplog.records]
    assert summary == ("15 more requests refused in the last second, not logged one by one (counted in "
                       "videogen_requests_total): NOT_FOUND=5, RESOURCE_EXHAUSTED=10")


def test_a_pending_summary_is_logged_at_flush(caplog):
    """At shutdown the loop that would run the summary stops: Engine.shutdown flushes it (review)."""
    async def burst() -> None:
        log = engine._RefusalLog()
        for _ in range(12):
            log.take("UNAVAILABLE")
        log.flush()

    with caplog.at_level(logging.INFO, logger="videogen.requests"):
        asyncio.run(burst())
    assert [r.getMessage() for r in caplog.records] == [
        "2 more requests refused in the last second, not logged one by one (counted in videogen_requests_total): "
        "UNAVAILABLE=2"]
