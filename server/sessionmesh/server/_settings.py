"""How an agent serves: one settings object for ``Agent(...)`` and ``@mesh.agent(...)``, and
the one place that maps the ``serve`` command's flags and their environment variables onto
it (``from_flags``). Light on purpose: ``@mesh.agent`` checks its keywords against it."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sessionmesh.core import TLS
from sessionmesh.core.cli import registry_address, tls_from, token_from
from sessionmesh.errors import UsageError
from sessionmesh.server._recall import MAX_BYTES, MAX_CALLS
from sessionmesh.wire import etcd
from sessionmesh.wire.limits import (
    DEFAULT_MAX_CALLS_PER_STREAM,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_STREAMS_PER_CONNECTION,
)

if TYPE_CHECKING:
    from sessionmesh.server._security import Verifier

#: Threads for plain (``def``) tools, per agent: how many can block at once.
DEFAULT_THREADS = 32
#: With etcd: the lease TTL after which an agent that stopped answering is lost.
DEFAULT_LOST_AFTER = 5.0

AUTH_TOKENS_ENV = "SESSIONMESH_AUTH_TOKENS"
SESSION_STORE_ENV = "SESSIONMESH_SESSION_STORE"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AgentSettings:
    """Everything about how an agent serves, checked once. ``Agent(tools, **settings)``,
    ``@mesh.agent(name, **settings)`` and ``sessionmesh serve``'s flags all make one."""

    name: str = "agent"
    #: Where to listen (127.0.0.1 and a free port by default).
    host: str = "127.0.0.1"
    port: int = 0
    #: A session idle this long is closed (seconds; a tool's ``session_ttl`` overrides it).
    session_ttl: float = 300.0
    max_sessions: int = 100_000
    #: On stop: how long calls in flight get to finish.
    grace: float = 5.0
    #: Send tracebacks of failed tools to callers (DebugInfo).
    debug: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Dependencies at fixed addresses (capability -> host:port), instead of a registry.
    peers: Mapping[str, str] | None = None
    #: The registry (host:port, or etcd://...) the agent registers with.
    registry: str | None = None
    #: The address other instances and clients reach this one at, if not host:port.
    advertise: str | None = None
    #: On SIGTERM with a registry: how long open sessions may go on before the agent stops.
    drain_timeout: float = 30.0
    threads: int = DEFAULT_THREADS
    #: The call-id memory (retries answered from it): at most this many calls, this many bytes.
    remembered_calls: int = MAX_CALLS
    remembered_bytes: int = MAX_BYTES
    tls: TLS | None = None
    #: Serve plaintext on an address reachable from elsewhere (refused without it).
    insecure: bool = False
    #: A bearer token this agent sends to its registry and dependencies.
    token: str | None = None
    #: The tokens this agent accepts (a file of ``token principal`` lines, or a mapping).
    auth_tokens: str | Mapping[str, str] | None = None
    authenticate: Verifier | None = None
    #: Principals that may list and close every caller's sessions.
    admins: Sequence[str] = ()
    max_sessions_per_principal: int | None = None
    max_streams_per_connection: int = DEFAULT_MAX_STREAMS_PER_CONNECTION
    max_calls_per_stream: int = DEFAULT_MAX_CALLS_PER_STREAM
    #: With etcd: this agent's lease TTL (None: DEFAULT_LOST_AFTER).
    lost_after: float | None = None
    #: Serve Prometheus metrics on this port of ``host`` (0: a free one); None: off.
    metrics_port: int | None = None
    #: Durable sessions: kept in this store (``redis://HOST:PORT/DB``), they outlive this
    #: instance. None: sessions live in this process only.
    session_store: str | None = None
    #: Durable sessions idle this long leave memory (their state is in the store) and come
    #: back at their next call, on any replica. None: they stay until their TTL.
    hibernate_after: float | None = None
    #: At most this many sessions in memory: past it the least recently used durable ones
    #: hibernate; with none to hibernate, new sessions are refused (TOO_MANY_SESSIONS).
    max_live_sessions: int | None = None

    def __post_init__(self) -> None:
        if self.session_ttl <= 0:
            raise UsageError("session_ttl must be > 0 seconds")
        if self.max_sessions < 1:
            raise UsageError("max_sessions must be >= 1")
        if self.threads < 1:
            raise UsageError("threads must be >= 1 (plain def tools run in them)")
        if self.remembered_calls < 0 or self.remembered_bytes < 0:
            raise UsageError("remembered_calls and remembered_bytes must be >= 0")
        if self.max_sessions_per_principal is not None and self.max_sessions_per_principal < 1:
            raise UsageError("max_sessions_per_principal must be >= 1, or None")
        if self.max_streams_per_connection < 1 or self.max_calls_per_stream < 1:
            raise UsageError("max_streams_per_connection and max_calls_per_stream must be >= 1")
        if self.peers and self.registry:
            raise UsageError("give peers or a registry, not both")
        if isinstance(self.admins, str):
            raise UsageError("admins takes a list of principals")
        on_etcd = self.on_etcd  # a malformed etcd:// address is refused here
        if self.lost_after is not None and on_etcd is None:
            raise UsageError(
                "lost_after (--lost-after) is the etcd lease of an agent registered in etcd; "
                "a registry process has its own (sessionmesh registry --lost-after)"
            )
        if self.session_store == "":
            object.__setattr__(self, "session_store", None)
        if self.hibernate_after is not None:
            if self.hibernate_after <= 0:
                raise UsageError("hibernate_after must be > 0 seconds, or None")
            if self.session_store is None:
                raise UsageError(
                    "hibernate_after (--hibernate-after) needs a session store "
                    "(--session-store): only a durable session's state lives outside memory"
                )
        if self.max_live_sessions is not None and self.max_live_sessions < 1:
            raise UsageError("max_live_sessions must be >= 1, or None")

    @property
    def on_etcd(self) -> etcd.EtcdTarget | None:
        """The etcd cluster the agent registers in, when its registry is one."""
        try:
            return etcd.parse(self.registry) if self.registry else None
        except etcd.EtcdAddressError as exc:
            raise UsageError(str(exc)) from None

    @property
    def lease(self) -> float:
        """With etcd: the lease TTL."""
        return DEFAULT_LOST_AFTER if self.lost_after is None else self.lost_after

    def replace(self, **changes: Any) -> AgentSettings:
        check_names(changes)
        return dataclasses.replace(self, **changes)


NAMES = frozenset(f.name for f in dataclasses.fields(AgentSettings))


def check_names(settings: Mapping[str, Any], what: str = "agent setting") -> None:
    unknown = set(settings) - NAMES
    if unknown:
        raise UsageError(
            f"unknown {what}(s): {', '.join(sorted(unknown))} (known: {', '.join(sorted(NAMES))})"
        )


def auth_tokens_from(args: argparse.Namespace) -> str | None:
    """--auth-tokens, else $SESSIONMESH_AUTH_TOKENS."""
    tokens: str | None = getattr(args, "auth_tokens", None) or os.environ.get(AUTH_TOKENS_ENV)
    return tokens or None


def _peers(items: Sequence[str]) -> dict[str, str]:
    peers: dict[str, str] = {}
    for item in items:
        capability, sep, address = item.partition("=")
        if not sep or not capability or not address:
            raise UsageError(f"--peer takes CAPABILITY=HOST:PORT, got {item!r}")
        peers[capability] = address
    return peers


def from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings ``sessionmesh serve``'s flags give, each flag falling back to its
    environment variable; what is not given is left to the file's ``@mesh.agent`` or the
    default."""
    given = {
        "name": args.name,
        "host": args.host,
        "port": args.port,
        "debug": args.debug or None,
        "session_ttl": args.session_ttl,
        "peers": _peers(args.peer) or None,
        "registry": registry_address(args, required=False),
        "drain_timeout": args.drain_timeout,
        "tls": tls_from(args),
        "insecure": args.insecure or None,
        "token": token_from(args),
        "auth_tokens": auth_tokens_from(args),
        "admins": tuple(args.admin) or None,
        "max_sessions_per_principal": args.max_sessions_per_principal,
        "lost_after": args.lost_after,
        "advertise": args.advertise,
        "metrics_port": args.metrics_port,
        "session_store": args.session_store or os.environ.get(SESSION_STORE_ENV) or None,
        "hibernate_after": args.hibernate_after,
        "max_live_sessions": args.max_live_sessions,
    }
    return {k: v for k, v in given.items() if v is not None}
