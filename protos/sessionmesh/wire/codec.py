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


class _Unfit(Exception):
    """Raised by the fast encoder at the first thing it cannot write; the slow checks then
    say what and where."""


def _put(out: Value, obj: object, levels: int) -> None:
    """Write ``obj`` into ``out`` in one pass: the common JSON types by exact type first,
    objects and arrays counted against ``levels``. (protobuf's own Struct.update walks the
    value through more checks per item, and the depth needed a second walk.)"""
    cls = obj.__class__
    if cls is str:
        out.string_value = obj  # type: ignore[assignment]
    elif cls is float:
        out.number_value = obj  # type: ignore[assignment]
    elif cls is int:
        if not -_SAFE_INT <= obj <= _SAFE_INT:  # type: ignore[operator]
            raise _Unfit
        out.number_value = obj  # type: ignore[assignment]
    elif cls is bool:
        out.bool_value = obj  # type: ignore[assignment]
    elif obj is None:
        out.null_value = NULL_VALUE
    elif cls is dict:
        if levels <= 0:
            raise _Unfit
        struct = out.struct_value
        if not obj:
            struct.SetInParent()
            return
        fields = struct.fields
        for key, item in obj.items():  # type: ignore[attr-defined]
            if key.__class__ is not str:
                raise _Unfit
            _put(fields[key], item, levels - 1)
    elif cls is list or cls is tuple:
        if levels <= 0:
            raise _Unfit
        values = out.list_value
        if not obj:
            values.SetInParent()
            return
        add = values.values.add
        for item in obj:  # type: ignore[attr-defined]
            _put(add(), item, levels - 1)
    elif isinstance(obj, bool | int | float | str | Mapping | list | tuple):
        _put(out, _plain(obj), levels)  # a subclass (an IntEnum, a str Enum, a mapping)
    else:
        raise _Unfit


def _plain(obj: object) -> object:
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str.__str__(obj)  # the text itself: str() of a str Enum is its name
    if isinstance(obj, Mapping):
        return dict(obj)
    return list(obj)  # type: ignore[call-overload]


def set_value(out: Value, obj: object) -> None:
    """Write ``obj`` into ``out``; raises :class:`NotJsonLike` naming the offending path
    (:class:`TooDeep` when it nests past MAX_DEPTH)."""
    try:
        _put(out, obj, MAX_DEPTH)
    except (_Unfit, ValueError, TypeError) as exc:
        if isinstance(obj, Mapping | list | tuple):
            _within(obj, MAX_DEPTH, "$")
        _check(obj, "$")
        raise NotJsonLike("$", obj) from exc


def set_struct(out: Struct, obj: Mapping[str, Any]) -> None:
    """Write keyword arguments into ``out``; raises :class:`NotJsonLike` naming the argument
    (:class:`TooDeep` when one nests past MAX_DEPTH, the arguments object counting as one)."""
    fields = out.fields
    try:
        for key, item in obj.items():
            _put(fields[key], item, MAX_DEPTH - 1)
    except (_Unfit, ValueError, TypeError) as exc:
        for key, item in obj.items():
            if isinstance(item, Mapping | list | tuple):
                _within(item, MAX_DEPTH - 1, key)
        for key, item in obj.items():
            _check(item, key)
        raise NotJsonLike("arguments", obj) from exc


class _Deep(Exception):
    """Raised by the decoder past the depth limit; the path is found afterwards (only then)."""


def from_value(v: Value) -> Any:
    """A Value as Python (JSON types). :class:`TooDeep` when it nests past MAX_DEPTH: the
    rule that the encoder applies, applied again to what another client sent."""
    try:
        return _value(v, MAX_DEPTH)
    except _Deep:
        raise TooDeep(_deep_path(v, MAX_DEPTH, "$")) from None


def from_struct(s: Struct) -> dict[str, Any]:
    """A Struct (call arguments, the object counting as one level) as a dict; TooDeep as
    for :func:`from_value`, naming the argument."""
    try:
        return _struct(s, MAX_DEPTH - 1)
    except _Deep:
        fields = s.fields
        for key in fields:
            _deep_path(fields[key], MAX_DEPTH - 1, key)
        raise AssertionError("unreachable: a field nests too deep") from None


def _value(v: Value, levels: int) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        n = v.number_value
        if n.is_integer() and -_SAFE_INT <= n <= _SAFE_INT:
            return int(n)
        return n
    if kind == "struct_value":
        if levels <= 0:
            raise _Deep
        return _struct(v.struct_value, levels - 1)
    if kind == "list_value":
        if levels <= 0:
            raise _Deep
        return [_value(x, levels - 1) for x in v.list_value.values]
    if kind == "bool_value":
        return v.bool_value
    return None


def _struct(s: Struct, levels: int) -> dict[str, Any]:
    fields = s.fields
    # By key, not .items(): a map's items() is a Python-level generator (0.8 of 3.8 µs for
    # three arguments).
    return {k: _value(fields[k], levels) for k in fields}


def _deep_path(v: Value, levels: int, path: str) -> str:
    """Where ``v`` first nests past ``levels``: raised as TooDeep, or returned if nowhere."""
    kind = v.WhichOneof("kind")
    if kind not in ("struct_value", "list_value"):
        return path
    if levels <= 0:
        raise TooDeep(path)
    if kind == "struct_value":
        fields = v.struct_value.fields
        for key in fields:
            _deep_path(fields[key], levels - 1, f"{path}.{key}")
    else:
        for i, item in enumerate(v.list_value.values):
            _deep_path(item, levels - 1, f"{path}[{i}]")
    return path


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
