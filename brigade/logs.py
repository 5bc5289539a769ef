"""structlog set-up: JSON lines in production, readable lines on a terminal.

Every line a job handler writes carries its ``job_id`` (bound through contextvars), and
secrets never reach a log: settings hold them as ``SecretStr``.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog


def configure_logging(
    level: str = "info", fmt: Literal["auto", "json", "console"] = "auto"
) -> None:
    json_lines = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor
    if json_lines:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        # Each module's logger is built on its first call, not on every call (structlog's
        # advice for production): a job's path logs several times, level filtered or not.
        # Call this before anything logs (the CLI's first step).
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library: keep them at warning, on stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
