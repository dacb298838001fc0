from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.procs import registry


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # grpc.aio runs on asyncio only


@pytest.fixture
async def reg() -> AsyncIterator[str]:
    """A registry process on a port the OS picked: its address."""
    async with registry() as (_, address):
        yield address
