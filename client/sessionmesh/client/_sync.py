"""``mesh.connect_sync``: the client for scripts and notebooks, no ``await`` anywhere.

The async client runs on an event loop in a thread (anyio's blocking portal);
every call blocks the caller until its answer comes. It works the same from a plain
script and from inside a running event loop (Jupyter), since it never touches the
caller's loop.

One such loop serves every blocking client of the process and is never closed: grpc
delivers a call's last events after its channel is closed, through whichever loop it
wakes first, and raises in that loop (another client's, the caller's) if the call's own
loop is closed by then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar, overload

from anyio.from_thread import BlockingPortal

from sessionmesh.client._client import AgentClient, MeshClient, connect
from sessionmesh.client._proxy import Proxy
from sessionmesh.client._stream import ChunkStream
from sessionmesh.core._credentials import TLS
from sessionmesh.core._loop import run
from sessionmesh.core._tasks import Tasks
from sessionmesh.errors import UsageError

T = TypeVar("T")
R = TypeVar("R")


log = logging.getLogger("sessionmesh.client")


class _LoopThread:
    """The event loop every blocking client runs on, in a daemon thread."""

    def __init__(self) -> None:
        started: queue.SimpleQueue[BlockingPortal | BaseException] = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._serve, args=(started,), name="sessionmesh-sync", daemon=True
        )
        #: Closes started on the loop's own thread, which cannot wait for them.
        self._closing = Tasks("the blocking clients' loop", log)
        self.thread.start()
        portal = started.get()
        if isinstance(portal, BaseException):
            raise portal
        self.portal = portal

    def _serve(self, started: queue.SimpleQueue[BlockingPortal | BaseException]) -> None:
        async def main() -> None:
            async with BlockingPortal() as portal:
                self.loop = asyncio.get_running_loop()
                started.put(portal)
                await portal.sleep_until_stopped()

        try:
            run(main())  # on uvloop when installed (sessionmesh[fast])
        except BaseException as exc:  # the starting thread raises it
            started.put(exc)

    def close(self, chunks: ChunkStream) -> None:
        """Close a stream from any thread: from the loop's own (its garbage collection
        finalized the iterator reading the stream) it cannot wait, so it does not."""
        if threading.current_thread() is self.thread:
            self._closing.start(chunks.aclose())
        else:
            self.portal.call(chunks.aclose)


_lock = threading.Lock()
_shared: _LoopThread | None = None


def _loop_thread() -> _LoopThread:
    global _shared
    with _lock:
        if _shared is None:
            _shared = _LoopThread()
        return _shared


def _forget_in_child() -> None:
    global _shared, _lock
    _shared, _lock = None, threading.Lock()  # a forked child has no copy of the thread


os.register_at_fork(after_in_child=_forget_in_child)


class SyncProxy(Generic[R]):
    """A proxy whose calls block and return the result: ``counter(increment=1)``. Made from
    the provider's ``@mesh.tool`` function, its calls are typed as that function returns."""

    def __init__(self, loop: _LoopThread, proxy: Proxy) -> None:
        self._loop = loop
        self._proxy = proxy

    def options(self, **changes: Any) -> SyncProxy[R]:
        """A copy with other settings, sharing the channel and the auto session."""
        if changes.get("streaming"):
            raise UsageError("a blocking proxy streams with .stream(...): drop streaming=True")
        return SyncProxy(self._loop, self._proxy.options(streaming=False, **changes))

    def __repr__(self) -> str:
        return f"<SyncProxy of {self._proxy!r}>"

    @property
    def session_id(self) -> str | None:
        return self._proxy.session_id

    def __call__(self, *call: Any, **kwargs: Any) -> R:
        result: R = self._run(lambda: self._proxy(*call, **kwargs))
        return result

    def call_tool(self, tool: str, args: Mapping[str, Any] | None = None) -> Any:
        return self._run(lambda: self._proxy.call_tool(tool, args))

    def stream(self, **kwargs: Any) -> Generator[Any, None, None]:
        """The tool's chunks, one by one, as they come; ``.close()`` stops the stream."""
        return self.call_tool_auto(None, kwargs)

    def call_tool_auto(
        self, tool: str | None = None, args: Mapping[str, Any] | None = None
    ) -> Generator[Any, None, None]:
        chunks = self._proxy.call_tool_auto(tool, args)
        try:
            while True:
                try:
                    yield self._loop.portal.call(chunks.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            self._loop.close(chunks)

    def create_session(self) -> str:
        return self._run(self._proxy.create_session)

    def call_with_session(self, *call: Any, session_id: str, **kwargs: Any) -> Any:
        return self._run(
            lambda: self._proxy.call_with_session(*call, session_id=session_id, **kwargs)
        )

    def close_session(self, session_id: str) -> bool:
        return self._run(lambda: self._proxy.close_session(session_id))

    def cleanup_auto_session(self) -> None:
        self._run(self._proxy.cleanup_auto_session)

    def __enter__(self) -> SyncProxy[R]:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup_auto_session()

    def _run(self, work: Callable[[], Awaitable[T]]) -> T:
        return self._loop.portal.call(work)  # the portal awaits what the callable returns


class SyncClient:
    """``mesh.connect_sync(...)``: an agent's or the mesh's client whose proxies block."""

    def __init__(self, client: AgentClient | MeshClient, loop: _LoopThread) -> None:
        self._client = client
        self._loop = loop

    @overload
    def proxy(self, tool: str, **options: Any) -> SyncProxy[Any]: ...
    @overload
    def proxy(
        self, tool: Callable[..., Coroutine[Any, Any, R]], **options: Any
    ) -> SyncProxy[R]: ...
    @overload
    def proxy(self, tool: Callable[..., R], **options: Any) -> SyncProxy[R]: ...
    def proxy(self, tool: str | Callable[..., Any], **options: Any) -> SyncProxy[Any]:
        """A blocking proxy for ``tool`` (a capability name, or the provider's ``@mesh.tool``
        function for typed results); the same keywords as the async client's ``proxy`` (a
        blocking proxy streams with ``.stream()`` / ``.call_tool_auto()``)."""
        if options.pop("streaming", False):
            raise UsageError("a blocking proxy streams with .stream(...): drop streaming=True")
        if callable(tool):
            return SyncProxy(self._loop, self._client.proxy(tool, **options))
        return SyncProxy(self._loop, self._client.proxy(tool, streaming=False, **options))

    def list_tools(self) -> list[dict[str, Any]]:
        if not isinstance(self._client, AgentClient):
            raise UsageError("list_tools() is per agent: connect_sync('host:port')")
        return self._loop.portal.call(self._client.list_tools)

    def instances(self) -> list[Any]:
        if not isinstance(self._client, MeshClient):
            raise UsageError("instances() needs a registry: connect_sync(registry=...)")
        return self._client.instances()

    def close(self) -> None:
        """Close every auto session still open, then the connections (the loop thread
        stays for the next blocking client)."""
        self._loop.portal.call(self._client.aclose)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect_sync(
    address: str | None = None,
    *,
    registry: str | None = None,
    tls: TLS | None = None,
    token: str | None = None,
    **settings: Any,
) -> SyncClient:
    """``mesh.connect`` for code without ``await``: scripts, notebooks, plain threads.

    Example::

        with mesh.connect_sync(registry="127.0.0.1:50050") as client:
            with client.proxy("session_counter", session_required=True) as counter:
                print(counter(increment=1), counter(increment=2))  # 1, 3: one session
    """

    async def open_client() -> AgentClient | MeshClient:
        if address is not None and registry is not None:
            raise UsageError("connect_sync() takes an agent address or registry=, not both")
        if address is None:
            # Neither: the registry at $SESSIONMESH_REGISTRY, else 127.0.0.1:50050.
            mesh_client = connect(registry=registry, tls=tls, token=token, **settings)
            return await mesh_client.__aenter__()
        agent_client = connect(address, tls=tls, token=token, **settings)
        return await agent_client.__aenter__()

    loop = _loop_thread()
    return SyncClient(loop.portal.call(open_client), loop)
