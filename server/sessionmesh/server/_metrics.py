"""Prometheus metrics of an agent or a registry (``--metrics-port``, extra
``sessionmesh[metrics]``). What is counted per call costs one branch when metrics are off;
what can be read off the running state (sessions, streams, waiting calls, instances) is
read when scraped, never kept up to date per call. Labels are bounded: tool names and
error reasons, never session ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from sessionmesh.core import TLS
from sessionmesh.core._tallies import FAILOVER, RETRY, SESSION_LOST, client_events
from sessionmesh.errors import UsageError
from sessionmesh.server._security import is_loopback

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from sessionmesh.server._sessions import SessionStore
    from sessionmesh.v1 import registry_service_pb2 as rpb

#: Call latency buckets, seconds: sub-millisecond calls up to long tools.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core  # the metric families collectors yield
    except ImportError:
        raise UsageError(
            "--metrics-port needs prometheus-client: pip install 'sessionmesh[metrics]'"
        ) from None
    return prometheus_client


def _build() -> dict[str, str]:
    import platform
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {
        "version": version("sessionmesh"),
        "grpcio": version("grpcio"),
        "python": platform.python_version(),
    }


class Exporter:
    """A registry of metrics served on ``/metrics`` over HTTP(S) from a thread."""

    def __init__(self) -> None:
        p = self.prometheus = _prometheus()
        r = self.registry = p.CollectorRegistry()
        # What every exporter says: which sessionmesh, and the process's own figures.
        p.ProcessCollector(registry=r)
        p.PlatformCollector(registry=r)
        p.GCCollector(registry=r)
        p.Info("sessionmesh_build", "Which sessionmesh serves these metrics", registry=r).info(
            _build()
        )
        self._server: WSGIServer | None = None
        self.address = ""

    def serve(self, host: str, port: int, tls: TLS | None, *, insecure: bool) -> str:
        """Start serving; returns ``host:port``. Same rule as the gRPC port: TLS, or a
        loopback address, or ``insecure``."""
        secure = tls is not None and tls.serves
        if not secure and not is_loopback(host) and not insecure:
            raise UsageError(
                f"metrics on {host} would be readable from other machines in plaintext: give "
                "--tls-cert/--tls-key, bind loopback, or pass --insecure"
            )
        try:
            server, _ = self.prometheus.start_http_server(
                port,
                addr=host,
                registry=self.registry,
                certfile=tls.cert if secure and tls else None,
                keyfile=tls.key if secure and tls else None,
            )
        except OSError as exc:
            raise UsageError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; choose another "
                "--metrics-port (0 picks a free one)"
            ) from None
        self._server = server
        self.address = f"{host}:{server.server_address[1]}"
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class AgentMetrics(Exporter):
    """An agent's: calls by tool and outcome, their latency, stream chunks; and, read when
    scraped, sessions (open; created, closed, expired so far), Exchange streams open, calls
    waiting for their session's turn."""

    def __init__(
        self,
        store: SessionStore,
        exchange_streams: Callable[[], int],
        durable_calls: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        p, r = self.prometheus, self.registry
        self.calls = p.Counter(
            "sessionmesh_calls", "Tool calls, by tool and outcome", ["tool", "outcome"], registry=r
        )
        self.seconds = p.Histogram(
            "sessionmesh_call_seconds", "Tool call latency", ["tool"], buckets=BUCKETS, registry=r
        )
        self.chunks = p.Counter(
            "sessionmesh_stream_chunks", "Chunks streamed, by tool", ["tool"], registry=r
        )
        r.register(_StateCollector(p, store, exchange_streams, durable_calls))

    def refused(self, tool: str, outcome: str) -> None:
        """A call refused before it ran (its reason as the outcome)."""
        self.calls.labels(tool, outcome).inc()

    def done(self, tool: str, outcome: str, seconds: float, chunks: int = 0) -> None:
        """One tool run ended with ``outcome`` after ``seconds``, having streamed ``chunks``."""
        self.calls.labels(tool, outcome).inc()
        self.seconds.labels(tool).observe(seconds)
        if chunks:
            self.chunks.labels(tool).inc(chunks)


class _StateCollector:
    def __init__(
        self,
        p: Any,
        store: SessionStore,
        exchange_streams: Callable[[], int],
        durable_calls: dict[str, int] | None,
    ) -> None:
        self.p = p
        self.store = store
        self.exchange_streams = exchange_streams
        self.durable_calls = durable_calls

    def collect(self) -> Iterable[Any]:
        core = self.p.core
        store = self.store
        yield core.GaugeMetricFamily(
            "sessionmesh_sessions_open", "Sessions open on this agent", value=len(store)
        )
        events = core.CounterMetricFamily(
            "sessionmesh_sessions", "Sessions so far, by what happened", labels=["event"]
        )
        for event, count in store.counters.items():
            events.add_metric([event], count)
        yield events
        yield core.GaugeMetricFamily(
            "sessionmesh_exchange_streams_open",
            "Exchange streams open to this agent",
            value=self.exchange_streams(),
        )
        yield core.GaugeMetricFamily(
            "sessionmesh_calls_waiting",
            "Calls waiting for their session's turn",
            value=sum(s.waiting for s in store.sessions()),
        )
        client = core.CounterMetricFamily(
            "sessionmesh_client_events",
            "What this process's proxies did on their own: retries, failovers, sessions lost",
            labels=["event"],
        )
        for event in (RETRY, FAILOVER, SESSION_LOST):
            client.add_metric([event], client_events[event])
        yield client
        if self.durable_calls is not None:
            durable = core.CounterMetricFamily(
                "sessionmesh_durable_calls",
                "Calls in durable sessions: saved to the store, or answered from a saved outcome",
                labels=["event"],
            )
            for event, count in self.durable_calls.items():
                durable.add_metric([event], count)
            yield durable


class FrontDoorMetrics(Exporter):
    """The MCP front door's: tools/call by tool and outcome (``ok``, or the mesh error's
    reason), their latency as MCP clients see it."""

    def __init__(self) -> None:
        super().__init__()
        p, r = self.prometheus, self.registry
        self.calls = p.Counter(
            "sessionmesh_mcp_calls",
            "MCP tools/call requests, by tool and outcome",
            ["tool", "outcome"],
            registry=r,
        )
        self.seconds = p.Histogram(
            "sessionmesh_mcp_call_seconds",
            "MCP tools/call latency",
            ["tool"],
            buckets=BUCKETS,
            registry=r,
        )

    def done(self, tool: str, outcome: str, seconds: float) -> None:
        self.calls.labels(tool, outcome).inc()
        self.seconds.labels(tool).observe(seconds)


class RegistryMetrics(Exporter):
    """A registry's: instances by state, read when scraped."""

    def __init__(self, instances: Callable[[], list[rpb.Instance]]) -> None:
        super().__init__()
        self.registry.register(_InstancesCollector(self.prometheus, instances))


class _InstancesCollector:
    def __init__(self, p: Any, instances: Callable[[], list[rpb.Instance]]) -> None:
        self.p = p
        self.instances = instances

    def collect(self) -> Iterable[Any]:
        from sessionmesh.v1 import registry_service_pb2 as rpb

        family = self.p.core.GaugeMetricFamily(
            "sessionmesh_instances", "Registered instances, by state", labels=["state"]
        )
        counts = dict.fromkeys(("serving", "draining", "unreachable"), 0)
        for instance in self.instances():
            state = rpb.InstanceState.Name(instance.state).removeprefix("INSTANCE_STATE_").lower()
            counts[state] = counts.get(state, 0) + 1
        for state, count in counts.items():
            family.add_metric([state], count)
        yield family
