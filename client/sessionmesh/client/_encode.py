"""What a caller sends, encoded, and refused here when the agent could not take it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf.struct_pb2 import Struct, Value

from sessionmesh.client.errors import InvalidArguments, UsageError
from sessionmesh.wire.codec import NotJsonLike, TooDeep, set_struct, set_value
from sessionmesh.wire.reasons import Reason


def _too_deep(exc: TooDeep, what: str) -> InvalidArguments:
    return InvalidArguments(
        f"{what} {exc}: the agent could not decode it, so it is not sent",
        code=grpc.StatusCode.INVALID_ARGUMENT,
        reason=Reason.INVALID_ARGUMENTS,
        metadata={"field": exc.path},
    )


def encode_arguments(out: Struct, args: Mapping[str, Any]) -> None:
    """A call's arguments into ``out``: one nested past the limit is InvalidArguments, one
    with no JSON form a UsageError (a programming mistake)."""
    try:
        set_struct(out, args)
    except TooDeep as exc:
        raise _too_deep(exc, "argument") from None
    except NotJsonLike as exc:
        raise UsageError(f"argument {exc}") from None


def encode_input(out: Value, item: object) -> None:
    """One item of a streamed call's input, refused as its arguments would be."""
    try:
        set_value(out, item)
    except TooDeep as exc:
        raise _too_deep(exc, "input item") from None
    except NotJsonLike as exc:
        raise UsageError(f"input item {exc}") from None
