"""``sessionmesh sessions``: the open sessions of each instance (ids shortened), and
``sessionmesh sessions move``, which moves sessions between live replicas of an agent."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import Any

from sessionmesh.client._client import MeshClient
from sessionmesh.core.cli import say
from sessionmesh.errors import RemoteError, UsageError


def sessions_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("words", nargs="*", metavar="AGENT", help="an agent name or instance id")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--to", default=None, metavar="INSTANCE", help="move: the replica that takes them"
    )
    p.add_argument(
        "--count",
        type=int,
        default=None,
        metavar="N",
        help="move: this many (default: its fair share)",
    )
    p.add_argument("--session", default=None, metavar="ID", help="move: this one session")


async def sessions_command(
    args: argparse.Namespace, connect: Callable[[argparse.Namespace], Awaitable[MeshClient]]
) -> int:
    words = list(args.words)
    moving = bool(words) and words[0] == "move"
    if moving:
        words.pop(0)
    if len(words) > 1 or (moving and not words):
        raise UsageError(
            "usage: sessionmesh sessions [AGENT] | sessionmesh sessions move AGENT --to INSTANCE "
            "[--count N | --session ID]"
        )
    args.agent = words[0] if words else None
    if not moving and (args.to or args.count is not None or args.session):
        raise UsageError("--to, --count and --session are for `sessionmesh sessions move`")
    if moving and not args.to:
        raise UsageError("sessions move needs --to INSTANCE (see `sessionmesh list`)")
    if args.count is not None and args.session:
        raise UsageError("give --count or --session, not both")
    client = await connect(args)
    try:
        if moving:
            return await _move(args, client)
        return await _list_sessions(args, client)
    finally:
        await client.aclose()


async def _move(args: argparse.Namespace, client: MeshClient) -> int:
    moved = await client.move_sessions(args.agent, args.to, count=args.count, session=args.session)
    if args.json:
        print(json.dumps({"moved": moved.moved, "stayed": list(moved.stayed)}))
    else:
        print(f"moved {moved.moved} session(s) of {args.agent} to {args.to}")
        for why in moved.stayed:
            say(f"stayed: {why}")
    return 0 if moved.moved or not moved.stayed else 1


async def _list_sessions(args: argparse.Namespace, client: MeshClient) -> int:
    instances = [
        i
        for i in client.instances()
        if not args.agent or args.agent in (i.agent_name, i.instance_id)
    ]
    if not instances:
        if args.json:
            print("[]")
        else:
            print("no such agent registered" if args.agent else "no agents registered")
        return 0 if not args.agent else 1
    rows: list[dict[str, Any]] = []
    for instance in sorted(instances, key=lambda i: (i.agent_name, i.endpoint)):
        where = f"{instance.agent_name} {instance.instance_id} at {instance.endpoint}"
        row: dict[str, Any] = {
            "agent": instance.agent_name,
            "instance": instance.instance_id,
            "endpoint": instance.endpoint,
        }
        rows.append(row)
        async with client.agent(instance) as agent:
            try:
                listing = await agent.list_sessions()
            except RemoteError as exc:
                row["unreachable"] = exc.code.name
                if not args.json:
                    print(f"{where}: unreachable ({exc.code.name})")
                continue
        row["sessions"] = [
            {
                "short_id": s.short_id,
                "busy": s.active,
                "idle_s": round(s.idle.ToTimedelta().total_seconds(), 3),
                "expires_after_idle_s": s.idle_timeout.ToTimedelta().total_seconds(),
                "waiting": s.waiting,
            }
            for s in listing.sessions
        ]
        if args.json:
            continue
        print(f"{where}: {len(listing.sessions)} open session(s)")
        for s in listing.sessions:
            state = "busy" if s.active else f"idle {s.idle.ToTimedelta().total_seconds():.1f}s"
            ttl = s.idle_timeout.ToTimedelta().total_seconds()
            queued = f", {s.waiting} waiting" if s.waiting else ""
            print(f"  {s.short_id}…  {state} (expires after {ttl:.0f}s idle){queued}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0
