"""JSON-like Python values <-> google.protobuf Struct/Value, as the contract encodes them.

Numbers follow JSON: the wire has one number type (double), so an integral number in the
safe-integer range decodes as ``int`` and anything else as ``float``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.struct_pb2 import NULL_VALUE, Struct, Value

_SAFE_INT = 2**53


class NotJsonLike(TypeError):
    """A value that has no JSON form; ``path`` says where it sits (``$.a[2].b``)."""

    def __init__(self, path: str, value: object) -> None:
        self.path = path
        super().__init__(f"{path} is a {type(value).__name__}, which has no JSON form")


def _check(obj: object, path: str) -> None:
    """Find the first non-JSON-like part of ``obj``; only run after the fast path failed."""
    if obj is None or isinstance(obj, bool | int | float | str):
        if isinstance(obj, int) and not isinstance(obj, bool) and abs(obj) > _SAFE_INT:
            raise NotJsonLike(path, obj)
        return
    if isinstance(obj, Mapping):
        for key, item in obj.items():
            if not isinstance(key, str):
                raise NotJsonLike(f"{path} key {key!r}", key)
            _check(item, f"{path}.{key}")
        return
    if isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
            _check(item, f"{path}[{i}]")
        return
    raise NotJsonLike(path, obj)


def set_value(out: Value, obj: object) -> None:
    """Write ``obj`` into ``out``; raises :class:`NotJsonLike` naming the offending path."""
    try:
        if obj is None:
            out.null_value = NULL_VALUE
        elif obj is True or obj is False:
            out.bool_value = obj
        elif isinstance(obj, str):
            out.string_value = obj
        elif isinstance(obj, int | float):
            if isinstance(obj, int) and abs(obj) > _SAFE_INT:
                raise NotJsonLike("$", obj)
            out.number_value = obj
        elif isinstance(obj, Mapping):
            out.struct_value.update(obj)
        elif isinstance(obj, list | tuple):
            out.list_value.extend(obj)
        else:
            raise NotJsonLike("$", obj)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, NotJsonLike):
            raise
        _check(obj, "$")
        raise NotJsonLike("$", obj) from exc


def set_struct(out: Struct, obj: Mapping[str, Any]) -> None:
    """Write keyword arguments into ``out``; raises :class:`NotJsonLike` naming the argument."""
    try:
        out.update(obj)
    except (ValueError, TypeError) as exc:
        for key, item in obj.items():
            _check(item, key)
        raise NotJsonLike("arguments", obj) from exc


def from_value(v: Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "number_value":
        n = v.number_value
        if n.is_integer() and -_SAFE_INT <= n <= _SAFE_INT:
            return int(n)
        return n
    if kind == "string_value":
        return v.string_value
    if kind == "struct_value":
        return {k: from_value(x) for k, x in v.struct_value.fields.items()}
    if kind == "list_value":
        return [from_value(x) for x in v.list_value.values]
    if kind == "bool_value":
        return v.bool_value
    return None


def from_struct(s: Struct) -> dict[str, Any]:
    return {k: from_value(x) for k, x in s.fields.items()}
