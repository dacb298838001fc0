from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.procs import registry


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"  # grpc.aio runs on asyncio only


@pytest.fixture(scope="session", autouse=True)
async def _one_event_loop(anyio_backend: str) -> None:
    """Hold anyio's runner for the whole session: every test runs on one event loop.

    grpc.aio forwards a completion to the loop its call was made on. With a loop per test,
    a call of an earlier test that the garbage collector finalises later completes on a
    closed loop ("Event loop is closed", raised into whatever test runs then). A service
    runs on one loop per process; so do the tests. (anyio keeps the runner while any async
    fixture is alive, this one for the whole session.)
    """


@pytest.fixture
async def reg() -> AsyncIterator[str]:
    """A registry process on a port the OS picked: its address."""
    async with registry() as (_, address):
        yield address
