"""How sessionmesh's processes log: text for people, or one JSON object a line for machines
(``--log-format json``), with who logged it (agent, instance), the session and the trace a
record belongs to as fields of their own; gRPC core's own chatter off unless asked for."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from sessionmesh import tracing
from sessionmesh.core.cli import iso_time
from sessionmesh.server._session import current_session

LOG_FORMAT_ENV = "SESSIONMESH_LOG_FORMAT"
#: gRPC core logs (C++: "I1207 12:00:00 ... fork_posix.cc ...") to stderr on its own,
#: ignoring Python's logging: errors only, unless the user set it or asked (_quiet.py).
GRPC_VERBOSITY_ENV = "GRPC_VERBOSITY"

#: Who this process is, once known (``serve`` sets it): fields of every JSON line.
context: dict[str, str] = {}


class JsonLines(logging.Formatter):
    """One JSON object a line: ISO time (UTC), level, logger, message; the agent and its
    instance, the session (shortened) and the trace when there is one; the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **context,
        }
        session = current_session()
        if session is not None:
            line["session"] = session.short_id
        trace_id = tracing.current_trace_id()
        if trace_id:
            line["trace_id"] = trace_id
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure(log_format: str, level: int, *, grpc_logs: bool) -> None:
    """Set up the process's logging; children started by ``run`` inherit the format, and
    gRPC core's level (``_quiet.py`` set it before gRPC loaded)."""
    os.environ[LOG_FORMAT_ENV] = log_format
    if grpc_logs and os.environ.get(GRPC_VERBOSITY_ENV) == "ERROR":
        del os.environ[GRPC_VERBOSITY_ENV]  # run's agents log as gRPC likes, too
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLines()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler])


def as_json_line(text: str, **fields: str) -> str:
    """A line another process wrote, as one JSON line with ``fields``: a JSON object gets
    them added (what it says itself wins), anything else becomes the message of one."""
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        record = {
            "time": iso_time(),
            "level": "INFO",
            "logger": "output",
            "message": text,
        }
    return json.dumps({**fields, **record})
