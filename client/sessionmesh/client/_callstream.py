"""One auto session's calls over one CallStream RPC: a message each way per call.

A message on an open stream costs about half a unary call, so once a session is open its
calls go this way. Answers come back in request order, which is the session's order anyway.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import grpc

from sessionmesh.client._codec import from_value
from sessionmesh.client._transport import Endpoint
from sessionmesh.client.errors import (
    AgentUnavailable,
    CallTimeout,
    RemoteError,
    map_rpc_error,
    map_status,
    status_code,
)
from sessionmesh.v1 import session_service_pb2 as pb

Metadata = tuple[tuple[str, str], ...]

#: Extra time the client waits past a call's own deadline before giving up on the stream.
_DEADLINE_SLACK = 1.0


def _copy(error: RemoteError) -> RemoteError:
    return type(error)(
        error.message,
        code=error.code,
        reason=error.reason,
        metadata=error.metadata,
        debug=error.debug,
    )


class CallStream:
    __slots__ = ("_call", "_lock", "_pending", "_reader", "broken")

    def __init__(self, endpoint: Endpoint, metadata: Metadata) -> None:
        self._call: grpc.aio.StreamStreamCall[pb.CallStreamRequest, pb.CallStreamResponse] = (
            endpoint.stub.CallStream(metadata=metadata)
        )
        self._pending: collections.deque[asyncio.Future[pb.CallStreamResponse]] = (
            collections.deque()
        )
        self._lock = asyncio.Lock()
        self.broken: RemoteError | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def call(self, message: pb.CallStreamRequest, deadline: float | None) -> Any:
        if self.broken is not None:
            raise _copy(self.broken)
        future: asyncio.Future[pb.CallStreamResponse] = asyncio.get_running_loop().create_future()
        async with self._lock:  # one write at a time, queued in the order written
            self._pending.append(future)
            try:
                await self._call.write(message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                with contextlib.suppress(ValueError):
                    self._pending.remove(future)
                if isinstance(exc, grpc.aio.AioRpcError):
                    raise map_rpc_error(exc) from exc
                raise _copy(self.broken or AgentUnavailable("the call stream ended")) from None
        if deadline is None:
            answer = await future
        else:
            try:
                answer = await asyncio.wait_for(future, deadline + _DEADLINE_SLACK)
            except TimeoutError:
                raise CallTimeout(
                    f"no answer within {deadline} s", code=grpc.StatusCode.DEADLINE_EXCEEDED
                ) from None
        if answer.HasField("error"):
            error = answer.error
            raise map_status(status_code(error.code), error.message, error.details)
        return from_value(answer.result)

    async def _read(self) -> None:
        error: RemoteError
        try:
            while True:
                answer = await self._call.read()
                if answer is grpc.aio.EOF:
                    error = AgentUnavailable("the agent ended the call stream")
                    break
                future = self._pending.popleft()
                if not future.done():
                    future.set_result(answer)  # type: ignore[arg-type]
        except grpc.aio.AioRpcError as exc:
            error = map_rpc_error(exc)
        except asyncio.CancelledError:
            error = AgentUnavailable("the call stream was closed")
            self._fail(error)
            raise
        self._fail(error)

    def _fail(self, error: RemoteError) -> None:
        self.broken = error
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(_copy(error))

    async def aclose(self) -> None:
        """Half-close and stop reading; calls still waiting fail with AgentUnavailable."""
        if self.broken is None:
            async with self._lock:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await self._call.done_writing()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self._call.cancel()
