"""What a process's clients did on their own, counted where it happens (rare events, never
per call): retries of calls that could not reach their agent, failovers to another
instance, auto sessions lost. An agent's metrics read them when scraped
(``sessionmesh_client_events_total``): its injected proxies are clients too."""

from __future__ import annotations

import collections

#: event -> how many so far, in this process.
client_events: collections.Counter[str] = collections.Counter()

RETRY = "retry"
FAILOVER = "failover"
SESSION_LOST = "session_lost"
