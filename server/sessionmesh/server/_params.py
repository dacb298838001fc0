"""Checking JSON arguments against a tool's annotations, and the JSON schema that says so.

JSON types are checked here, by hand: one class comparison per argument on the hot path,
and messages that say what came ("must be int, got str 'one'"). Everything richer, and
every schema, is pydantic's."""

from __future__ import annotations

import collections.abc as cabc
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

from sessionmesh.wire.codec import NotJsonLike


class ArgumentError(ValueError):
    """An argument that does not fit; ``field`` is its dotted path."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Return ``value`` as ``tp`` (int -> float where a float is wanted), or raise ArgumentError."""
    if tp is Any or tp is object or tp is typing.Any:
        return value
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(get_args(tp)):
            return None
        if len(options) == 1:  # Optional[X]: X's own message says more than the union's
            return coerce(value, options[0], path)
        for option in options:
            try:
                return coerce(value, option, path)
            except ArgumentError:
                continue
        raise ArgumentError(
            path, f"argument {path!r} must be {_type_name(tp)}, got {_describe(value)}"
        )
    if origin is Literal:
        if value in get_args(tp):
            return value
        allowed = ", ".join(repr(a) for a in get_args(tp))
        raise ArgumentError(path, f"argument {path!r} must be one of {allowed}, got {value!r}")
    if origin in (list, cabc.Sequence, cabc.Iterable, tuple, set, frozenset):
        if not isinstance(value, list):
            raise ArgumentError(path, f"argument {path!r} must be a list, got {_describe(value)}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        if item_tp is Any or item_tp is object:  # any JSON fits: nothing to look at
            return value if origin is not tuple else tuple(value)
        items = [coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is not tuple else tuple(items)
    if origin in (dict, cabc.Mapping, cabc.MutableMapping):
        if not isinstance(value, dict):
            raise ArgumentError(
                path, f"argument {path!r} must be an object, got {_describe(value)}"
            )
        args = get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        if val_tp is Any or val_tp is object:  # decoded JSON: str keys, JSON values
            return value
        return {k: coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp in (list, tuple):
        if isinstance(value, list):
            return value
        raise ArgumentError(path, f"argument {path!r} must be a list, got {_describe(value)}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ArgumentError(path, f"argument {path!r} must be an object, got {_describe(value)}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is None or tp is type(None):
        if value is None:
            return None
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    elif typing.is_typeddict(tp):
        if isinstance(value, dict):
            return value
    else:
        return value  # an annotation we cannot check from JSON: the tool gets the value as is
    raise ArgumentError(path, f"argument {path!r} must be {_type_name(tp)}, got {_describe(value)}")


def _exact(tp: type) -> Callable[[Any, str], Any]:
    """The check for a JSON scalar type: a decoded value of exactly that class passes as it
    is; anything else goes the general way (conversion, or the error message)."""

    def check(value: Any, path: str) -> Any:
        return value if value.__class__ is tp else coerce(value, tp, path)

    return check


def _as_is(value: Any, path: str) -> Any:
    return value


#: The common annotations, checked by class alone.
_EXACT: dict[Any, Callable[[Any, str], Any]] = {
    **{tp: _exact(tp) for tp in (int, float, str, bool)},
    Any: _as_is,
    object: _as_is,
}


def coercer(tp: Any) -> Callable[[Any, str], Any]:
    """``coerce`` for one annotation, decided once (per tool, not per call)."""
    exact = _EXACT.get(tp)
    if exact is not None:
        return exact
    return lambda value, path: coerce(value, tp, path)


class Rich:
    """A parameter or result type beyond JSON, through a pydantic TypeAdapter (made once)."""

    __slots__ = ("adapter", "error_type")

    def __init__(self, tp: Any) -> None:
        import pydantic  # a dependency, imported only by tools with such types

        self.adapter = pydantic.TypeAdapter(tp)
        self.error_type = pydantic.ValidationError

    def validate(self, value: Any, path: str) -> Any:
        try:
            return self.adapter.validate_python(value)
        except self.error_type as exc:
            problems = []
            field = path
            for i, error in enumerate(exc.errors()):
                where = ".".join([path, *(str(part) for part in error["loc"])])
                if i == 0:
                    field = where
                problems.append(f"argument {where!r}: {error['msg']}")
            raise ArgumentError(field, "; ".join(problems)) from None

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = self.adapter.json_schema()
        return schema

    def output_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = self.adapter.json_schema(mode="serialization")
        return schema

    def jsonable(self, value: Any) -> Any:
        """``value`` as JSON-like data (a dataclass or model as an object, a date as its ISO
        string...); NotJsonLike when pydantic cannot serialize it either."""
        try:
            return self.adapter.dump_python(value, mode="json")
        except Exception:
            raise NotJsonLike("$", value) from None


def schema_for(tp: Any) -> dict[str, Any]:
    """The JSON schema of an annotation, as pydantic writes it (the same as for the richer
    types, so every schema a tool lists has one author); an empty schema accepts anything."""
    import pydantic

    try:
        schema: dict[str, Any] = pydantic.TypeAdapter(tp).json_schema()
    except Exception:  # an annotation pydantic has no schema for: say nothing of it
        return {}
    return schema
