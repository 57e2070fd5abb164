"""Structured logs: one JSON object a line, carrying job_id."""

from __future__ import annotations

import json
import logging

from jobcast.logs import JsonFormatter


def test_json_lines_carry_job_id() -> None:
    record = logging.makeLogRecord(
        {"name": "jobcast.worker", "levelname": "INFO", "msg": "job %s %s", "args": ("abc", "completed"),
         "job_id": "abc", "attempt": 2}
    )  # fmt: skip
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "job abc completed"
    assert entry["job_id"] == "abc"
    assert entry["attempt"] == 2
    assert entry["level"] == "info"
    assert entry["logger"] == "jobcast.worker"
    assert entry["ts"].endswith("Z")


def test_exceptions_are_included() -> None:
    try:
        raise ValueError("bad input")
    except ValueError:
        import sys

        record = logging.LogRecord("jobcast", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError: bad input" in entry["exception"]
    assert entry["message"] == "failed"
