"""What an agent sees of each call it serves: a server span (when tracing is on) and its
metrics (when served), both around the tool, in one place for unary calls and streams."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sessionmesh import tracing
from sessionmesh.server._errors import Fail
from sessionmesh.wire.names import short

if TYPE_CHECKING:
    from sessionmesh.server._dispatch import Plan
    from sessionmesh.server._metrics import AgentMetrics


class Counted:
    """A call being observed; a stream adds its chunks to ``chunks``."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks = 0


def outcome(error: BaseException | None) -> str:
    """A call's outcome label: ok, cancelled, or its ErrorInfo reason (else status code)."""
    if error is None:
        return "ok"
    if isinstance(error, Fail):
        return (error.reason or error.code.name).lower()
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return "error"


@contextlib.contextmanager
def observing(
    plan: Plan, metrics: AgentMetrics | None, tracer: Any, agent: str, instance: str
) -> Iterator[Counted]:
    """Around one call: its span is current while the tool runs (calls it makes through its
    proxies are children of it), its metrics are counted when it ends."""
    counted = Counted()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        span = stack.enter_context(_span(tracer, plan, agent, instance)) if tracer else None
        error: BaseException | None = None
        try:
            yield counted
        except BaseException as exc:
            error = exc
            raise
        finally:
            result = outcome(error)
            if metrics is not None:
                seconds = time.perf_counter() - started
                metrics.done(plan.bound.spec.name, result, seconds, counted.chunks)
            if span is not None:
                span.set_attribute("sessionmesh.outcome", result)
                if counted.chunks:
                    span.set_attribute("sessionmesh.chunks", counted.chunks)
                if error is not None and not isinstance(error, asyncio.CancelledError):
                    from opentelemetry.trace import Status, StatusCode

                    span.set_status(Status(StatusCode.ERROR, result))


def _span(tracer: Any, plan: Plan, agent: str, instance: str) -> Any:
    from opentelemetry.trace import SpanKind

    spec = plan.bound.spec
    attributes: dict[str, Any] = {
        "rpc.system": "grpc",
        "sessionmesh.tool": spec.name,
        "sessionmesh.capability": spec.capability,
        "sessionmesh.agent": agent,
        "sessionmesh.instance": instance,
    }
    if plan.session is not None:
        attributes["sessionmesh.session"] = short(plan.session.id)
    if plan.principal:
        attributes["sessionmesh.principal"] = plan.principal
    span = tracer.start_as_current_span(
        plan.asked,  # the name the caller's span has, too
        context=tracing.extract(plan.carrier) if plan.carrier else None,
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )
    if plan.created:
        return _with_event(span, "session opened")
    return span


@contextlib.contextmanager
def _with_event(span_cm: Any, name: str) -> Iterator[Any]:
    with span_cm as span:
        span.add_event(name)
        yield span


def refused(
    metrics: AgentMetrics | None,
    tracer: Any,
    tool: str,
    asked: str,
    fail: Fail,
    agent: str,
    instance: str,
) -> None:
    """A call refused at arrival (bad arguments, an unknown tool or session, not allowed):
    counted under its reason, and a span that says so (it never ran: no caller context)."""
    result = outcome(fail)
    if metrics is not None:
        metrics.refused(tool, result)
    if tracer is not None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        attributes = {
            "rpc.system": "grpc",
            "sessionmesh.tool": tool,
            "sessionmesh.agent": agent,
            "sessionmesh.instance": instance,
            "sessionmesh.outcome": result,
        }
        with tracer.start_as_current_span(
            asked, kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            span.set_status(Status(StatusCode.ERROR, result))
