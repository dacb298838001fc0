"""Moving sessions between live replicas of one agent, on demand (``sessionmesh sessions
move``): the client asks the replicas that hold sessions to hand them to the target."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from sessionmesh.errors import UsageError
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.v1 import session_service_pb2 as pb
from sessionmesh.wire.names import owner_of, short, well_formed

if TYPE_CHECKING:
    from sessionmesh.client._client import MeshClient

#: How long one replica may take to hand its sessions over (each waits for its running call).
_MOVE_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class Moved:
    """What a move did: how many sessions moved, and why others stayed (ids shortened)."""

    moved: int
    stayed: tuple[str, ...] = ()


async def move_sessions(
    client: MeshClient,
    agent: str,
    to: str,
    *,
    count: int | None = None,
    session: str | None = None,
) -> Moved:
    replicas = [i for i in client.instances() if i.agent_name == agent]
    target = next((i for i in replicas if i.instance_id == to), None)
    if target is None or target.state != rpb.INSTANCE_STATE_SERVING:
        listed = ", ".join(sorted(i.instance_id for i in replicas)) or "none"
        raise UsageError(
            f"instance {to!r} is not a serving replica of agent {agent!r} "
            f"(the registry lists: {listed})"
        )
    sources = [i for i in replicas if i.instance_id != to]
    if session is not None:
        if not well_formed(session):
            raise UsageError(f"{short(session)}... is not a session id")
        # Its first owner first; it may have moved since, so the others after.
        sources.sort(key=lambda i: i.instance_id != owner_of(session))
        wanted = 1
    else:
        if count is None:  # the target's fair share of what the replicas hold
            total = sum(i.open_sessions for i in replicas)
            count = max(0, total // len(replicas) - target.open_sessions)
        if count < 0:
            raise UsageError("--count must be 0 or more")
        wanted = count
        sources.sort(key=lambda i: -i.open_sessions)  # the fullest gives first
    moved, stayed = 0, list[str]()
    for source in sources:
        if moved >= wanted:
            break
        request = pb.MoveSessionsRequest(to_instance=to, session_id=session or "")
        if session is None:
            request.count = wanted - moved
        answer = await client.endpoint(source).move_sessions(request, _MOVE_TIMEOUT)
        moved += answer.moved
        stayed += answer.stayed
    return Moved(moved, tuple(stayed))
