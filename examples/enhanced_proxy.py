"""The design note's "Enhanced Proxy" walkthrough, as a client script.

sessionmesh run examples/counter.py          # in one terminal
python examples/enhanced_proxy.py            # in another (or pass a registry address)
"""

from __future__ import annotations

import asyncio
import sys

from sessionmesh import mesh


async def main(registry: str) -> None:
    async with mesh.connect(registry=registry) as client:
        # What dependency resolution builds for a tool with these kwargs.
        enhanced_proxy = client.proxy(
            "session_counter",
            session_required=True,
            stateful=True,
            auto_session_management=True,
            timeout=60,
            retry_count=3,
        )
        assert enhanced_proxy.session_required == True  # noqa: E712  # as the note writes it
        assert enhanced_proxy.auto_session_management == True  # noqa: E712
        assert enhanced_proxy._current_session_id == None  # No session yet  # noqa: E711

        # First call: the proxy opens the session; later calls reuse it.
        result1 = await enhanced_proxy("increment", {"amount": 1})
        session = enhanced_proxy.session_id
        result2 = await enhanced_proxy("increment", {"amount": 2})
        assert enhanced_proxy.session_id == session
        print(f"session {mesh.short_id(str(session))}: {result1['count']}, {result2['count']}")

        # On completion or error: the proxy closes the session.
        await enhanced_proxy.cleanup_auto_session()
        assert enhanced_proxy.session_id is None


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50050"))
