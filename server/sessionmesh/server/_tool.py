"""A declared tool made ready to serve: its parameters resolved, a call's arguments bound and
checked, and the function run (in a worker thread for a plain ``def``)."""

from __future__ import annotations

import asyncio
import collections.abc as cabc
import concurrent.futures
import contextvars
import dataclasses
import functools
import inspect
import logging
import types
import typing
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from sessionmesh.client import McpAgent
from sessionmesh.core import Dependency
from sessionmesh.errors import UsageError
from sessionmesh.server._declare import Kind, ToolSpec
from sessionmesh.server._params import ArgumentError, Rich, coercer, schema_for
from sessionmesh.server._session import Session, Worker, _current
from sessionmesh.wire.codec import is_json

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

log = logging.getLogger("sessionmesh.agent")

Role = Literal["arg", "session", "dependency", "input"]


@dataclasses.dataclass(frozen=True, slots=True)
class Param:
    name: str
    role: Role
    annotation: Any
    required: bool
    default: Any
    dependency: Dependency | None = None
    #: Its pydantic validation, for a type richer than JSON.
    rich: Rich | None = None


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_async_iter(tp: Any) -> bool:
    origin = get_origin(tp) or tp
    return origin in (cabc.AsyncIterator, cabc.AsyncIterable, cabc.AsyncGenerator)


class BoundTool:
    """A ToolSpec with its annotations resolved: binds a call's JSON arguments to parameters."""

    __slots__ = (
        "_arg_names",
        "_checks",
        "dependencies",
        "executor",
        "input_param",
        "output_schema",
        "params",
        "requires_session",
        "result",
        "schema",
        "session_params",
        "spec",
    )

    def __init__(self, spec: ToolSpec) -> None:
        self.spec = spec
        try:
            hints = typing.get_type_hints(spec.fn, include_extras=True)  # Annotated kept
        except Exception as exc:
            raise UsageError(f"tool {spec.name!r}: cannot resolve its annotations: {exc}") from exc
        deps = {d.capability: d for d in spec.dependencies}
        positional_deps = [d for d in spec.dependencies if d.capability not in _param_names(spec)]
        params: list[Param] = []
        for p in inspect.signature(spec.fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise UsageError(f"tool {spec.name!r}: *args/**kwargs parameters are not supported")
            tp = hints.get(p.name, Any)
            bare = _strip_optional(tp)
            required = p.default is p.empty
            default = None if required else p.default
            if bare is Session:
                params.append(Param(p.name, "session", tp, False, None))
            elif bare is McpAgent or p.name in deps:
                dep = deps.get(p.name) or (positional_deps.pop(0) if positional_deps else None)
                if dep is None:
                    raise UsageError(
                        f"tool {spec.name!r}: parameter {p.name!r} is an McpAgent but no "
                        f"dependency is left for it; add it to dependencies=[...]"
                    )
                params.append(Param(p.name, "dependency", tp, False, None, dep))
            elif _is_async_iter(bare):
                params.append(Param(p.name, "input", tp, False, None))
            else:
                rich = _rich(tp, f"tool {spec.name!r}: parameter {p.name!r}")
                params.append(Param(p.name, "arg", tp, required, default, rich=rich))
        inputs = [p for p in params if p.role == "input"]
        if len(inputs) > 1:
            raise UsageError(f"tool {spec.name!r}: at most one async-iterable input parameter")
        self.params = tuple(params)
        self.input_param = inputs[0].name if inputs else None
        self.dependencies = tuple(p for p in params if p.role == "dependency")
        self.session_params = tuple(p.name for p in params if p.role == "session")
        # Callers must bring a session to a tool that keeps state in one (a plain `Session`
        # parameter) or declares session_required with no dependencies. On a consumer with
        # dependencies, session_required configures the injected proxies instead, and the
        # consumer runs with its caller's session or without one (README: Dependencies).
        self.requires_session = any(
            p.role == "session" and _strip_optional(p.annotation) is p.annotation for p in params
        ) or (spec.options.session_required and not self.dependencies)
        self._arg_names = frozenset(p.name for p in params if p.role == "arg")
        #: Each argument's name, whether it is required, and its check (decided once).
        self._checks = tuple(
            (p.name, p.required, p.rich.validate if p.rich is not None else coercer(p.annotation))
            for p in params
            if p.role == "arg"
        )
        #: Where a plain (``def``) tool runs: the agent's thread pool once it serves.
        self.executor: concurrent.futures.Executor | None = None
        self.schema = self._schema()
        #: How a result (or chunk) richer than JSON is turned into JSON (None: as it is).
        produced = _produced(hints.get("return", Any), spec.kind)
        self.result = _rich(produced, f"tool {spec.name!r}: its result")
        self.output_schema = (
            self.result.output_schema() if self.result is not None else schema_for(produced)
        )

    def _schema(self) -> dict[str, Any]:
        props: dict[str, Any] = {}
        required: list[str] = []
        defs: dict[str, Any] = {}
        for p in self.params:
            if p.role != "arg":
                continue
            frag = p.rich.schema() if p.rich is not None else schema_for(p.annotation)
            defs.update(frag.pop("$defs", {}))
            if not p.required and isinstance(p.default, str | int | float | bool | type(None)):
                frag = {**frag, "default": p.default}
            props[p.name] = frag
            if p.required:
                required.append(p.name)
        schema: dict[str, Any] = {"type": "object", "properties": props}
        if required:
            schema["required"] = required
        schema["additionalProperties"] = False
        if len(props) > 1:
            # The wire's Struct keeps no key order: say the signature's, for people reading
            # the tool (`sessionmesh list --tools`, generated forms).
            schema["x-order"] = list(props)
        if defs:
            schema["$defs"] = defs
        return schema

    def bind(self, arguments: Mapping[str, Any], session: Session | None) -> dict[str, Any]:
        """Keyword arguments for the function; raises ArgumentError naming the bad parameter."""
        if not self._arg_names.issuperset(arguments):
            unknown = arguments.keys() - self._arg_names
            name = sorted(unknown)[0]
            expected = ", ".join(sorted(self._arg_names)) or "none"
            raise ArgumentError(
                name,
                f"unknown argument {name!r} for tool {self.spec.name!r} (expected: {expected})",
            )
        kwargs: dict[str, Any] = dict.fromkeys(self.session_params, session)
        errors: list[ArgumentError] | None = None  # made only when an argument is bad
        for name, required, check in self._checks:
            try:
                if name in arguments:
                    kwargs[name] = check(arguments[name], name)
                elif required:
                    raise ArgumentError(
                        name, f"missing argument {name!r} for tool {self.spec.name!r}"
                    )
            except ArgumentError as error:
                errors = [*(errors or ()), error]
        if errors:  # every bad argument at once, named by the first
            if len(errors) == 1:
                raise errors[0]
            raise ArgumentError(errors[0].field, "; ".join(str(e) for e in errors))
        return kwargs

    async def invoke(self, kwargs: dict[str, Any]) -> Any:
        """Run the tool once; a streaming tool's chunks are collected into a list."""
        spec = self.spec
        if spec.kind == "coroutine":
            return await spec.fn(**kwargs)
        if spec.kind != "plain":
            return [item async for item in self.iterate(kwargs)]
        # Plain functions may block: they run in a worker thread (context variables included).
        return await self._in_thread(functools.partial(spec.fn, **kwargs))

    def _in_thread(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``asyncio.to_thread``, on the agent's own pool. In a session, the session's turn
        lasts until the thread ends, even when the call is answered first (a timeout)."""
        if _current.get() is None:
            context = contextvars.copy_context()
            return asyncio.get_running_loop().run_in_executor(self.executor, context.run, fn)
        return self._step(fn)[0]

    def _step(self, fn: Callable[[], T]) -> tuple[asyncio.Future[T], Worker]:
        """One step of a plain generator in the agent's pool, and the thread's end (a
        step cut off from the loop still runs there: the generator is busy until then)."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        worker = Worker(loop)
        session = _current.get()
        if session is not None:
            session._thread = worker
        future = loop.run_in_executor(self.executor, _until_ended, worker, context, fn)
        return future, worker

    def iterate(self, kwargs: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """The tool's chunks; a tool that does not stream gives one chunk, its result."""
        if self.spec.kind == "async_gen":
            gen: AsyncGenerator[Any, None] = self.spec.fn(**kwargs)
            return gen  # as it is: no wrapper on the per-chunk path
        return self._iterate(kwargs)

    async def _iterate(self, kwargs: dict[str, Any]) -> AsyncGenerator[Any, None]:
        spec = self.spec
        if spec.kind == "sync_gen":
            gen = spec.fn(**kwargs)
            done = object()
            step = functools.partial(next, gen, done)
            worker: Worker | None = None
            try:
                while True:
                    stepping, worker = self._step(step)
                    item = await stepping
                    if item is done:
                        break
                    yield item
            finally:
                if worker is not None:
                    # Cut off mid-step (cancelled, timed out): close() would raise
                    # "generator already executing" while the thread is still in next().
                    await worker.wait()
                gen.close()
        else:
            yield await self.invoke(kwargs)


def _until_ended(worker: Worker, context: contextvars.Context, fn: Callable[[], T]) -> T:
    try:
        return context.run(fn)
    finally:
        worker.ended()


def _param_names(spec: ToolSpec) -> set[str]:
    return set(inspect.signature(spec.fn).parameters)


def each_once(index: Mapping[str, BoundTool]) -> list[BoundTool]:
    """The tools of an index (which holds each under its name and its capability), once."""
    return list({id(b): b for b in index.values()}.values())


def _rich(tp: Any, where: str) -> Rich | None:
    """pydantic's conversion for ``tp``; None for JSON types (checked by ``coerce``) and for
    a type pydantic cannot handle either: the value then passes as it is, unchecked, and
    the agent says so when it loads the tool (``where`` names what is annotated)."""
    if is_json(tp):
        return None
    try:
        return Rich(tp)
    except Exception as exc:
        log.warning(
            "%s is annotated %r, which pydantic cannot validate (%s): values pass unchecked",
            where,
            tp,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
        return None


def _produced(annotation: Any, kind: Kind) -> Any:
    """What a tool's results (or chunks, for a generator) are annotated as."""
    if kind in ("async_gen", "sync_gen"):
        args = get_args(annotation)
        return args[0] if args else Any
    return annotation
