"""The client's one place where a failed gRPC call becomes a sessionmesh error (the meaning
of each reason is the core's table: ``sessionmesh.core._reasons``)."""

from __future__ import annotations

import grpc

from sessionmesh.core._reasons import from_status
from sessionmesh.errors import AgentUnavailable, RemoteError
from sessionmesh.wire import status
from sessionmesh.wire.status import Code

#: What grpc.aio makes the status of a call when one of its writes fails (the connection
#: is gone), in place of the status the peer would have sent: not the agent's word.
_WRITE_FAILED = (grpc.StatusCode.INTERNAL, "Internal error from Core")


def from_rpc_error(exc: grpc.aio.AioRpcError) -> RemoteError:
    """A failed RPC as a sessionmesh error (its status details carry the ErrorInfo)."""
    code = exc.code()
    if (code, exc.details()) == _WRITE_FAILED and not exc.trailing_metadata():
        return AgentUnavailable(
            "the connection to the agent broke (a write to it failed)", code=Code.UNAVAILABLE
        )
    return from_status(
        status.status_code(code.value[0]),
        exc.details() or code.name,
        status.details_in(exc.trailing_metadata()),
    )
