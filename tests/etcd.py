"""A real etcd cluster for the tests: members on loopback ports, data in a temporary
directory, always stopped. etcd comes from the distribution (`etcd-server`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from aetcd import rpc

from tests.procs import free_port, system_tool


def etcd_binary() -> str:
    return system_tool("etcd", "etcd-server")


class Cluster:
    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.names = [f"m{i}" for i in range(size)]
        self.client_ports = {n: free_port() for n in self.names}
        self.peer_ports = {n: free_port() for n in self.names}
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._logs: dict[str, int] = {}

    @property
    def url(self) -> str:
        """The --registry value for this cluster."""
        members = ",".join(f"127.0.0.1:{self.client_ports[n]}" for n in self.names)
        return f"etcd://{members}/sessionmesh-test"

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.client_ports[name]}"

    async def start(self, name: str, *, new: bool = True) -> None:
        peers = ",".join(f"{n}=http://127.0.0.1:{self.peer_ports[n]}" for n in self.names)
        client = f"http://{self.address(name)}"
        peer = f"http://127.0.0.1:{self.peer_ports[name]}"
        log = os.open(self.root / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._logs[name] = log
        self.procs[name] = await asyncio.create_subprocess_exec(
            etcd_binary(),
            *["--name", name, "--data-dir", str(self.root / name)],
            *["--listen-client-urls", client, "--advertise-client-urls", client],
            *["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer],
            *["--initial-cluster", peers, "--initial-cluster-token", "sessionmesh-test"],
            *["--initial-cluster-state", "new" if new else "existing"],
            # Fast elections: a killed leader is replaced in about a second.
            *["--heartbeat-interval", "50", "--election-timeout", "500"],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    async def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
        os.close(self._logs.pop(name))

    async def status(self, name: str, within: float = 1.0) -> tuple[int, int] | None:
        """(this member's id, the leader's id), or None if it does not answer."""
        async with grpc.aio.insecure_channel(self.address(name)) as channel:
            try:
                got = await rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=within)
            except grpc.aio.AioRpcError:
                return None
        return int(got.header.member_id), int(got.leader)

    async def leader(self, within: float = 20.0) -> str:
        """The member that leads now (waiting for an election, bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            ids: dict[int, str] = {}
            leader_id = 0
            for name in self.procs:
                got = await self.status(name)
                if got is not None:
                    ids[got[0]] = name
                    leader_id = got[1] or leader_id
            if leader_id in ids:
                return ids[leader_id]
            if loop.time() > deadline:
                raise AssertionError(f"no etcd leader within {within} s\n{self.describe()}")
            await asyncio.sleep(0.05)

    def describe(self) -> str:
        """Each member's state and the end of its log: why a cluster did not come up."""
        lines = []
        for name in self.names:
            proc = self.procs.get(name)
            state = "not running" if proc is None else f"exit code {proc.returncode}"
            log = self.root / f"{name}.log"
            tail = log.read_text(errors="replace").splitlines()[-8:] if log.exists() else []
            lines.append(f"{name} ({state}, client {self.address(name)}):")
            lines += [f"    {line[:300]}" for line in tail]
        return "\n".join(lines)

    async def stop(self) -> None:
        for name in list(self.procs):
            await self.kill(name)


@contextlib.asynccontextmanager
async def cluster(size: int = 3) -> AsyncIterator[Cluster]:
    with contextlib.ExitStack() as dirs:
        for attempt in (1, 2):
            root = dirs.enter_context(tempfile.TemporaryDirectory(prefix="sessionmesh-etcd-"))
            running = Cluster(Path(root), size)
            try:
                for name in running.names:
                    await running.start(name)
                await running.leader()
            except AssertionError as exc:
                await running.stop()
                if attempt == 2:
                    raise
                # etcd's own bootstrap, not what the tests check: once more on fresh ports
                # (one taken between choosing and binding would do this), and say why.
                print(f"etcd cluster did not come up, starting a new one: {exc}")
                continue
            except BaseException:
                await running.stop()
                raise
            break
        try:
            yield running
        finally:
            await running.stop()
