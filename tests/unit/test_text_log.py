"""The text log format: one line per record, whatever a caller sent."""
from __future__ import annotations


def test_the_text_log_keeps_a_callers_text_on_its_line():
    """--log-format text wrote a caller's text as it came: a newline in it forged a log line, and a
    request id with spaces passed for more fields (security audit). Such values are quoted as JSON."""
    import logging

    from videogen_server.logs import TextFormatter

    record = logging.makeLogRecord({"name": "videogen.requests", "levelname": "INFO", "levelno": 20,
                                    "msg": "request %s %s %s", "args": ("a b outcome=success", "error", "INVALID"),
                                    "videogen_request": {"request_id": "a b outcome=success", "model": "m",
                                                         "error": "x\n2026-01-01 INFO forged\x1b[31m"}})
    text = TextFormatter().format(record)
    assert "\n" not in text and "\x1b" not in text
    assert 'request "a b outcome=success" error INVALID' in text
    assert 'model=m error="x\\n2026-01-01 INFO forged\\u001b[31m"' in text
