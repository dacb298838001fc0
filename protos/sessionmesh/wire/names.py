"""Rules about names and ids that every side applies the same way."""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable


class Named(Protocol):
    """A tool as declared (ToolSpec) or as described on the wire (``pb.Tool``)."""

    @property
    def name(self) -> str: ...
    @property
    def capability(self) -> str: ...


def names(tool: Named) -> tuple[str, str]:
    """The names a tool answers to: its function name and its capability (often the same)."""
    return tool.name, tool.capability


def answers_to(tool: Named, name: str) -> bool:
    """Whether ``name`` calls ``tool``."""
    return name in names(tool)


#: How a durable session's id ends: any side can tell that it may move to another owner.
DURABLE_SUFFIX = ".d"


def new_session_id(instance_id: str, *, durable: bool = False) -> str:
    """The owner's instance id leads, so any instance can tell who owns a session; 128
    random bits after it make the id unguessable. A durable session's id ends in ``.d``:
    it outlives that owner, and the instance named in it is only where it began."""
    return f"{instance_id}.{secrets.token_urlsafe(16)}{DURABLE_SUFFIX if durable else ''}"


#: What every session id looks like (see new_session_id).
_WELL_FORMED = re.compile(r"[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{22}(?:\.d)?")

#: How a person is told what a session id looks like.
SESSION_ID_SHAPE = (
    "a session id is '<instance>.<22 characters>' (from CreateSession, or the "
    "x-session-id header of the call that opened it)"
)


def well_formed(session_id: str) -> bool:
    """Whether ``session_id`` has the shape of a session id (it may still name none)."""
    return _WELL_FORMED.fullmatch(session_id) is not None


def owner_of(session_id: str) -> str:
    """The instance id of the session's owner (for a durable session: its first owner)."""
    return session_id.partition(".")[0]


def is_durable(session_id: str) -> bool:
    """Whether the session is kept in a session store, and so survives its owner."""
    return session_id.endswith(DURABLE_SUFFIX)


def successors(session_id: str, instance_ids: Iterable[str]) -> list[str]:
    """Where a session goes when its owner hands it on, best first: the instances ranked by
    a hash of the session id and the instance id (rendezvous hashing). A draining owner
    hands each session to the first live replica in this order, and a client that finds the
    owner gone looks for the session in the same order: one try, nearly always."""
    return sorted(
        instance_ids,
        key=lambda i: hashlib.blake2b(f"{session_id}/{i}".encode(), digest_size=8).digest(),
        reverse=True,
    )


def short(session_id: str) -> str:
    """A session id shortened for logs and messages: enough to tell sessions apart, useless
    to forge one. Session ids are secrets; nothing else may print them."""
    return session_id[:14]


#: A session id anywhere in a text: an instance id, a dot, 22 url-safe characters.
_SESSION_ID = re.compile(r"\b[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{22}(?:\.d)?")


def redact(text: str) -> str:
    """``text`` with every session id in it shortened (for logs written by code that is not
    ours, such as grpc's, which quotes a malformed header it received)."""
    return _SESSION_ID.sub(lambda m: short(m.group()) + "...", text)
