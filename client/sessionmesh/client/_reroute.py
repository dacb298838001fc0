"""When a call goes again, elsewhere: the rules a proxy follows after a failed attempt (a
redirect to where its session moved, a replica that does not hold the session it looks
for, an owner that stopped before it read the call), and how long it waits to retry."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from sessionmesh.client._exchange import UNDELIVERED
from sessionmesh.errors import AgentUnavailable, RemoteError, SessionElsewhere, SessionNotFound

if TYPE_CHECKING:
    from sessionmesh.client._transport import Endpoint, Transport

#: How many times one call follows a session to a new owner.
MAX_HOPS = 3
#: How many replicas one call asks for a session whose owner left.
MAX_SEEKS = 16
#: The longest wait between two retries of a call.
MAX_RETRY_DELAY = 10.0


class Rerouted(Exception):
    """The call did not run (or ran and was saved) and goes again, elsewhere: to the owner
    a redirect names, or (``seeking``) to the next replica that may hold the session."""

    def __init__(self, error: BaseException, *, seeking: bool = False) -> None:
        self.error = error
        self.seeking = seeking


def backoff(base: float, attempt: int) -> float:
    """The wait before retry ``attempt`` (1, 2, ...): ``base`` doubling each time, capped at
    MAX_RETRY_DELAY, with full jitter so that callers failing together do not retry in
    step."""
    return random.uniform(0, min(MAX_RETRY_DELAY, base * 2 ** (attempt - 1)))


def seek_after(
    transport: Transport, session_id: str, endpoint: Endpoint, error: AgentUnavailable
) -> None:
    """An in-memory session's owner stopped before it read the call: it may have handed
    the session on (it drains). Raises Rerouted to look for it on the other replicas."""
    if error.metadata.get(UNDELIVERED) and transport.seek(session_id, endpoint.instance_id):
        raise Rerouted(error, seeking=True) from None


def follow(transport: Transport, session_id: str, endpoint: Endpoint, error: RemoteError) -> None:
    """An answer refused the call without running it: raises Rerouted when it goes on
    elsewhere (where the session moved, or the next replica that may hold it)."""
    if isinstance(error, SessionElsewhere):
        owner = error.metadata.get("owner_instance", "")
        if owner in (transport.seeking.get(session_id) or ()):
            transport.not_here(session_id, endpoint.instance_id)  # back where it looked
        else:
            transport.moved(session_id, owner)
        if transport.owner(session_id) is not endpoint:
            raise Rerouted(error, seeking=session_id in transport.seeking)
    elif isinstance(error, SessionNotFound) and transport.not_here(
        session_id, endpoint.instance_id
    ):
        raise Rerouted(error, seeking=True)  # not on this replica: the next one
