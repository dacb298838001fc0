"""The mesh on etcd, read straight from the cluster (the key layout: ``wire/etcd.py``).

A client reads the prefix once, then watches it from the revision after, and resumes from
the last revision it saw when the watch breaks: no change is missed or seen twice. It uses
the etcd v3 API's generated stubs that ``aetcd`` ships (the ``sessionmesh[etcd]`` extra);
the channel is ours (keepalive, TLS, failover between members).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from sessionmesh.client._status import from_rpc_error
from sessionmesh.core._credentials import Credentials
from sessionmesh.errors import AgentUnavailable, UsageError
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.wire import etcd
from sessionmesh.wire.etcd import EtcdTarget, prefix_end

log = logging.getLogger("sessionmesh.etcd")

Change = rpb.WatchResponse.Change


def parse(url: str) -> EtcdTarget | None:
    """``wire.etcd.parse``, its refusals as UsageError."""
    try:
        return etcd.parse(url)
    except etcd.EtcdAddressError as exc:
        raise UsageError(str(exc)) from None


class EtcdSource:
    """The instances under the prefix, as the registry's Watch would send them: the
    snapshot, ``snapshot_done``, then changes. While etcd is unreachable it keeps trying
    and resumes where it stopped (the caller keeps its view meanwhile); only a compacted
    revision ends it (the caller then starts again with a new snapshot)."""

    def __init__(self, target: EtcdTarget, credentials: Credentials) -> None:
        self.target = target
        self.address = target.url
        try:
            self._api = etcd.api()
        except etcd.EtcdAddressError as exc:
            raise UsageError(str(exc)) from None
        self._channel = credentials.etcd_channel(target)

    async def watch(self) -> AsyncIterator[rpb.WatchResponse]:
        api = self._api
        prefix = self.target.instances
        try:
            snapshot = await api.KVStub(self._channel).Range(
                api.RangeRequest(key=prefix, range_end=prefix_end(prefix)), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            raise AgentUnavailable(
                f"etcd at {self.target.url} is unreachable ({exc.code().name}: {exc.details()})",
                code=from_rpc_error(exc).code,
            ) from exc
        for kv in snapshot.kvs:
            yield rpb.WatchResponse(change=Change.CHANGE_ADDED, instance=_instance(kv.value))
        yield rpb.WatchResponse(snapshot_done=True)
        revision = int(snapshot.header.revision)
        backoff = 0.05
        while True:
            try:
                async for event, seen in self._changes(prefix, revision + 1):
                    revision = max(revision, seen)
                    backoff = 0.05
                    if event is not None:
                        yield event
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                why = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "closed"
                log.info("etcd watch broke (%s); resuming after revision %d", why, revision)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _changes(
        self, prefix: bytes, start: int
    ) -> AsyncIterator[tuple[rpb.WatchResponse | None, int]]:
        """(a change or None, the revision it brings us to)."""
        api = self._api
        create = api.WatchCreateRequest(
            key=prefix, range_end=prefix_end(prefix), start_revision=start, progress_notify=True
        )
        # Written, not given as a request iterator: our side stays open as long as it runs.
        call = api.WatchStub(self._channel).Watch()
        try:
            await call.write(api.WatchRequest(create_request=create))
            while (response := await call.read()) is not grpc.aio.EOF:
                if response.compact_revision:
                    raise AgentUnavailable(
                        f"etcd compacted its history past revision {start}: reading it anew"
                    )
                if response.canceled:
                    raise AgentUnavailable(f"etcd ended the watch: {response.cancel_reason}")
                if not response.events:
                    yield None, int(response.header.revision) if not response.created else 0
                    continue
                for event in response.events:
                    kv = event.kv
                    if event.type == api.Event.DELETE:
                        iid = etcd.instance_key_id(self.target, kv.key)
                        change = rpb.WatchResponse(
                            change=Change.CHANGE_REMOVED, instance=rpb.Instance(instance_id=iid)
                        )
                    else:
                        added = kv.create_revision == kv.mod_revision
                        change = rpb.WatchResponse(
                            change=Change.CHANGE_ADDED if added else Change.CHANGE_UPDATED,
                            instance=_instance(kv.value),
                        )
                    yield change, int(kv.mod_revision)
        finally:
            call.cancel()

    async def aclose(self) -> None:
        await self._channel.close()


def _instance(value: bytes) -> rpb.Instance:
    instance = rpb.Instance()
    instance.ParseFromString(value)
    return instance
