"""OpenTelemetry traces of sessionmesh calls (extra ``sessionmesh[otel]``).

Off until enabled: a call then pays one branch. ``enable()`` uses the global tracer
provider (or the one given), configured the standard way by the application (or by
``sessionmesh serve``/``run`` from ``OTEL_*`` variables, see ``configure_from_env``). Each
call gets a client span and, on the agent, a server span that is its child; a call made
through an injected proxy inside a tool is a child of that tool's span, so one trace shows
consumer -> provider -> its dependencies. Trace context travels as W3C ``traceparent`` /
``tracestate``: in a Call's headers, and per call in ``ExchangeRequest.metadata``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from sessionmesh.errors import UsageError

__all__ = [
    "client_span",
    "configure_from_env",
    "current_trace_id",
    "disable",
    "enable",
    "end_span",
    "event",
    "extract",
    "headers",
    "inject",
    "span",
    "start_stream_span",
    "tracer",
]

_tracer: Any = None


def _api() -> Any:
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        raise UsageError("tracing needs OpenTelemetry: pip install 'sessionmesh[otel]'") from None
    return trace, propagate


def enable(provider: Any = None) -> None:
    """Trace every call from now on, with ``provider`` (default: the global one)."""
    global _tracer
    trace, _ = _api()
    _tracer = trace.get_tracer("sessionmesh", tracer_provider=provider)


def disable() -> None:
    global _tracer
    _tracer = None


def tracer() -> Any:
    """The tracer, or None while tracing is off (the one branch a call pays)."""
    return _tracer


def current_trace_id() -> str:
    """The id (32 hex digits) of the trace being recorded here, or "" (tracing off, or no
    span): what log lines carry to be found beside their trace."""
    if _tracer is None:
        return ""
    context = _api()[0].get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def inject(carrier: MutableMapping[str, str]) -> None:
    """Put the current trace context into ``carrier`` (W3C headers)."""
    _api()[1].inject(carrier)


def extract(carrier: Mapping[str, str]) -> Any:
    """The trace context ``carrier`` holds (an OpenTelemetry Context)."""
    return _api()[1].extract(carrier)


def _attributes(tool: str, target: str) -> dict[str, Any]:
    return {"rpc.system": "grpc", "sessionmesh.tool": tool, "sessionmesh.capability": target}


def _outcome(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    reason = getattr(error, "reason", "") or getattr(getattr(error, "code", None), "name", "")
    return str(reason or type(error).__name__).lower()


@contextlib.contextmanager
def client_span(tracer: Any, tool: str, target: str) -> Iterator[Any]:
    """The current span of one call from this process (its outcome set when it ends)."""
    from opentelemetry.trace import SpanKind

    with tracer.start_as_current_span(
        tool,
        kind=SpanKind.CLIENT,
        attributes=_attributes(tool, target),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            end_span(span, exc, end=False)
            raise
        end_span(span, None, end=False)


def start_stream_span(tracer: Any, tool: str, target: str) -> tuple[Any, dict[str, str]]:
    """A span for a stream (not made current: the caller reads the stream between its own
    awaits), and the headers that carry it to the agent."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    span = tracer.start_span(tool, kind=SpanKind.CLIENT, attributes=_attributes(tool, target))
    carrier: dict[str, str] = {}
    _api()[1].inject(carrier, context=trace.set_span_in_context(span))
    return span, carrier


def end_span(span: Any, error: BaseException | None, *, chunks: int = 0, end: bool = True) -> None:
    """Record how a call ended on its span (and end it, unless its ``with`` does)."""
    span.set_attribute("sessionmesh.outcome", _outcome(error))
    if chunks:
        span.set_attribute("sessionmesh.chunks", chunks)
    if error is not None and not isinstance(error, asyncio.CancelledError):
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, _outcome(error)))
    if end:
        span.end()


def event(name: str, attributes: Mapping[str, str] | None = None) -> None:
    """Add an event to the current span, when tracing is on (session opened, closed,
    expired, lost)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, dict(attributes or {}))


@contextlib.contextmanager
def span(
    name: str,
    carrier: Mapping[str, str] | None = None,
    attributes: Mapping[str, str] | None = None,
    *,
    server: bool = False,
) -> Iterator[None]:
    """A span around work that is not a tool call (closing or expiring a session; a request
    of the MCP front door, ``server``), a child of the trace ``carrier`` holds, if any;
    nothing when tracing is off."""
    if _tracer is None:
        yield
        return
    from opentelemetry.trace import SpanKind

    context = extract(carrier) if carrier else None
    kind = SpanKind.SERVER if server else SpanKind.INTERNAL
    with _tracer.start_as_current_span(
        name, context=context, kind=kind, attributes=dict(attributes or {})
    ):
        yield


def headers() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata (empty when tracing is off)."""
    if _tracer is None:
        return ()
    carrier: dict[str, str] = {}
    inject(carrier)
    return tuple(carrier.items())


def configure_from_env(service_name: str = "sessionmesh") -> bool:
    """For ``sessionmesh serve``/``run``: when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
    ``OTEL_TRACES_EXPORTER=otlp``/``console``) is set, set up the SDK with a batching
    exporter (service name from ``OTEL_SERVICE_NAME``, else ``service_name``) and enable
    tracing. Whether it did."""
    wanted = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_TRACES_EXPORTER"
    ) in ("otlp", "console")
    if not wanted or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError:
        raise UsageError(
            "OTEL_* is set, but tracing needs: pip install 'sessionmesh[otel]'"
        ) from None
    exporter: SpanExporter
    if os.environ.get("OTEL_TRACES_EXPORTER") == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, TLS from OTEL_EXPORTER_OTLP_*
    from opentelemetry.sdk.resources import Resource

    named = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(named))  # OTEL_* resource env too
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    enable(provider)
    return True
