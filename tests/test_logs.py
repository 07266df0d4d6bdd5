"""Logging: JSON lines off a terminal, library reconnect noise kept to one warning line."""

from __future__ import annotations

import io
import json
import logging
import uuid
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


def _crash_with_personal_data(customer_email: str) -> None:
    """Raises with ``customer_email`` in a frame local, as a delivery handler would hold data."""
    order_note = f"ship to {customer_email}"
    raise RuntimeError(f"handler bug after {len(order_note)} characters")


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_tracebacks_never_show_frame_locals(stream: io.StringIO, log_format: str) -> None:
    """A crash logged through structlog or stdlib logging shows the exception type and the
    frame names, never the values of frame locals (event data, personal data)."""
    # Made at run time: console tracebacks show source lines, which must not contain it.
    canary = f"canary-{uuid.uuid4().hex}@example.test"
    section = WorkerSection(log_format="json" if log_format == "json" else "console")
    configure_logging(section, stream)
    try:
        _crash_with_personal_data(canary)
    except RuntimeError:
        structlog.get_logger("t").exception("delivery_handler_crashed", message_id="m-1")
        logging.getLogger("some.library").error("library_failed", exc_info=True)
    output = stream.getvalue()
    assert canary not in output
    assert canary.split("@")[0].removeprefix("canary-") not in output
    assert output.count("RuntimeError") >= 2
    assert output.count("_crash_with_personal_data") >= 2
    if log_format == "json":
        records = [json.loads(line) for line in output.splitlines()]
        assert [r["event"] for r in records] == ["delivery_handler_crashed", "library_failed"]
        frames = [frame for r in records for frame in r["exception"][0]["frames"]]
        assert frames and not any(frame.get("locals") for frame in frames)
