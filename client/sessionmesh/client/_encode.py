"""What a caller sends: a call's tool and arguments, encoded once; a session id given by hand,
checked; refused here when the agent could not take it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from google.protobuf.struct_pb2 import Struct, Value

from sessionmesh.errors import Code, InvalidArguments, UsageError
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire.codec import NotJsonLike, TooDeep, set_struct, set_value
from sessionmesh.wire.names import SESSION_ID_SHAPE, well_formed
from sessionmesh.wire.reasons import Reason

M = TypeVar("M")
V = TypeVar("V")


def _encode(what: str, setter: Callable[[M, V], None], out: M, value: V) -> None:
    try:
        try:
            setter(out, value)
        except TooDeep:
            raise
        except NotJsonLike:
            # A model, a dataclass, a date, a UUID, an enum, a set...: the JSON form the
            # agent's pydantic validates against the tool's annotation. (The first try may
            # have written part of it.)
            out.Clear()  # type: ignore[attr-defined]
            setter(out, _jsonable(value))
    except TooDeep as exc:
        raise InvalidArguments(
            f"{what} {exc}: the agent could not decode it, so it is not sent",
            code=Code.INVALID_ARGUMENT,
            reason=Reason.INVALID_ARGUMENTS,
            metadata={"field": exc.path},
        ) from None
    except NotJsonLike as exc:
        raise UsageError(f"{what} {exc}") from None


def _jsonable(value: V) -> V:
    from pydantic_core import PydanticSerializationError, to_jsonable_python

    try:
        jsonable: V = to_jsonable_python(value)
    except PydanticSerializationError:
        return value  # what has no JSON form at all is reported as such
    return jsonable


def encode_arguments(out: Struct, args: Mapping[str, Any]) -> None:
    """A call's arguments into ``out``: JSON values as they are, richer ones (pydantic
    models, dataclasses, dates, UUIDs, enums, sets) as their JSON form; one nested past the
    limit is InvalidArguments, one with no JSON form a UsageError (a programming mistake)."""
    _encode("argument", set_struct, out, args)


def encode_input(out: Value, item: object) -> None:
    """One item of a streamed call's input, refused as its arguments would be."""
    _encode("input item", set_value, out, item)


#: Calls bigger than this (encoded) skip the shared Exchange stream (GrpcEndpoint.call).
EXCHANGE_MAX_BYTES = 64 * 1024


def split_call(
    tool: str, call: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The tool and arguments of ``proxy(...)``: keywords for its own tool, or
    ``("other_tool", {args})`` for another tool of the agent."""
    if not call:
        return tool, kwargs
    if not isinstance(call[0], str) or len(call) > 2:
        raise UsageError(
            "call a proxy as proxy(**kwargs), proxy('tool', {args}) or proxy('tool', **kwargs)"
        )
    args = dict(call[1]) if len(call) == 2 and call[1] else {}
    args.update(kwargs)
    return call[0], args


def checked_session_id(session_id: str) -> str:
    """A session id given by hand, refused before anything is sent when it is none."""
    if not well_formed(session_id):
        raise InvalidArguments(
            f"{session_id[:24]!r} is not a session id: {SESSION_ID_SHAPE}",
            code=Code.INVALID_ARGUMENT,
            reason=Reason.INVALID_ARGUMENTS,
            metadata={"field": "session_id"},
        )
    return session_id


class Big:
    """A call too big to share the Exchange stream, encoded once."""

    __slots__ = ("call_id", "data")

    def __init__(self, data: bytes, call_id: str) -> None:
        self.data = data
        self.call_id = call_id

    @classmethod
    def of(cls, call: pb.CallRequest) -> Big | None:
        data = call.SerializeToString()
        return cls(data, call.call_id) if len(data) > EXCHANGE_MAX_BYTES else None

    def encoded(self, call: pb.CallRequest) -> bytes:
        """The bytes to send; encoded again only if a call id was given it since."""
        if call.call_id != self.call_id:
            self.data, self.call_id = call.SerializeToString(), call.call_id
        return self.data
