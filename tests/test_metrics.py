"""Prometheus metrics, scraped over HTTP as Prometheus would, while the mesh works."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sessionmesh import mesh
from sessionmesh.errors import (
    AgentUnavailable,
    InvalidArguments,
    SessionNotFound,
    ToolFailed,
    ToolNotFound,
)
from sessionmesh.testing import eventually, running_agent
from tests.procs import ROOT, process_blocking, wait_until
from tests.redis_server import redis_server
from tests.tools import fail, increment, stream_count

pytestmark = pytest.mark.anyio


async def scrape(address: str) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], str]:
    def get() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(get)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return samples, text


async def test_an_agent_counts_calls_sessions_and_streams() -> None:
    async with running_agent(increment, stream_count, fail, metrics_port=0) as (agent, client):
        assert agent.metrics is not None
        async with client.proxy("session_counter", session_required=True) as counter:
            for n in (1, 2, 3):
                await counter(increment=n)
            with pytest.raises(InvalidArguments):
                await counter(increment="x")
            chunks = [c async for c in counter.call_tool_auto("stream_count", {"n": 4})]
            assert len(chunks) == 4
            with pytest.raises(ToolFailed):
                await client.proxy("fail")(message="boom")
            samples, text = await scrape(agent.metrics.address)
            assert (
                samples[("sessionmesh_calls_total", (("outcome", "ok"), ("tool", "increment")))]
                == 3
            )
            assert (
                samples[("sessionmesh_calls_total", (("outcome", "ok"), ("tool", "stream_count")))]
                == 1
            )
            assert (
                samples[("sessionmesh_calls_total", (("outcome", "tool_failed"), ("tool", "fail")))]
                == 1
            )
            assert samples[("sessionmesh_stream_chunks_total", (("tool", "stream_count"),))] == 4
            # Refused at arrival, before running: counted too, by reason (a tool nobody
            # declares is "unknown": labels never grow with what callers send).
            assert (
                samples[
                    (
                        "sessionmesh_calls_total",
                        (("outcome", "invalid_arguments"), ("tool", "increment")),
                    )
                ]
                == 1
            )
            for name in ("nope", "nope2"):
                with pytest.raises(ToolNotFound):
                    await client.proxy(name)()
            samples, text = await scrape(agent.metrics.address)
            assert (
                samples[
                    (
                        "sessionmesh_calls_total",
                        (("outcome", "tool_not_found"), ("tool", "unknown")),
                    )
                ]
                == 2
            )
            assert "nope" not in text
            build = [k for k in samples if k[0] == "sessionmesh_build_info"]
            assert build and dict(build[0][1])["version"]
            assert ("process_cpu_seconds_total", ()) in samples  # the process's own figures
            assert samples[("sessionmesh_call_seconds_count", (("tool", "increment"),))] == 3
            assert samples[("sessionmesh_sessions_open", ())] == 1
            assert samples[("sessionmesh_sessions_total", (("event", "created"),))] == 1
            assert samples[("sessionmesh_exchange_streams_open", ())] == 1
            assert samples[("sessionmesh_calls_waiting", ())] == 0
            assert str(counter.session_id) not in text  # never a session id
            assert mesh.short_id(str(counter.session_id)) not in text
        samples, _ = await scrape(agent.metrics.address)
        assert samples[("sessionmesh_sessions_open", ())] == 0
        assert samples[("sessionmesh_sessions_total", (("event", "closed"),))] == 1


async def test_a_registry_counts_instances_by_state() -> None:
    async with mesh.Registry(metrics_port=0) as registry:
        assert registry.metrics is not None
        agent = mesh.Agent([increment], registry=registry.address)
        await agent.start()
        try:
            async with mesh.connect(registry=registry.address) as client:
                await client.ready()
                address = registry.metrics.address

                async def serving() -> bool:
                    samples, _ = await scrape(address)
                    return samples[("sessionmesh_instances", (("state", "serving"),))] == 1

                await eventually(serving, what="the registry counts one serving instance")
        finally:
            await agent.stop(grace=0)


def test_run_serves_metrics_for_its_registry_and_each_agent() -> None:
    with process_blocking(
        "run", str(ROOT / "examples/counter.py"), "--registry-port", "0", "--metrics-port", "0"
    ) as (_, ready):
        [agent] = ready["agents"]

        def text(address: str) -> str:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
                return str(response.read().decode())

        wait_until(
            lambda: 'sessionmesh_instances{state="serving"} 1.0' in text(ready["registry_metrics"]),
            within=10,
            what="the registry's metrics count the agent",
        )
        assert "sessionmesh_sessions_open 0.0" in text(agent["metrics"])
        assert 'sessionmesh_sessions_total{event="lost"} 0.0' in text(agent["metrics"])


async def test_durable_sessions_count_saves_replays_and_takeovers() -> None:
    async with (
        redis_server() as store,
        running_agent(increment, metrics_port=0, session_store=store.url) as (agent, client),
    ):
        assert agent.metrics is not None
        async with client.proxy("increment", session_required=True) as counter:
            assert [await counter(increment=1) for _ in range(3)] == [1, 2, 3]
            samples, text = await scrape(agent.metrics.address)
            assert samples[("sessionmesh_durable_calls_total", (("event", "saved"),))] == 3
            assert samples[("sessionmesh_durable_calls_total", (("event", "replayed"),))] == 0
            assert samples[("sessionmesh_sessions_total", (("event", "adopted"),))] == 0
            assert samples[("sessionmesh_sessions_total", (("event", "fenced"),))] == 0
            assert str(counter.session_id) not in text


async def test_an_agent_counts_what_its_processs_proxies_did_on_their_own() -> None:
    # Retries, failovers and lost sessions happen in clients: an agent's injected proxies
    # are clients too, and its metrics say what they went through.
    async with running_agent(increment, metrics_port=0) as (agent, client):
        assert agent.metrics is not None

        async def events() -> dict[str, float]:
            assert agent.metrics is not None
            samples, _ = await scrape(agent.metrics.address)
            return {
                dict(labels)["event"]: value
                for (name, labels), value in samples.items()
                if name == "sessionmesh_client_events_total"
            }

        before = await events()
        counter = client.proxy("session_counter", session_required=True)
        await counter(increment=1)
        assert counter.session_id is not None
        await agent.sessions.close(counter.session_id)
        with pytest.raises(SessionNotFound):
            await counter(increment=1)
        await counter.cleanup_auto_session()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            nowhere = f"127.0.0.1:{s.getsockname()[1]}"
        async with mesh.connect(nowhere) as gone:
            with pytest.raises(AgentUnavailable):
                await gone.proxy("x", retry_count=2, retry_delay=0.01)()
        after = await events()
        assert after["session_lost"] - before["session_lost"] == 1
        assert after["retry"] - before["retry"] == 2
        assert "failover" in after
