"""The exceptions sessionmesh raises, and the one place gRPC errors become them.

MeshError                        everything below
├── UsageError                   a programming mistake: e.g. a closed client used again
└── RemoteError                  the agent answered with an error (.code, .reason, .metadata)
    ├── SessionError
    │   ├── SessionLost          the session is gone; nothing reopens it silently
    │   │   ├── SessionNotFound            SESSION_NOT_FOUND: unknown, closed or expired id
    │   │   ├── SessionOwnerLost           the instance that owned it left the registry
    │   │   └── SessionOwnerUnavailable    its owner cannot be reached (an AgentUnavailable too)
    │   ├── SessionElsewhere     SESSION_ELSEWHERE: sent to an instance that does not own it
    │   └── SessionRequired      SESSION_REQUIRED: the tool needs a session
    ├── ToolNotFound             TOOL_NOT_FOUND
    ├── InvalidArguments         INVALID_ARGUMENTS (.field)
    ├── ToolFailed               TOOL_FAILED: the tool raised (.remote_type, .remote_message)
    │   └── ToolTimeout          TOOL_TIMEOUT: it overran its own timeout (a CallTimeout too)
    ├── TooManySessions          TOO_MANY_SESSIONS
    ├── ResourceExhausted        e.g. a message over the size limit
    └── TransportError           no usable answer from the agent
        ├── CallTimeout          the call's deadline passed
        ├── AgentUnavailable     cannot be reached, or shutting down (SHUTTING_DOWN)
        └── CallCancelled
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from sessionmesh.client._wire import ERROR_DOMAIN, Reason

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "AgentUnavailable",
    "CallCancelled",
    "CallTimeout",
    "InvalidArguments",
    "MeshError",
    "RemoteError",
    "ResourceExhausted",
    "SessionElsewhere",
    "SessionError",
    "SessionLost",
    "SessionNotFound",
    "SessionOwnerLost",
    "SessionOwnerUnavailable",
    "SessionRequired",
    "TooManySessions",
    "ToolFailed",
    "ToolNotFound",
    "ToolTimeout",
    "TransportError",
    "UsageError",
    "map_rpc_error",
    "map_status",
    "status_code",
]

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class MeshError(Exception):
    """Base of every error sessionmesh raises."""


class UsageError(MeshError):
    """The API was used wrongly (a closed client, a bad option): fix the calling code."""


class RemoteError(MeshError):
    """An agent answered with an error status."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        debug: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        #: The remote traceback, when the agent runs with debug on.
        self.debug = debug

    def __str__(self) -> str:
        tag = self.reason or self.code.name
        return f"{tag}: {self.message}"


class SessionError(RemoteError):
    """Something about the call's session."""


class SessionLost(SessionError):
    """The session is gone; its state cannot be reached. The proxy will not open a new one."""

    @property
    def session_id(self) -> str:
        return self.metadata.get("session_id", "")


class SessionNotFound(SessionLost):
    """The agent does not know the session id: never existed, closed or expired."""


class SessionOwnerLost(SessionLost):
    """The instance that owned the session is gone (killed, or stopped), and its state too."""


class SessionElsewhere(SessionError):
    """The call reached an instance that does not own the session; ``owner_endpoint`` says
    where it lives. (The Python proxy never sees this: it sends calls to the owner.)"""

    @property
    def owner_endpoint(self) -> str:
        return self.metadata.get("owner_endpoint", "")


class SessionRequired(SessionError):
    """The tool needs a session and the call carried none."""


class ToolNotFound(RemoteError):
    """The agent has no tool by that name or capability."""


class InvalidArguments(RemoteError):
    """The arguments do not fit the tool's signature; ``field`` names the parameter."""

    @property
    def field(self) -> str:
        return self.metadata.get("field", "")


class ToolFailed(RemoteError):
    """The tool raised; ``remote_type`` and ``remote_message`` describe the exception."""

    @property
    def remote_type(self) -> str:
        return self.metadata.get("type", "")

    @property
    def remote_message(self) -> str:
        return self.metadata.get("message", "")


class TooManySessions(RemoteError):
    """The agent is at its cap of open sessions."""


class ResourceExhausted(RemoteError):
    """The agent refused for lack of a resource, e.g. a message over the size limit."""


class TransportError(RemoteError):
    """No usable answer came from the agent."""


class CallTimeout(TransportError):
    """The call's deadline passed before an answer came."""


class ToolTimeout(ToolFailed, CallTimeout):
    """The tool ran past the timeout its agent gives it."""


class AgentUnavailable(TransportError):
    """The agent cannot be reached, or is shutting down."""


class SessionOwnerUnavailable(SessionLost, AgentUnavailable):
    """The session's owner cannot be reached now. With retries the proxy tries it again
    (never running a call twice); once the registry drops the owner this becomes
    SessionOwnerLost."""


class CallCancelled(TransportError):
    """The call was cancelled."""


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
}

_BY_CODE: dict[grpc.StatusCode, type[RemoteError]] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: CallTimeout,
    grpc.StatusCode.UNAVAILABLE: AgentUnavailable,
    grpc.StatusCode.CANCELLED: CallCancelled,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.NOT_FOUND: ToolNotFound,
}


def map_rpc_error(exc: grpc.aio.AioRpcError) -> RemoteError:
    """A failed RPC as a sessionmesh error (its status details carry the ErrorInfo)."""
    details: Sequence[any_pb2.Any] = ()
    for raw in exc.trailing_metadata().get_all(_STATUS_DETAILS_KEY):
        if isinstance(raw, bytes):
            details = status_pb2.Status.FromString(raw).details
    code = exc.code()
    return map_status(code, exc.details() or code.name, details)


def map_status(code: grpc.StatusCode, message: str, details: Sequence[any_pb2.Any]) -> RemoteError:
    """The one mapping from a status (code, message, ErrorInfo detail) to a sessionmesh error."""
    reason = ""
    metadata: dict[str, str] = {}
    debug = ""
    for detail in details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                reason = info.reason
                metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.DebugInfo.DESCRIPTOR):
            dbg = error_details_pb2.DebugInfo()
            detail.Unpack(dbg)
            debug = "".join(dbg.stack_entries)
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, RemoteError)
    if cls is ToolNotFound and not reason:
        cls = RemoteError  # NOT_FOUND from something other than an agent (e.g. no such method)
    return cls(message, code=code, reason=reason, metadata=metadata, debug=debug)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The StatusCode for a numeric code (UNKNOWN for one gRPC does not define)."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)
