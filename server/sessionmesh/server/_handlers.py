"""Registering the SessionService with a deserializer that never fails the RPC by itself.

gRPC's generated registration parses each request with ``FromString``; a message it cannot
parse (nested past the parser's depth limit, or garbage) then fails the call with a bare
UNKNOWN, and on a stream it ends the reading abruptly. Here such a message arrives as
:class:`Undecodable`, and the adapters answer it with INVALID_ARGUMENT and an ErrorInfo.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from sessionmesh.server._errors import Fail, invalid_arguments
from sessionmesh.v1 import session_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["SessionService"]


class Undecodable:
    """A request message that could not be parsed."""

    __slots__ = ("error", "type_name")

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error

    def fail(self) -> Fail:
        return invalid_arguments(
            "request",
            f"a {self.type_name} message could not be decoded ({self.error}); objects and "
            "arrays nest at most 32 levels deep",
        )


def _parser(cls: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def parse(data: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return Undecodable(cls.DESCRIPTOR.name, str(exc).rpartition(": ")[2] or str(exc))

    return parse


def _unary(method: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await context.abort_with_status(request.fail().status())
        return await method(request, context)

    return handle


def add_to_server(servicer: object, server: grpc.aio.Server) -> None:
    """What ``add_SessionServiceServicer_to_server`` does, with tolerant deserializers."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        request_cls: type[Message] = getattr(pb, method.input_type.name)
        response_cls: type[Message] = getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        options: dict[str, Any] = {
            "request_deserializer": _parser(request_cls),
            "response_serializer": response_cls.SerializeToString,
        }
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(behaviour, **options)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behaviour), **options
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
