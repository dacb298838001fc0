"""Error statuses on the wire: a gRPC code and message, plus ``google.rpc`` details (an
ErrorInfo in domain ``sessionmesh``; a DebugInfo with the remote traceback when the agent
runs with debug on). Agents encode with :func:`encode`; clients decode with :func:`decode`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from sessionmesh.wire.keys import STATUS_DETAILS_KEY
from sessionmesh.wire.reasons import ERROR_DOMAIN

#: Longest message or metadata value sent: error texts quote user input.
MAX_TEXT = 2000


class Code(enum.IntEnum):
    """A status code as the wire carries it (gRPC's numbering): what a failed call says,
    on every side, without naming grpc's own enum."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorDetail:
    """What a status says beyond its code and message."""

    reason: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    debug: str = ""


def encode(
    reason: str, metadata: Mapping[str, str] | None = None, debug: str = ""
) -> list[any_pb2.Any]:
    """The details of a failed call: its ErrorInfo, then its DebugInfo if any."""
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=reason,
            domain=ERROR_DOMAIN,
            metadata={k: v[:MAX_TEXT] for k, v in (metadata or {}).items()},
        )
    )
    details = [info]
    if debug:
        dbg = any_pb2.Any()
        dbg.Pack(error_details_pb2.DebugInfo(stack_entries=debug.splitlines(keepends=True)))
        details.append(dbg)
    return details


def to_grpc_status(code: Code, message: str, details: Sequence[any_pb2.Any]) -> grpc.Status:
    """For ``context.abort_with_status``: the status of a unary or streaming RPC."""
    from grpc_status import rpc_status  # only agents send statuses

    status = status_pb2.Status(code=int(code), message=message[:MAX_TEXT], details=details)
    return rpc_status.to_status(status)


def decode(details: Sequence[any_pb2.Any]) -> ErrorDetail:
    """Reason, metadata and remote traceback from a status's details (others are ignored)."""
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
    return ErrorDetail(reason, metadata, debug)


def details_in(trailers: grpc.aio.Metadata | None) -> Sequence[any_pb2.Any]:
    """The details a failed RPC carried in its trailers."""
    for raw in trailers.get_all(STATUS_DETAILS_KEY) if trailers is not None else ():
        if isinstance(raw, bytes):
            details: Sequence[any_pb2.Any] = status_pb2.Status.FromString(raw).details
            return details
    return ()


def status_code(number: int) -> Code:
    """The code for a number (UNKNOWN for one gRPC does not define)."""
    try:
        return Code(number)
    except ValueError:
        return Code.UNKNOWN
