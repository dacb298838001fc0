"""The one table of what a failure means: each reason an agent answers with, the status code
it travels with, and the error a client raises for it. Agents take the code from here
(``server/_errors.py``); clients the error (``from_status``, called by each transport's edge).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sessionmesh.errors import (
    AgentUnavailable,
    CallCancelled,
    CallTimeout,
    InvalidArguments,
    PermissionDenied,
    RemoteError,
    ResourceExhausted,
    SessionElsewhere,
    SessionNotFound,
    SessionRequired,
    SessionStoreUnavailable,
    StateNotJson,
    ToolFailed,
    ToolNotFound,
    ToolTimeout,
    TooManySessions,
    Unauthenticated,
)
from sessionmesh.wire import status
from sessionmesh.wire.reasons import Reason
from sessionmesh.wire.status import Code

if TYPE_CHECKING:
    from collections.abc import Sequence

    from google.protobuf import any_pb2

#: reason -> (the code an agent sends it with, the error a client raises for it).
REASONS: dict[str, tuple[Code, type[RemoteError]]] = {
    Reason.SESSION_NOT_FOUND: (Code.NOT_FOUND, SessionNotFound),
    Reason.SESSION_REQUIRED: (Code.FAILED_PRECONDITION, SessionRequired),
    Reason.SESSION_ELSEWHERE: (Code.FAILED_PRECONDITION, SessionElsewhere),
    Reason.STATE_NOT_JSON: (Code.FAILED_PRECONDITION, StateNotJson),
    Reason.TOOL_NOT_FOUND: (Code.NOT_FOUND, ToolNotFound),
    Reason.INVALID_ARGUMENTS: (Code.INVALID_ARGUMENT, InvalidArguments),
    Reason.INVALID_STREAM: (Code.INVALID_ARGUMENT, RemoteError),
    Reason.TOOL_FAILED: (Code.UNKNOWN, ToolFailed),
    Reason.TOOL_TIMEOUT: (Code.DEADLINE_EXCEEDED, ToolTimeout),
    Reason.TOO_MANY_SESSIONS: (Code.RESOURCE_EXHAUSTED, TooManySessions),
    Reason.TOO_MANY_CALLS: (Code.RESOURCE_EXHAUSTED, ResourceExhausted),
    Reason.SHUTTING_DOWN: (Code.UNAVAILABLE, AgentUnavailable),
    Reason.SESSION_STORE_UNAVAILABLE: (Code.UNAVAILABLE, SessionStoreUnavailable),
    Reason.UNAUTHENTICATED: (Code.UNAUTHENTICATED, Unauthenticated),
    Reason.PERMISSION_DENIED: (Code.PERMISSION_DENIED, PermissionDenied),
    Reason.INSTANCE_LOST: (Code.FAILED_PRECONDITION, RemoteError),
}

#: A status without a reason of ours (grpc's own, or a peer that is not an agent).
_BY_CODE: dict[Code, type[RemoteError]] = {
    Code.DEADLINE_EXCEEDED: CallTimeout,
    Code.UNAVAILABLE: AgentUnavailable,
    Code.CANCELLED: CallCancelled,
    Code.RESOURCE_EXHAUSTED: ResourceExhausted,
    Code.UNAUTHENTICATED: Unauthenticated,
    Code.PERMISSION_DENIED: PermissionDenied,
}


def code_of(reason: str) -> Code:
    """The status code an agent sends ``reason`` with."""
    return REASONS[reason][0]


def from_status(code: Code, message: str, details: Sequence[any_pb2.Any]) -> RemoteError:
    """The one mapping from a status (code, message, ErrorInfo detail) to a sessionmesh error:
    the class is chosen by the reason, else by the code."""
    detail = status.decode(details)
    known = REASONS.get(detail.reason)
    cls = known[1] if known is not None else _BY_CODE.get(code, RemoteError)
    return cls(
        message, code=code, reason=detail.reason, metadata=detail.metadata, debug=detail.debug
    )


def in_python_terms(error: RemoteError) -> RemoteError:
    """The agent's message speaks to every client (metadata keys); say what to write here."""
    if isinstance(error, SessionRequired):
        return SessionRequired(
            f"{error.message.partition(':')[0]}: make the proxy with session_required=True "
            "(it opens the session with the first call and closes it when you are done), "
            "or use call_with_session(session_id=...) with an id from create_session()",
            code=error.code,
            reason=error.reason,
            metadata=error.metadata,
        )
    return error
