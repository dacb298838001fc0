"""JSON-like Python values <-> google.protobuf Struct/Value, as the contract encodes them.

Numbers follow JSON: the wire has one number type (double), so an integral number in the
safe-integer range decodes as ``int`` and anything else as ``float``.
"""

from __future__ import annotations

import collections.abc as cabc
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from google.protobuf.struct_pb2 import NULL_VALUE, Struct, Value

_SAFE_INT = 2**53
#: Objects and arrays nest at most this deep: in a call's arguments (the arguments object is
#: the first level), a result, a chunk, an input item. Deeper, a protobuf parser (upb's
#: limit of 100 message levels; each JSON level costs two or three) would refuse the whole
#: message, and on a shared stream that would fail every call riding it.
MAX_DEPTH = 32

_SCALARS = frozenset({str, int, float, bool, type(None)})


class NotJsonLike(TypeError):
    """A value that has no JSON form; ``path`` says where it sits (``$.a[2].b``)."""

    def __init__(self, path: str, value: object) -> None:
        self.path = path
        super().__init__(f"{path} is a {type(value).__name__}, which has no JSON form")


class TooDeep(NotJsonLike):
    """A value whose objects and arrays nest deeper than MAX_DEPTH; ``path`` says where."""

    def __init__(self, path: str) -> None:
        self.path = path
        TypeError.__init__(
            self, f"{path} nests objects and arrays deeper than {MAX_DEPTH} levels, the limit"
        )


def _within(obj: object, levels: int, path: str) -> None:
    """Raise TooDeep if container ``obj`` (at a level with ``levels`` still allowed) nests
    deeper. Scalars cost one set lookup: the common flat call stays cheap."""
    if levels <= 0:
        raise TooDeep(path)
    if isinstance(obj, Mapping):
        for key, item in obj.items():
            if item.__class__ not in _SCALARS and isinstance(item, Mapping | list | tuple):
                _within(item, levels - 1, f"{path}.{key}")
    elif isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
            if item.__class__ not in _SCALARS and isinstance(item, Mapping | list | tuple):
                _within(item, levels - 1, f"{path}[{i}]")


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
    """Write ``obj`` into ``out``; raises :class:`NotJsonLike` naming the offending path
    (:class:`TooDeep` when it nests past MAX_DEPTH)."""
    if obj.__class__ not in _SCALARS and isinstance(obj, Mapping | list | tuple):
        _within(obj, MAX_DEPTH, "$")
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
    """Write keyword arguments into ``out``; raises :class:`NotJsonLike` naming the argument
    (:class:`TooDeep` when one nests past MAX_DEPTH, the arguments object counting as one)."""
    for key, item in obj.items():
        if item.__class__ not in _SCALARS and isinstance(item, Mapping | list | tuple):
            _within(item, MAX_DEPTH - 1, key)
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


_PLAIN = (str, bool, int, float, type(None), Any, object, list, tuple, dict)


def is_json(tp: Any) -> bool:
    """Whether a Python annotation is JSON as it is (JSON types, and lists, dicts, unions and
    literals of them). Anything richer (dataclasses, enums, dates, UUIDs, pydantic models,
    ``Annotated`` constraints) is converted both ways by pydantic: the agent validates
    arguments and serializes results, a typed proxy turns results back into the type."""
    if tp in _PLAIN or typing.is_typeddict(tp):
        return True
    origin = get_origin(tp)
    if origin is Literal:
        return True
    if origin in (Union, types.UnionType, list, tuple, dict, set, frozenset) or origin in (
        cabc.Sequence,
        cabc.Iterable,
        cabc.Mapping,
        cabc.MutableMapping,
    ):
        return all(is_json(a) for a in get_args(tp) if a is not Ellipsis)
    return False
