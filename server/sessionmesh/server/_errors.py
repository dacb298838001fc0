"""Server-side error statuses: a ``Fail`` raised anywhere in a handler becomes one gRPC status."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from sessionmesh.client._wire import ERROR_DOMAIN, Reason

if TYPE_CHECKING:
    from collections.abc import Mapping

_MAX_TEXT = 2000


class Fail(Exception):
    """An expected failure of a call, with the status and ErrorInfo the client will see."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
        debug: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message[:_MAX_TEXT]
        self.metadata = {k: v[:_MAX_TEXT] for k, v in (metadata or {}).items()}
        self.debug = debug

    def details(self) -> list[any_pb2.Any]:
        info = any_pb2.Any()
        info.Pack(
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
            )
        )
        details = [info]
        if self.debug:
            dbg = any_pb2.Any()
            dbg.Pack(
                error_details_pb2.DebugInfo(stack_entries=self.debug.splitlines(keepends=True))
            )
            details.append(dbg)
        return details

    def status(self) -> grpc.Status:
        """For ``context.abort_with_status``: the code, message and details of a Call."""
        status = status_pb2.Status(
            code=self.code.value[0], message=self.message, details=self.details()
        )
        return rpc_status.to_status(status)


def session_not_found(session_id: str) -> Fail:
    return Fail(
        grpc.StatusCode.NOT_FOUND,
        Reason.SESSION_NOT_FOUND,
        f"session {session_id[:14]}... is not open on this agent: it was closed, expired, or "
        "never existed. Open a new session; its state is gone.",
        {"session_id": session_id},
    )


def tool_not_found(name: str, known: list[str]) -> Fail:
    return Fail(
        grpc.StatusCode.NOT_FOUND,
        Reason.TOOL_NOT_FOUND,
        f"no tool {name!r} on this agent; it has: {', '.join(known) or 'no tools'}",
        {"tool": name},
    )


def invalid_arguments(field: str, message: str) -> Fail:
    return Fail(
        grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_ARGUMENTS, message, {"field": field}
    )


def invalid_stream(message: str) -> Fail:
    return Fail(grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_STREAM, message)


def not_json(tool: str, verb: str, exc: Exception) -> Fail:
    return Fail(
        grpc.StatusCode.INTERNAL,
        Reason.TOOL_FAILED,
        f"tool {tool!r} {verb} a value with no JSON form: {exc}",
        {"type": "NotJsonLike", "message": str(exc)},
    )
