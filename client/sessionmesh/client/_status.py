"""The one place a gRPC status becomes a sessionmesh error (errors.py draws the hierarchy)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from sessionmesh.client.errors import (
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

if TYPE_CHECKING:
    from collections.abc import Sequence

    from google.protobuf import any_pb2

_BY_REASON: dict[str, type[RemoteError]] = {
    Reason.SESSION_NOT_FOUND: SessionNotFound,
    Reason.SESSION_REQUIRED: SessionRequired,
    Reason.TOOL_NOT_FOUND: ToolNotFound,
    Reason.INVALID_ARGUMENTS: InvalidArguments,
    Reason.TOOL_FAILED: ToolFailed,
    Reason.TOOL_TIMEOUT: ToolTimeout,
    Reason.TOO_MANY_SESSIONS: TooManySessions,
    Reason.SHUTTING_DOWN: AgentUnavailable,
    Reason.SESSION_ELSEWHERE: SessionElsewhere,
    Reason.UNAUTHENTICATED: Unauthenticated,
    Reason.PERMISSION_DENIED: PermissionDenied,
    Reason.SESSION_STORE_UNAVAILABLE: SessionStoreUnavailable,
    Reason.STATE_NOT_JSON: StateNotJson,
}

_BY_CODE: dict[grpc.StatusCode, type[RemoteError]] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: CallTimeout,
    grpc.StatusCode.UNAVAILABLE: AgentUnavailable,
    grpc.StatusCode.CANCELLED: CallCancelled,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.NOT_FOUND: ToolNotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


#: What grpc.aio makes the status of a call when one of its writes fails (the connection
#: is gone), in place of the status the peer would have sent: not the agent's word.
_WRITE_FAILED = (grpc.StatusCode.INTERNAL, "Internal error from Core")


def from_rpc_error(exc: grpc.aio.AioRpcError) -> RemoteError:
    """A failed RPC as a sessionmesh error (its status details carry the ErrorInfo)."""
    code = exc.code()
    if (code, exc.details()) == _WRITE_FAILED and not exc.trailing_metadata():
        return AgentUnavailable(
            "the connection to the agent broke (a write to it failed)",
            code=grpc.StatusCode.UNAVAILABLE,
        )
    return from_status(code, exc.details() or code.name, status.details_in(exc.trailing_metadata()))


def from_status(code: grpc.StatusCode, message: str, details: Sequence[any_pb2.Any]) -> RemoteError:
    """The one mapping from a status (code, message, ErrorInfo detail) to a sessionmesh error."""
    detail = status.decode(details)
    cls = _BY_REASON.get(detail.reason) or _BY_CODE.get(code, RemoteError)
    if cls is ToolNotFound and not detail.reason:
        cls = RemoteError  # NOT_FOUND from something other than an agent (e.g. no such method)
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
