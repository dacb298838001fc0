"""Session ids are secrets: logs that are not ours must not print them either. grpc's own
loggers quote what they received (a malformed ``x-session-id`` header: "Invalid encoding
on b'<the whole id>\\xff'"); their records go through :class:`Redact` first."""

from __future__ import annotations

import logging

from sessionmesh.wire.names import redact

#: The loggers grpc's Python layer writes to (filters act on the logger a record is made
#: on, not on its parents).
GRPC_LOGGERS = (
    "grpc._cython.cygrpc",
    "grpc._common",
    "grpc._server",
    "grpc._channel",
    "grpc.aio._server",
    "grpc.aio._call",
    "grpc.aio._channel",
)


class Redact(logging.Filter):
    """Shortens every session id in a record's message (and drops its arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


_FILTER = Redact()


def guard_grpc_logs() -> None:
    """Put :class:`Redact` on grpc's loggers (once; idempotent)."""
    for name in GRPC_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
