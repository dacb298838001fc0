"""Calls on one Exchange stream run their first step in the task that reads the stream
(``server/_eager.py``): what a call holds must still name its own task, what it sets must
not leak into the next call, and a call that waits must not hold up the others."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from sessionmesh import mesh
from sessionmesh.errors import Code
from sessionmesh.server._eager import Eager
from sessionmesh.testing import running_agent

pytestmark = pytest.mark.anyio

MARK: contextvars.ContextVar[str] = contextvars.ContextVar("mark", default="unset")


@mesh.tool
async def mark(value: str) -> str:
    """Sets a context variable and leaves it set: a careless tool."""
    before = MARK.get()
    MARK.set(value)
    return before


async def test_what_a_call_sets_in_its_context_does_not_leak_into_the_next() -> None:
    async with running_agent(mark) as (_, client):
        proxy = client.proxy("mark")
        assert [await proxy(value=v) for v in ("a", "b", "c")] == ["unset"] * 3


async def test_a_waiting_call_keeps_its_timeouts_and_task_groups_and_holds_up_no_other() -> None:
    release = asyncio.Event()
    seen: list[str] = []

    @mesh.tool
    async def slow() -> list[str]:
        async with asyncio.timeout(10):  # captures the task it runs in: it must be the call's
            async with asyncio.TaskGroup() as group:
                child = group.create_task(release.wait())
            await child
            await asyncio.sleep(0)
        return seen

    @mesh.tool
    async def fast(n: int) -> int:
        seen.append(f"fast {n}")
        return n

    @mesh.tool
    async def let_go() -> None:
        release.set()

    async with running_agent(slow, fast, let_go) as (_, client):
        waiting = asyncio.ensure_future(client.proxy("slow")())
        # Same client, same Exchange stream: these are answered while `slow` waits.
        assert [await client.proxy("fast")(n=n) for n in (1, 2)] == [1, 2]
        assert not waiting.done()
        await client.proxy("let_go")()
        assert await asyncio.wait_for(waiting, 10) == ["fast 1", "fast 2"]


async def test_a_waiting_call_times_out_as_its_own_and_the_stream_goes_on() -> None:
    @mesh.tool(timeout=0.05)
    async def stuck() -> None:
        await asyncio.Event().wait()

    @mesh.tool
    async def quick() -> str:
        return "ok"

    async with running_agent(stuck, quick) as (_, client):
        with pytest.raises(mesh.errors.ToolTimeout):
            await client.proxy("stuck")()
        assert await client.proxy("quick")() == "ok"


class _Broken(Mapping[str, int]):
    """A mapping whose items cannot be read: turning it into an answer fails inside the
    agent, not in the tool."""

    def __getitem__(self, key: str) -> int:
        raise RuntimeError("unreadable")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("unreadable")

    def __len__(self) -> int:
        return 1


async def test_a_call_that_fails_inside_the_agent_gets_internal_and_harms_no_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @mesh.tool
    async def broken(wait: bool = False) -> Any:
        if wait:
            await asyncio.sleep(0)  # the same failure, after the call has waited
        return _Broken()

    @mesh.tool
    async def fine() -> str:
        return "fine"

    async with running_agent(broken, fine) as (_, client):
        for wait in (False, True):
            failed = r"the agent failed on this call \(RuntimeError"
            with pytest.raises(mesh.errors.RemoteError, match=failed) as info:
                await asyncio.wait_for(client.proxy("broken")(wait=wait), 10)
            assert info.value.code == Code.INTERNAL
            assert await client.proxy("fine")() == "fine"  # the same stream goes on
    assert "failed inside the agent" in caplog.text


async def _steps(log: list[str]) -> int:
    log.append("first")
    await asyncio.sleep(0)
    log.append("second")
    return 7


async def _at_once() -> int:
    return 3


async def _raises() -> int:
    raise ValueError("no")


async def test_eager_runs_the_first_step_now_and_the_rest_when_awaited() -> None:
    assert Eager(_at_once()).done and Eager(_at_once()).result == 3
    with pytest.raises(ValueError, match="no"):
        Eager(_raises())
    log: list[str] = []
    started = Eager(_steps(log))
    assert not started.done and log == ["first"]
    assert await started == 7 and log == ["first", "second"]


async def test_cancelling_the_task_that_awaits_the_rest_cancels_the_coroutine() -> None:
    cleaned: list[str] = []

    async def waits() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("finally ran")

    async def holder() -> None:
        await Eager(waits())

    task = asyncio.ensure_future(holder())
    await asyncio.sleep(0)  # it runs its first step and waits
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["finally ran"]
