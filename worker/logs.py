"""structlog set-up: JSON lines, or console rendering on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from producer.connection import AMQP_LIBRARIES, is_connection_noise
from worker.settings import WorkerSection

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _expected_library_noise(record: logging.LogRecord) -> bool:
    """The AMQP libraries' reports of a connection problem are dropped: the worker logs
    connection changes itself. Their other errors come through as warnings without
    tracebacks: for a worker that reconnects by itself they are expected."""
    if is_connection_noise(record):
        return False
    if record.name.split(".")[0] in AMQP_LIBRARIES:
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
    return True


def configure_logging(section: WorkerSection, stream: TextIO | None = None) -> None:
    stream = stream if stream is not None else sys.stderr
    use_console = section.log_format == "console" or (
        section.log_format == "auto" and stream.isatty()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks never show frame locals: they hold event data (personal data) and secrets.
    # structlog's dict_tracebacks and ConsoleRenderer both render them by default.
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False)
        )
        if use_console
        else structlog.processors.JSONRenderer()
    )
    tail: list[structlog.typing.Processor] = (
        []
        if use_console
        else [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        ]
    )
    structlog.configure(
        processors=[*shared, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[section.log_level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.addFilter(_expected_library_noise)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tail,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in AMQP_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
