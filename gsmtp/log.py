"""structlog set-up: JSON lines (or console when on a TTY), one event per fact.

Events are past-tense names (`connection_opened`, `message_queued`, ...) with fields
`conn_id`, `peer`, `msg_id`, `rcpt`, `outcome`; one `msg_id` greps a message's whole
life. Never log AUTH payloads or message bodies. Text a peer chose is escaped and capped
before it reaches a log line (log injection, CWE-117).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_MAX_FIELD = 200


def configure(level: str = "info", fmt: str = "json") -> None:
    renderer: Any
    if fmt == "console" and sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(**fields: Any) -> Any:
    return structlog.get_logger().bind(**fields)


def printable(text: str) -> str:
    """Peer-supplied text made safe for one log field: controls escaped, length capped."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= _MAX_FIELD else escaped[:_MAX_FIELD] + "..."
