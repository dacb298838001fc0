"""OpenTelemetry traces: one trace from a client through a consumer to its provider, with an
in-memory exporter; spans carry the tool, agent, instance, outcome, never a whole session id."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sessionmesh import mesh, tracing
from sessionmesh.errors import InvalidArguments, ToolFailed
from sessionmesh.testing import eventually, running_agent
from tests.procs import serve
from tests.tools import fail, increment, stream_count

pytestmark = pytest.mark.anyio


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()


@mesh.tool(
    capability="tally",
    dependencies=["session_counter", "stream_count"],
    session_required=True,
)
async def tally(
    session_counter: mesh.McpAgent | None = None, stream_count: mesh.McpAgent | None = None
) -> dict[str, Any]:
    assert session_counter is not None and stream_count is not None
    count = await session_counter(increment=2)
    chunks = [c async for c in stream_count.call_tool_auto("stream_count", {"n": 3})]
    return {"count": count, "chunks": len(chunks)}


def _one(spans: Sequence[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name and s.kind == kind]
    return span


async def test_one_trace_from_client_to_consumer_to_provider(
    spans: InMemorySpanExporter,
) -> None:
    async with running_agent(increment, stream_count, fail) as (provider, _):
        peers = {"session_counter": provider.address, "stream_count": provider.address}
        async with running_agent(tally, peers=peers, name="consumer") as (consumer, client):
            assert await client.proxy("tally")() == {"count": 2, "chunks": 3}
            with pytest.raises(ToolFailed):
                async with mesh.connect(provider.address) as direct:
                    await direct.proxy("fail")(message="boom")
    done = spans.get_finished_spans()
    outer = _one(done, "tally", SpanKind.CLIENT)
    served = _one(done, "tally", SpanKind.SERVER)
    inner = _one(done, "session_counter", SpanKind.CLIENT)
    # Both sides name the span as the caller named the tool (its function is an attribute).
    provided = _one(done, "session_counter", SpanKind.SERVER)
    assert provided.attributes is not None
    assert provided.attributes["sessionmesh.tool"] == "increment"
    stream = _one(done, "stream_count", SpanKind.CLIENT)
    streamed = _one(done, "stream_count", SpanKind.SERVER)
    trace_id = outer.context.trace_id
    assert {s.context.trace_id for s in (served, inner, provided, stream, streamed)} == {trace_id}
    assert served.parent is not None and served.parent.span_id == outer.context.span_id
    assert inner.parent is not None and inner.parent.span_id == served.context.span_id
    assert provided.parent is not None and provided.parent.span_id == inner.context.span_id
    assert stream.parent is not None and stream.parent.span_id == served.context.span_id
    assert streamed.parent is not None and streamed.parent.span_id == stream.context.span_id
    assert served.attributes is not None and provided.attributes is not None
    assert served.attributes["sessionmesh.agent"] == "consumer"
    assert served.attributes["sessionmesh.instance"] == consumer.instance_id
    assert provided.attributes["sessionmesh.outcome"] == "ok"
    assert streamed.attributes is not None and stream.attributes is not None
    assert streamed.attributes["sessionmesh.chunks"] == 3
    assert stream.attributes["sessionmesh.chunks"] == 3
    assert [e.name for e in provided.events] == ["session opened"]
    session = str(provided.attributes["sessionmesh.session"])
    assert len(session) < 16  # shortened, never the whole id
    # Closing the consumer's auto session when the tool ended is part of the same trace.
    closing = [s for s in done if s.name == "close session"]
    closed = [s for s in done if s.name == "CloseSession"]
    assert closing and closed and closing[0].parent is not None
    assert closing[0].parent.span_id == served.context.span_id
    assert any(c.parent and c.parent.span_id == closing[0].context.span_id for c in closed)
    assert "session closed" in {e.name for c in closed for e in c.events}
    failed = _one(done, "fail", SpanKind.SERVER)
    assert failed.attributes is not None
    assert failed.attributes["sessionmesh.outcome"] == "tool_failed"
    called = _one(done, "fail", SpanKind.CLIENT)
    assert called.attributes is not None
    assert called.attributes["sessionmesh.outcome"] == "tool_failed"


async def test_serve_exports_spans_when_otel_variables_say_so() -> None:
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "counter-under-test"}
    async with serve("examples/counter.py", env=env) as (proc, ready):
        async with mesh.connect(ready["address"]) as client:
            async with client.proxy("session_counter", session_required=True) as counter:
                assert (await counter(increment=1))["count"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None
        exported = (await asyncio.wait_for(proc.stdout.read(), 30)).decode()
    assert '"name": "session_counter"' in exported  # the server span, flushed at exit
    assert '"kind": "SpanKind.SERVER"' in exported
    assert '"sessionmesh.agent": "counter"' in exported
    assert '"service.name": "counter-under-test"' in exported


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver, as a collector would run one."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.resources: list[dict[str, str]] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            self.resources.append(attrs)
            for scope in resource_spans.scope_spans:
                self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_serve_exports_over_otlp_to_a_real_receiver() -> None:
    receiver = _Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    try:
        async with serve("examples/counter.py", env=env) as (_, ready):
            async with mesh.connect(ready["address"]) as client:
                async with client.proxy("session_counter", session_required=True) as counter:
                    assert (await counter(increment=1))["count"] == 1
            await eventually(lambda: bool(receiver.spans), what="spans reach the receiver")
        names = {s.name for s in receiver.spans}
        assert "session_counter" in names
        assert {"service.name": "counter"}.items() <= receiver.resources[0].items()
    finally:
        await server.stop(0)


async def test_a_call_refused_at_arrival_has_a_span_too(spans: InMemorySpanExporter) -> None:
    async with running_agent(increment) as (_, client):
        with pytest.raises(InvalidArguments):
            await client.proxy("session_counter", session_required=True)(increment="x")
    refused = _one(spans.get_finished_spans(), "session_counter", SpanKind.SERVER)
    assert refused.attributes is not None
    assert refused.attributes["sessionmesh.outcome"] == "invalid_arguments"
    assert refused.status.status_code.name == "ERROR"
