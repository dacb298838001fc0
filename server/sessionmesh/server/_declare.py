"""Declaring tools and agents: ``@mesh.tool`` and ``@mesh.agent``. Light on purpose: a
caller imports tool functions for typed proxies, and declaring one must not load the agent
runtime (sessions, dispatcher, gRPC services); the agent reads these declarations when it
serves (``_tool.BoundTool``)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

from sessionmesh.core import Dependency, ProxyOptions
from sessionmesh.errors import UsageError
from sessionmesh.server._settings import AgentSettings, check_names

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)

AGENT_ATTR = "__sessionmesh_agent__"
TOOL_ATTR = "__sessionmesh_tool__"

#: How a tool runs; decided once at declaration, not on every call.
Kind = Literal["coroutine", "async_gen", "sync_gen", "plain"]


def _kind(fn: Callable[..., Any]) -> Kind:
    if inspect.isasyncgenfunction(fn):
        return "async_gen"
    if inspect.isgeneratorfunction(fn):
        return "sync_gen"
    return "coroutine" if inspect.iscoroutinefunction(fn) else "plain"


@dataclasses.dataclass(frozen=True, slots=True)
class ToolSpec:
    """Everything ``@mesh.tool`` declared about one function.

    ``options`` holds the keywords about sessions and calls, checked once: the agent
    enforces them on this tool (session_required, timeout, stream_timeout, buffer_size) and
    they configure the proxies injected for its dependencies."""

    fn: Callable[..., Any]
    name: str
    capability: str
    description: str
    tags: tuple[str, ...]
    version: str | None
    dependencies: tuple[Dependency, ...]
    options: ProxyOptions
    session_ttl: float | None
    kind: Kind
    #: The principals that may call it (None: whoever the agent lets in).
    allow: frozenset[str] | None = None
    #: How its injected dependency proxies are configured (``options`` without streaming).
    proxy_options: ProxyOptions = dataclasses.field(default_factory=ProxyOptions)


@overload
def tool(capability: F) -> F: ...
@overload
def tool(
    capability: str | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    tags: Sequence[str] = (),
    version: str | None = None,
    dependencies: Sequence[str | Mapping[str, Any]] = (),
    session_required: bool = False,
    stateful: bool = False,
    auto_session_management: bool = True,
    timeout: float | None = None,
    retry_count: int = 0,
    retry_delay: float | None = None,
    streaming: bool | None = None,
    stream_timeout: float | None = None,
    buffer_size: int = 64,
    session_ttl: float | None = None,
    allow: Sequence[str] | None = None,
) -> Callable[[F], F]: ...
def tool(
    capability: str | F | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    tags: Sequence[str] = (),
    version: str | None = None,
    dependencies: Sequence[str | Mapping[str, Any]] = (),
    session_required: bool = False,
    stateful: bool = False,
    auto_session_management: bool = True,
    timeout: float | None = None,
    retry_count: int = 0,
    retry_delay: float | None = None,
    streaming: bool | None = None,
    stream_timeout: float | None = None,
    buffer_size: int = 64,
    session_ttl: float | None = None,
    allow: Sequence[str] | None = None,
) -> F | Callable[[F], F]:
    """Declare a function as a tool of this agent.

    The tool is called by its function name or by ``capability``. Keywords about sessions and
    calls apply twice: the agent enforces them on this tool (``session_required``,
    ``timeout``, ``stream_timeout``, ``buffer_size``, ``session_ttl``) and they configure the
    proxies injected for ``dependencies`` (``session_required``, ``stateful``,
    ``auto_session_management``, ``timeout``, ``retry_count``, ``retry_delay``,
    ``stream_timeout``, ``buffer_size``). ``allow`` lists the principals that may call it
    (the agent must authenticate its callers: client certificates or tokens).

    ``streaming`` is the tool's own: a generator function streams (the default follows the
    function); ``streaming=True`` on a plain function lists it as streaming and serves its
    result as a stream of one chunk. It never changes the injected proxies: they return a
    result when called (``await dep(...)``, or ``dep(...)`` in a plain ``def`` tool) and
    stream with ``dep.stream(...)`` / ``dep.call_tool_auto(tool, args)``.

    Example::

        @mesh.tool(capability="session_counter", session_required=True, stateful=True)
        def increment(session: mesh.Session, increment: int = 1) -> int:
            session.state["count"] = session.state.get("count", 0) + increment
            return session.state["count"]
    """
    if callable(capability):
        return tool()(capability)

    if session_ttl is not None and session_ttl <= 0:
        raise UsageError("session_ttl must be > 0 seconds, or None")
    if isinstance(allow, str):
        raise UsageError("allow= takes a list of principals, e.g. allow=['spiffe://a/b']")
    options = ProxyOptions(
        session_required=session_required,
        stateful=stateful,
        auto_session_management=auto_session_management,
        timeout=timeout,
        retry_count=retry_count,
        retry_delay=0.5 if retry_delay is None else retry_delay,
        streaming=bool(streaming),
        stream_timeout=stream_timeout,
        buffer_size=buffer_size,
    )  # checks every value, once
    deps = tuple(Dependency.parse(d) for d in dependencies)
    if not deps:
        # These only configure the proxies injected for dependencies: accepted without
        # any, they would silently do nothing.
        idle = [
            label
            for label, given in (
                ("retry_count", retry_count != 0),
                ("retry_delay", retry_delay is not None),
                ("auto_session_management", auto_session_management is not True),
            )
            if given
        ]
        if idle:
            raise UsageError(
                f"{', '.join(idle)} configure the proxies injected for dependencies, and this "
                "tool declares none: add dependencies=[...] or drop them"
            )

    def decorate(fn: F) -> F:
        kind = _kind(fn)
        gen = kind in ("async_gen", "sync_gen")
        own = options.replace(streaming=gen) if streaming is None else options
        spec = ToolSpec(
            fn=fn,
            name=name or fn.__name__,
            capability=capability or name or fn.__name__,
            description=description or inspect.getdoc(fn) or "",
            tags=tuple(tags),
            version=version,
            dependencies=deps,
            options=own,
            session_ttl=session_ttl,
            kind=kind,
            # `streaming` is the tool's own: its dependencies get plain proxies, which
            # stream with .stream() / .call_tool_auto() when asked.
            proxy_options=own.replace(streaming=False) if own.streaming else own,
            allow=None if allow is None else frozenset(allow),
        )
        setattr(fn, TOOL_ATTR, spec)
        return fn

    return decorate


def spec_of(obj: object) -> ToolSpec | None:
    spec = getattr(obj, TOOL_ATTR, None)
    return spec if isinstance(spec, ToolSpec) else None


def tools_in(namespace: Mapping[str, object]) -> list[ToolSpec]:
    """The tools declared in a module's namespace, in definition order."""
    seen: set[int] = set()
    found: list[ToolSpec] = []
    for obj in namespace.values():
        spec = spec_of(obj)
        if spec is not None and id(spec) not in seen:
            seen.add(id(spec))
            found.append(spec)
    return found


def agent(name: str | None = None, **settings: Any) -> Callable[[C], C]:
    """Name the agent a file defines and set how it serves: the keywords are the fields of
    :class:`AgentSettings` (``host``, ``port``, ``session_ttl``, ``registry``, ``tls``,
    ``session_store``, ...), checked here, at once.

    Example::

        @mesh.agent(name="counter", port=50051, session_ttl=60)
        class Counter: ...
    """
    check_names(settings, "@mesh.agent setting")

    def decorate(cls: C) -> C:
        methods = [attr for attr, value in vars(cls).items() if spec_of(value) is not None]
        if methods:
            raise UsageError(
                f"@mesh.tool {', '.join(methods)} is inside the @mesh.agent class "
                f"{cls.__name__}: tools are module-level functions (the class only names the "
                "agent and holds its settings); move them out of the class"
            )
        setattr(cls, AGENT_ATTR, AgentSettings(name=name or cls.__name__, **settings))
        return cls

    return decorate
