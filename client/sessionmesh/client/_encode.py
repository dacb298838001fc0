"""What a caller sends, encoded, and refused here when the agent could not take it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from google.protobuf.struct_pb2 import Struct, Value

from sessionmesh.errors import Code, InvalidArguments, UsageError
from sessionmesh.wire.codec import NotJsonLike, TooDeep, set_struct, set_value
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
