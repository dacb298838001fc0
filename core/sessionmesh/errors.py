"""The exceptions sessionmesh raises. A failed call's status becomes one of them in one
place (``sessionmesh.core._reasons``, the table of reasons); ``.code`` is a :class:`Code`.

MeshError                        everything below
├── UsageError                   a programming mistake: e.g. a closed client used again
└── RemoteError                  the agent answered with an error (.code, .reason, .metadata)
    ├── SessionError
    │   ├── SessionLost          the session is gone; nothing reopens it silently
    │   │   ├── SessionNotFound            SESSION_NOT_FOUND: unknown, closed or expired id
    │   │   ├── SessionOwnerLost           the instance that owned it left the registry
    │   │   └── SessionOwnerUnavailable    its owner cannot be reached (an AgentUnavailable too)
    │   ├── SessionElsewhere     SESSION_ELSEWHERE: sent to an instance that does not own it
    │   ├── StateNotJson         STATE_NOT_JSON: a durable session's state has no JSON form
    │   └── SessionRequired      SESSION_REQUIRED: the tool needs a session
    ├── ToolNotFound             TOOL_NOT_FOUND
    ├── InvalidArguments         INVALID_ARGUMENTS (.field)
    ├── ToolFailed               TOOL_FAILED: the tool raised (.remote_type, .remote_message)
    │   └── ToolTimeout          TOOL_TIMEOUT: it overran its own timeout (a CallTimeout too)
    ├── TooManySessions          TOO_MANY_SESSIONS
    ├── ResourceExhausted        e.g. a message over the size limit
    ├── Unauthenticated          UNAUTHENTICATED: no credentials, or ones the server does not know
    ├── PermissionDenied         PERMISSION_DENIED: known caller, not allowed this
    └── TransportError           no usable answer from the agent
        ├── CallTimeout          the call's deadline passed
        ├── AgentUnavailable     cannot be reached, or shutting down (SHUTTING_DOWN)
        │   └── SessionStoreUnavailable   SESSION_STORE_UNAVAILABLE: nothing saved; retry
        └── CallCancelled
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sessionmesh.wire.status import Code

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from google.protobuf import any_pb2

__all__ = [
    "AgentUnavailable",
    "CallCancelled",
    "CallTimeout",
    "Code",
    "InvalidArguments",
    "MeshError",
    "PermissionDenied",
    "RemoteError",
    "ResourceExhausted",
    "SessionElsewhere",
    "SessionError",
    "SessionLost",
    "SessionNotFound",
    "SessionOwnerLost",
    "SessionOwnerUnavailable",
    "SessionRequired",
    "SessionStoreUnavailable",
    "StateNotJson",
    "TooManySessions",
    "ToolFailed",
    "ToolNotFound",
    "ToolTimeout",
    "TransportError",
    "Unauthenticated",
    "UsageError",
]


class MeshError(Exception):
    """Base of every error sessionmesh raises."""


class UsageError(MeshError):
    """The API was used wrongly (a closed client, a bad option): fix the calling code."""


class RemoteError(MeshError):
    """An agent answered with an error status."""

    #: The status code an error of this class has when it was not given one.
    default_code = Code.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: Code | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        debug: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        #: The remote traceback, when the agent runs with debug on.
        self.debug = debug

    @classmethod
    def from_status(
        cls, code: Code, message: str, details: Sequence[any_pb2.Any] = ()
    ) -> RemoteError:
        """The error a status stands for (its details carry the ErrorInfo): the class is
        chosen by the reason, else the code, whichever class this is called on."""
        from sessionmesh.core._reasons import from_status  # the one mapping

        return from_status(code, message, details)

    def copy(self) -> RemoteError:
        """The same error as a new exception (one failure may fail several calls)."""
        return type(self)(
            self.message,
            code=self.code,
            reason=self.reason,
            metadata=self.metadata,
            debug=self.debug,
        )

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


class StateNotJson(SessionError):
    """A durable session's state held a value with no JSON form after the call (``key``
    names it): the call was refused and the session keeps its last saved state."""

    @property
    def key(self) -> str:
        return self.metadata.get("key", "")


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


class Unauthenticated(RemoteError):
    """The server does not know who is calling: no client certificate or bearer token, or
    one it does not accept."""

    default_code = Code.UNAUTHENTICATED


class PermissionDenied(RemoteError):
    """The server knows the caller and does not allow it this call."""

    default_code = Code.PERMISSION_DENIED


class TransportError(RemoteError):
    """No usable answer came from the agent."""


class CallTimeout(TransportError):
    """The call's deadline passed before an answer came."""

    default_code = Code.DEADLINE_EXCEEDED


class ToolTimeout(ToolFailed, CallTimeout):
    """The tool ran past the timeout its agent gives it."""


class AgentUnavailable(TransportError):
    """The agent cannot be reached, or is shutting down."""

    default_code = Code.UNAVAILABLE


class SessionOwnerUnavailable(SessionLost, AgentUnavailable):
    """The session's owner cannot be reached now. With retries the proxy tries it again
    (never running a call twice); once the registry drops the owner this becomes
    SessionOwnerLost."""


class SessionStoreUnavailable(AgentUnavailable):
    """A durable session's store did not answer: the call changed nothing (its state is as
    last saved). Retrying is safe; with ``retry_count`` the proxy does."""


class CallCancelled(TransportError):
    """The call was cancelled."""

    default_code = Code.CANCELLED
