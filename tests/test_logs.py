"""Logging: JSON lines off a terminal, library reconnect noise kept to one warning line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from worker.logs import configure_logging
from worker.settings import WorkerSection


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    yield buffer
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def test_json_lines_with_bound_context(stream: io.StringIO) -> None:
    """Off a terminal every event is one JSON object with its bound fields, level and time."""
    configure_logging(WorkerSection(), stream)
    structlog.get_logger("t").bind(endpoint="billing", attempt=2).warning(
        "delivery_retry_scheduled", next_delay_s=30
    )
    record = json.loads(stream.getvalue())
    assert record["event"] == "delivery_retry_scheduled"
    assert (record["endpoint"], record["attempt"], record["next_delay_s"]) == ("billing", 2, 30)
    assert record["level"] == "warning"
    assert record["timestamp"].endswith("Z")


def test_level_filter(stream: io.StringIO) -> None:
    """log_level drops events below it."""
    configure_logging(WorkerSection(log_level="warning"), stream)
    structlog.get_logger("t").info("delivery_succeeded")
    assert stream.getvalue() == ""


def test_amqp_library_errors_become_warnings_without_traceback(stream: io.StringIO) -> None:
    """aio-pika/aiormq reconnect errors are logged as single-line JSON warnings."""
    configure_logging(WorkerSection(), stream)
    try:
        raise ConnectionError("broker went away")
    except ConnectionError:
        logging.getLogger("aiormq.connection").exception("Unexpected connection close")
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "warning"
    assert "exception" not in record
    assert "Traceback" not in line
