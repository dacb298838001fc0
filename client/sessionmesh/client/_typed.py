"""Proxies made from the provider's own tool function: typed as that function returns, and
named after its declaration, read without importing the agent runtime."""

from __future__ import annotations

import asyncio
import inspect
import typing
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar, get_args, get_origin

from sessionmesh.client._proxy import Proxy
from sessionmesh.errors import UsageError
from sessionmesh.wire.codec import is_json

if TYPE_CHECKING:
    from sessionmesh.client._auto_session import AutoSession
    from sessionmesh.client._transport import Transport
    from sessionmesh.core._options import ProxyOptions

R = TypeVar("R")


class TypedProxy(Proxy, Generic[R]):
    """A proxy made from the provider's own tool function: its calls return what that
    function returns, as a type checker sees it.

    Example::

        from counter import increment  # the @mesh.tool function, importable here

        count: int = await agent.proxy(increment)(increment=1)

    It stays typed through ``async with`` and ``.options()``.
    """

    __slots__ = ("_fn", "_result")

    def __init__(
        self,
        transport: Transport,
        tool: str,
        opts: ProxyOptions,
        fn: Callable[..., Any],
        auto: AutoSession | None = None,
    ) -> None:
        super().__init__(transport, tool, opts, auto)
        self._fn = fn
        self._result = _result_type(fn)

    def options(self, **changes: Any) -> TypedProxy[R]:  # type: ignore[override]
        """A copy with other settings, sharing the channel and the auto session. A typed
        proxy returns its tool's result: it streams with ``.stream()``, not ``streaming``."""
        if changes.get("streaming"):
            raise UsageError(
                "a typed proxy returns its tool's result; stream with .stream(...), or make "
                "a proxy by name with streaming=True"
            )
        opts = self._opts.replace(**changes)
        return TypedProxy(self._transport, self._tool, opts, self._fn, self._auto)

    async def __aenter__(self) -> TypedProxy[R]:
        return self

    def __call__(self, *call: Any, **kwargs: Any) -> Coroutine[Any, Any, R]:
        work: Coroutine[Any, Any, R] = super().__call__(*call, **kwargs)
        if self._result is None:
            return work
        if not asyncio.iscoroutine(work):  # a plain def tool's worker thread: the result
            typed: Coroutine[Any, Any, R] = self._result.validate_python(work)
            return typed
        return self._typed(work)

    async def _typed(self, work: Coroutine[Any, Any, Any]) -> R:
        assert self._result is not None
        result: R = self._result.validate_python(await work)
        return result


def _needs_pydantic(tp: Any) -> bool:
    """A JSON result that still comes back changed without its type: a float (JSON has one
    number: 2.0 travels as 2, and comes back an int) or a TypedDict (JSON objects are
    unordered: the keys come back in the declared order only when rebuilt)."""
    return tp is float or typing.is_typeddict(tp) or any(_needs_pydantic(a) for a in get_args(tp))


def _result_type(fn: Callable[..., Any]) -> Any:
    """A pydantic TypeAdapter that turns the JSON result back into what ``fn`` returns, or
    None when that is JSON as it is (or unknown)."""
    try:
        annotation = typing.get_type_hints(fn).get("return", Any)
    except Exception:
        return None
    if inspect.iscoroutinefunction(fn) and get_origin(annotation) is Coroutine:
        annotation = get_args(annotation)[-1]
    if is_json(annotation) and not _needs_pydantic(annotation):
        return None
    import pydantic  # only for a provider whose results are richer than JSON

    try:
        return pydantic.TypeAdapter(annotation)
    except pydantic.PydanticUserError:
        return None  # e.g. typing.TypedDict before Python 3.12: the result as it came


def tool_of(fn: Callable[..., Any], *, capability: bool) -> str:
    """The name (or capability) a ``@mesh.tool`` function answers to; its own name for a
    plain function. Read from the declaration without importing the agent runtime."""
    spec = getattr(fn, "__sessionmesh_tool__", None)
    if spec is None:
        return fn.__name__
    return str(spec.capability if capability else spec.name)
