"""Server-side error statuses: a ``Fail`` raised anywhere in a handler becomes one gRPC status."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sessionmesh.core._reasons import code_of
from sessionmesh.wire import status
from sessionmesh.wire.names import short
from sessionmesh.wire.reasons import Reason
from sessionmesh.wire.status import Code

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import grpc
    from google.protobuf import any_pb2


class Fail(Exception):
    """An expected failure of a call, with the status and ErrorInfo the client will see. The
    code is the reason's (``sessionmesh.core._reasons``) unless ``code`` says otherwise; a
    failure with no reason of ours (``""``) must give one."""

    def __init__(
        self,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
        *,
        code: Code | None = None,
        debug: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code if code is not None else code_of(reason)
        self.reason = reason
        self.message = message[: status.MAX_TEXT]
        self.metadata = dict(metadata or {})
        self.debug = debug

    def details(self) -> list[any_pb2.Any]:
        return status.encode(self.reason, self.metadata, self.debug)

    def status(self) -> grpc.Status:  # grpc, for the type checker only
        """For ``context.abort_with_status``: the code, message and details of a Call."""
        return status.to_grpc_status(self.code, self.message, self.details())


def session_not_found(session_id: str) -> Fail:
    return Fail(
        Reason.SESSION_NOT_FOUND,
        f"session {short(session_id)}... is not open on this agent: it was closed, expired, or "
        "never existed. Open a new session; its state is gone.",
        {"session_id": session_id},
    )


def elsewhere(session_id: str, owner: str, endpoint: str, where: str, then: str) -> Fail:
    """SESSION_ELSEWHERE: the session is on instance ``owner`` (at ``endpoint``, if known),
    ``where`` saying how it came there and ``then`` what the caller does."""
    at = f" at {endpoint}" if endpoint else ""
    return Fail(
        Reason.SESSION_ELSEWHERE,
        f"session {short(session_id)}... {where} {owner}{at}; {then}",
        {"session_id": session_id, "owner_instance": owner, "owner_endpoint": endpoint},
    )


def moved(session_id: str, owner: str, locate: Callable[[str], str | None] | None) -> Fail:
    """A session that moved from this replica to instance ``owner``: the redirect."""
    endpoint = (locate(owner) if locate is not None else None) or ""
    return elsewhere(
        session_id, owner, endpoint, "moved to instance", "nothing ran here: send the call there"
    )


def session_closed(session_id: str) -> Fail:
    return Fail(
        Reason.SESSION_NOT_FOUND,
        f"session {short(session_id)}... was closed while this call ran in it; the call was "
        "cancelled. Open a new session; its state is gone.",
        {"session_id": session_id},
        code=Code.CANCELLED,
    )


def tool_not_found(name: str, known: list[str]) -> Fail:
    return Fail(
        Reason.TOOL_NOT_FOUND,
        f"no tool {name!r} on this agent; it has: {', '.join(known) or 'no tools'}",
        {"tool": name},
    )


def invalid_arguments(field: str, message: str) -> Fail:
    return Fail(Reason.INVALID_ARGUMENTS, message, {"field": field})


def invalid_stream(message: str) -> Fail:
    return Fail(Reason.INVALID_STREAM, message)


def not_json(tool: str, verb: str, exc: Exception) -> Fail:
    """A result, chunk or input item the wire cannot carry: no JSON form, or too deep."""
    return Fail(
        Reason.TOOL_FAILED,
        f"tool {tool!r} {verb} a value the wire cannot carry: {exc}",
        {"type": type(exc).__name__, "message": str(exc)},
        code=Code.INTERNAL,
    )
