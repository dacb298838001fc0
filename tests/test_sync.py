"""mesh.connect_sync: the client for scripts and notebooks, against a real agent process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sessionmesh import mesh
from sessionmesh.errors import SessionLost, ToolNotFound, UsageError
from tests.procs import ROOT, process_blocking


@pytest.fixture(scope="module")
def counter() -> Iterator[str]:
    with process_blocking("serve", str(ROOT / "examples/counter.py")) as (_, ready):
        yield str(ready["address"])


def test_a_script_calls_streams_and_closes_its_sessions(counter: str) -> None:
    with mesh.connect_sync(counter) as client:
        with client.proxy("session_counter", session_required=True) as count:
            assert count(increment=1)["count"] == 1
            assert count(increment=2)["count"] == 3  # one session
            session = count.session_id
            assert session is not None
            chunks = list(count.call_tool_auto("stream_count", {"n": 2}))
            assert [c["i"] for c in chunks] == [1, 2]
            assert all(c["count"] == 3 for c in chunks)  # streamed inside the same session
        assert count.session_id is None  # closed on leaving the block
        with pytest.raises(SessionLost):
            client.proxy("session_counter").call_with_session(session_id=session, increment=1)
        with pytest.raises(ToolNotFound):
            client.proxy("nope")()
        assert {t["name"] for t in client.list_tools()} >= {"increment", "stream_count"}
        with pytest.raises(UsageError, match=r"streams with \.stream"):
            client.proxy("stream_count", streaming=True)


def test_it_works_inside_a_running_event_loop_as_in_jupyter(counter: str) -> None:
    async def notebook_cell() -> int:
        with mesh.connect_sync(counter) as client:
            proxy = client.proxy("session_counter", session_required=True)
            proxy(increment=5)
            result: int = proxy(increment=1)["count"]
            proxy.cleanup_auto_session()
            return result

    assert asyncio.run(notebook_cell()) == 6


def test_a_stream_left_open_when_its_client_closes_ends_with_it(counter: str) -> None:
    with mesh.connect_sync(counter) as client:
        # Two sessions: a stream holds its session's turn until it ends.
        one, other = (client.proxy("stream_count", session_required=True) for _ in "12")
        read_on, left = one.stream(n=1000), other.stream(n=1000)
        assert next(read_on)["i"] == next(left)["i"] == 1
    with pytest.raises(UsageError, match="client was closed while it was open"):
        next(read_on)
    left.close()  # as a garbage collection would: quietly, the client's loop still there


def test_every_blocking_client_runs_on_one_loop_that_outlives_them(counter: str) -> None:
    # grpc delivers a call's last events after its channel closed, through whichever loop
    # wakes first: a loop closed by then makes that loop raise (seen as an error in
    # another test's loop). So the loop stays, and the next client uses it.
    loops = []
    for _ in range(2):
        with mesh.connect_sync(counter) as client:
            assert {t["name"] for t in client.list_tools()} >= {"increment"}
            loops.append(client._loop.portal.call(asyncio.get_running_loop))
    assert loops[0] is loops[1]
    assert loops[0].is_running() and not loops[0].is_closed()


def test_a_blocking_stream_finalized_on_the_loops_own_thread_closes(counter: str) -> None:
    with mesh.connect_sync(counter) as client:
        with client.proxy("stream_count", session_required=True) as proxy:
            chunks = proxy.stream(n=1000)
            assert next(chunks)["i"] == 1
            # As a garbage collection there would: the loop cannot wait for itself.
            client._loop.portal.call(chunks.close)
            # The stream held the session's turn; closed, it lets the next call in.
            assert proxy("session_counter", {"increment": 1})["count"] == 1


def test_clients_left_with_streams_open_leave_no_late_event_for_a_closed_loop(
    counter: str,
) -> None:
    # A script of several asyncio.run()s, each leaving its client with a stream open: the
    # client ends the stream and waits for grpc before closing its channel, so no late
    # event of that stream reaches a loop asyncio.run has closed by then.
    code = f"""
import asyncio
from sessionmesh import mesh

async def main() -> None:
    async with mesh.connect({counter!r}) as client:
        proxy = client.proxy("stream_count", session_required=True)
        async for chunk in proxy.stream(n=1000):
            assert chunk["i"] == 1
            break  # the stream stays open: the client closes with it

for _ in range(30):
    asyncio.run(main())
print("done")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert (out.returncode, out.stdout.strip()) == (0, "done"), out.stderr
    assert "Event loop is closed" not in out.stderr
    assert "Traceback" not in out.stderr
