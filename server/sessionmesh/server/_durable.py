"""Durable sessions: state saved before every answer, one owner at a time, exactly once.

A durable session's calls run on one owner, in order, like any other session's; after each
call its state (as JSON) and the call's outcome are written through to the session store in
one atomic step that checks the owner still holds the session's epoch. Another instance
takes a session over (``adopt``) by bumping that epoch: from then on the old owner's saves
are refused, so a paused or partitioned owner can never answer with a stale success.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from typing import TYPE_CHECKING, Any, NamedTuple

from google.protobuf.struct_pb2 import Value

from sessionmesh.core._tasks import Tasks
from sessionmesh.server._errors import Fail, elsewhere, not_json, session_not_found
from sessionmesh.server._records import Save, Saved, SessionRecords, StoreUnavailable
from sessionmesh.wire.codec import NotJsonLike, set_value
from sessionmesh.wire.names import short
from sessionmesh.wire.reasons import Reason
from sessionmesh.wire.status import Code

if TYPE_CHECKING:
    from collections.abc import Callable

    from sessionmesh.server._session import Session, Turn
    from sessionmesh.server._sessions import SessionStore
    from sessionmesh.server._tool import BoundTool

log = logging.getLogger("sessionmesh.durable")

#: Outcomes of a session's most recent calls kept with it (retries come right after a
#: failure, and calls of a session run in order, so the last few are what matters).
KEPT_CALLS = 64


class Durable:
    """What a durable session carries besides its state: its fence and what was saved."""

    __slots__ = ("calls", "epoch", "failure", "new", "outcomes", "saved", "seq")

    def __init__(self, epoch: int = 1, *, new: bool = True) -> None:
        self.epoch = epoch
        #: Not saved yet: the first save creates the record.
        self.new = new
        #: The state as last saved (JSON): what the session goes back to if a save fails.
        self.saved = "{}"
        #: Call ids whose outcomes are kept, oldest first; each outcome is saved after its
        #: number in this order (hex, then b":"), so an adopter knows the order too.
        self.calls: collections.deque[str] = collections.deque()
        self.outcomes: dict[str, bytes] = {}
        self.seq = 0
        #: Why this copy ended without the session closing (moved, gone, store down): what
        #: the calls still in its line are told.
        self.failure: Fail | None = None


class Replayed(NamedTuple):
    """A saved result, sent again as it was saved."""

    value: Value


def store_unavailable(session_id: str, exc: BaseException | str) -> Fail:
    return Fail(
        Reason.SESSION_STORE_UNAVAILABLE,
        f"session {short(session_id)}...: its session store did not answer ({exc}); nothing "
        "was saved and the session keeps its last saved state. Retry the call.",
        {"session_id": session_id},
    )


def gone(session: Session) -> Fail:
    """What a call finds when its session ended while it waited in line."""
    if session.failure is not None:
        return session.failure  # type: ignore[no-any-return]
    durable: Durable | None = session.durable
    if durable is not None and durable.failure is not None:
        return durable.failure
    return session_not_found(session.id)


class Durability:
    """The durable sessions of one agent instance and the store they are kept in."""

    def __init__(
        self,
        records: SessionRecords,
        store: SessionStore,
        locate: Callable[[str], str | None] | None = None,
    ) -> None:
        self.records = records
        self.store = store
        self.instance_id = store.instance_id
        self.locate = locate
        #: Adoptions loading their sessions from the store (each in the session's first turn).
        self._adopting = Tasks("session adoptions", log)
        store.durable_closing = self._closing
        #: Sessions adopted from the store, and copies found stale (fenced), are counted
        #: with the store's session events (metrics read them there).
        store.counters.update(adopted=0, fenced=0)
        #: Calls saved, and calls answered from a saved outcome.
        self.calls = {"saved": 0, "replayed": 0}

    # -- adoption ---------------------------------------------------------------------------

    def adopt(self, session_id: str, principal: str) -> Session:
        """Take over a durable session this instance has no copy of; never awaits. Its first
        turn loads it from the store: calls queue behind that in arrival order, and find
        it gone (as a forged id would be) if the store has no such session for them."""
        session = self.store.adopt(session_id, principal)
        session.durable = Durable(0, new=False)
        self._adopting.start(self._load(session, session.turn()))
        return session

    async def _load(self, session: Session, turn: Turn) -> None:
        durable: Durable = session.durable
        async with turn:
            try:
                record = await self.records.adopt(session.id, self.instance_id, session.principal)
            except StoreUnavailable as exc:
                durable.failure = store_unavailable(session.id, exc)
                self.store.release(session.id, "its store did not answer")
                return
            if record is None:
                durable.failure = session_not_found(session.id)
                self.store.release(session.id, "not in the store")
                return
            durable.epoch = record.epoch
            durable.saved = record.state
            order = {c: int(o.partition(b":")[0], 16) for c, o in record.outcomes.items()}
            durable.calls = collections.deque(sorted(order, key=order.__getitem__))
            durable.outcomes = record.outcomes
            durable.seq = max(order.values(), default=0)
            session.ttl = record.ttl
            if record.state != "{}":
                session.state.update(json.loads(record.state))
        self.store.counters["adopted"] += 1
        log.info("session %s adopted (epoch %d)", session.short_id, durable.epoch)

    # -- write-through ----------------------------------------------------------------------

    def replay(self, session: Session, call_id: str) -> Replayed | None:
        """The saved outcome of ``call_id`` in this session (a retry after a takeover), or
        None if it never ran; a saved failure is raised."""
        saved = session.durable.outcomes.get(call_id)
        if saved is None:
            return None
        self.calls["replayed"] += 1
        saved = saved.partition(b":")[2]
        if saved[:1] == b"f":
            fields = json.loads(saved[1:])
            raise Fail(
                fields["reason"], fields["message"], fields["metadata"], code=Code[fields["code"]]
            )
        return Replayed(Value.FromString(saved[1:]))

    async def save(
        self,
        session: Session,
        call_id: str = "",
        outcome: Any = None,
        bound: BoundTool | None = None,
    ) -> None:
        """Write the session (and the outcome of ``call_id``) through to the store before
        the call is answered. A state with no JSON form, a store that does not answer or a
        copy another instance has taken over fails the call instead: never an answer for
        an update that was not saved."""
        durable: Durable = session.durable
        text = self._state_json(session)
        changed = text != durable.saved
        entry: tuple[str, bytes] | None = None
        forget: str | None = None
        if call_id:
            durable.seq += 1
            entry = (call_id, b"%x:" % durable.seq + _encode(outcome, bound))
            durable.calls.append(call_id)
            durable.outcomes[call_id] = entry[1]
            if len(durable.calls) > KEPT_CALLS:
                forget = durable.calls.popleft()
                del durable.outcomes[forget]
        save = Save(
            self.instance_id,
            durable.epoch,
            durable.new,
            session.principal,
            session.ttl,
            text if changed or durable.new else None,
            entry,
            forget,
        )
        try:
            result = await self.records.save(session.id, save)
        except StoreUnavailable as exc:
            if entry is not None:  # not saved: a retry must run it again
                durable.calls.pop()
                del durable.outcomes[call_id]
            self.revert(session)
            raise store_unavailable(session.id, exc) from None
        except asyncio.CancelledError:
            # Saved or not, nobody can tell: this copy lets go, and the next call adopts
            # the session afresh from the store, whichever it holds.
            durable.failure = store_unavailable(session.id, "a save was cut off")
            self.store.release(session.id, "its save was cut off")
            raise
        self.calls["saved"] += 1
        if result.saved is Saved.OK:
            durable.saved = text
            durable.new = False
            return
        if result.saved is Saved.FENCED:
            self.store.counters["fenced"] += 1
            durable.failure = self._moved(session.id, result.owner)
            why = f"instance {result.owner} took it over"
        else:
            durable.failure = session_not_found(session.id)
            why = "closed or expired on another instance"
        self.store.release(session.id, why)
        raise durable.failure

    def _moved(self, session_id: str, owner: str) -> Fail:
        endpoint = (self.locate(owner) if self.locate is not None else None) or ""
        return elsewhere(
            session_id,
            owner,
            endpoint,
            "was taken over by instance",
            "this copy was stale and did nothing that counts: send the call there",
        )

    def _state_json(self, session: Session) -> str:
        """The state as JSON; one with no JSON form (or one JSON would change, such as a
        tuple or an int key) is refused, naming the key, and the last saved state comes back."""
        state = session.state
        try:
            text = json.dumps(state, separators=(",", ":"), allow_nan=False)
            if text == session.durable.saved or json.loads(text) == state:
                return text
        except (TypeError, ValueError):
            pass
        key, why = first_unsaveable(state)
        self.revert(session)
        raise Fail(
            Reason.STATE_NOT_JSON,
            f"session.state[{key!r}] {why}: a durable session's state must be JSON (dict "
            "with str keys, list, str, int, float, bool, None). The call is refused and the "
            "session keeps its last saved state.",
            {"session_id": session.id, "key": str(key)},
        )

    def revert(self, session: Session) -> None:
        """Put the session back to its state as last saved."""
        state = session.state
        state.clear()
        state.update(json.loads(session.durable.saved))

    async def _closing(self, session: Session) -> bool:
        durable: Durable = session.durable
        if durable.new:
            return True  # never saved: nothing to remove
        try:
            if durable.epoch == 0:  # closed while being adopted: not ours yet, closed anyway
                await self.records.delete_any(session.id, session.principal)
                return True
            deleted = await self.records.delete(session.id, self.instance_id, durable.epoch)
        except StoreUnavailable as exc:
            log.warning(
                "session %s: could not remove it from its store (%s); it expires there "
                "after its idle TTL",
                session.short_id,
                exc,
            )
            return True
        return deleted is not Saved.FENCED

    async def close_elsewhere(self, session_id: str, principal: str) -> bool:
        """CloseSession for a durable session this instance has no copy of."""
        try:
            return await self.records.delete_any(session_id, principal)
        except StoreUnavailable as exc:
            raise store_unavailable(session_id, exc) from None

    async def stop(self) -> None:
        await self._adopting.aclose()
        await self.records.aclose()


def _encode(outcome: Any, bound: BoundTool | None) -> bytes:
    """A call's outcome as kept in the store: b"v" + a Value, or b"f" + the failure."""
    if isinstance(outcome, Fail):
        return (
            b"f"
            + json.dumps(
                {
                    "code": outcome.code.name,
                    "reason": outcome.reason,
                    "message": outcome.message,
                    "metadata": outcome.metadata,
                }
            ).encode()
        )
    value = Value()
    if isinstance(outcome, Replayed):
        return b"v" + outcome.value.SerializeToString()
    try:
        if bound is not None and bound.result is not None:
            outcome = bound.result.jsonable(outcome)
        set_value(value, outcome)
    except NotJsonLike as exc:  # the answer fails the same way as it is written
        return _encode(not_json(bound.spec.name if bound else "?", "returned", exc), None)
    return b"v" + value.SerializeToString()


def first_unsaveable(state: dict[Any, Any]) -> tuple[Any, str]:
    for key, value in state.items():
        if not isinstance(key, str):
            return key, f"has a key of type {type(key).__name__}"
        try:
            if json.loads(json.dumps(value, allow_nan=False)) == value:
                continue
            return key, f"holds a {type(value).__name__} that JSON would change"
        except (TypeError, ValueError) as exc:
            return key, f"has no JSON form ({exc})"
    return "?", "has no JSON form"
