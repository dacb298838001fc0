"""TLS, mutual TLS, principals and what they may do: with real certificates (throwaway CAs),
real servers, real handshakes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from sessionmesh import mesh
from sessionmesh.core.cli import REGISTRY_ENV
from sessionmesh.errors import (
    AgentUnavailable,
    Code,
    InvalidArguments,
    PermissionDenied,
    SessionElsewhere,
    SessionNotFound,
    TooManySessions,
    Unauthenticated,
    UsageError,
)
from sessionmesh.server import Peer
from sessionmesh.server._errors import Fail
from sessionmesh.server._security import is_loopback
from sessionmesh.testing import eventually
from sessionmesh.v1 import registry_service_pb2 as rpb
from sessionmesh.v1 import registry_service_pb2_grpc as rpb_grpc
from sessionmesh.v1 import session_service_pb2 as pb
from tests.pki import Pki
from tests.procs import CLI, ROOT, process
from tests.tools import echo, increment

pytestmark = pytest.mark.anyio

ALICE, BOB = "alice.example.org", "bob.example.org"
TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef"}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@mesh.tool(allow=[ALICE])
async def alice_only() -> str:
    return "for alice"


async def started(*tools: Any, **settings: Any) -> mesh.Agent:
    agent = mesh.Agent(tools, **settings)
    await agent.start()
    return agent


@pytest.fixture
async def mtls_agent(pki: Pki) -> AsyncIterator[mesh.Agent]:
    agent = await started(increment, echo, alice_only, tls=pki.server(), admins=["admin"])
    yield agent
    await agent.stop(grace=0)


# -- transport security -----------------------------------------------------------------------


async def test_a_tls_agent_serves_verified_clients_and_refuses_plaintext(pki: Pki) -> None:
    agent = await started(echo, tls=pki.server(client_ca=False))
    try:
        async with mesh.connect(agent.address, tls=mesh.TLS(ca=pki.ca_file)) as client:
            assert await client.proxy("echo")(value="over tls") == "over tls"
        async with mesh.connect(agent.address) as plaintext:
            with pytest.raises(AgentUnavailable):
                await plaintext.proxy("echo", timeout=5)(value="x")
    finally:
        await agent.stop(grace=0)


async def test_a_server_certificate_from_another_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other")
    other.root.mkdir()
    agent = await started(echo, tls=other.server(client_ca=False))
    try:
        async with mesh.connect(agent.address, tls=mesh.TLS(ca=pki.ca_file)) as client:
            with pytest.raises(AgentUnavailable):
                await client.proxy("echo", timeout=5)(value="x")
    finally:
        await agent.stop(grace=0)


async def test_mutual_tls_refuses_clients_without_a_good_certificate(
    pki: Pki, mtls_agent: mesh.Agent, tmp_path: Path
) -> None:
    other = Pki(tmp_path / "other")
    other.root.mkdir()
    cert, key = pki.issue("expired", "old.example.org", expired=True)
    stranger_cert, stranger_key = other.issue("stranger", "alice.example.org")
    refused = {
        "no client certificate": mesh.TLS(ca=pki.ca_file),
        "a certificate from another CA": mesh.TLS(
            cert=stranger_cert, key=stranger_key, ca=pki.ca_file
        ),
        "an expired certificate": mesh.TLS(cert=cert, key=key, ca=pki.ca_file),
    }
    for what, tls in refused.items():
        async with mesh.connect(mtls_agent.address, tls=tls) as client:
            with pytest.raises(AgentUnavailable):
                await client.proxy("echo", timeout=5)(value=what)
    async with mesh.connect(mtls_agent.address, tls=pki.client(ALICE)) as client:
        assert await client.proxy("echo")(value="good") == "good"


def test_plaintext_is_refused_where_other_machines_can_reach_it() -> None:
    with pytest.raises(UsageError, match=r"0\.0\.0\.0 can be reached.*--tls-cert.*--insecure"):
        asyncio.run(mesh.Agent([echo], host="0.0.0.0").start())  # refused unbound
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.3") and is_loopback("::1")
    assert is_loopback("localhost") and not is_loopback("0.0.0.0")
    assert not is_loopback("10.1.2.3") and not is_loopback("example.org")


def test_tls_settings_that_cannot_work_are_refused_up_front(pki: Pki) -> None:
    with pytest.raises(UsageError, match="--tls-cert and --tls-key"):
        mesh.TLS(cert=pki.ca_file)
    with pytest.raises(UsageError, match="no such file"):
        mesh.TLS(ca="/nonexistent/ca.pem")
    with pytest.raises(UsageError, match="only over TLS"):
        mesh.connect("127.0.0.1:1", token="secret-token-0123456789")
    with pytest.raises(UsageError, match=r"auth_tokens .* need TLS"):
        mesh.Agent([echo], auth_tokens=TOKENS)
    with pytest.raises(UsageError, match="alice_only have allow= lists"):
        mesh.Agent([alice_only])


# -- who is calling ---------------------------------------------------------------------------


async def test_sessions_belong_to_the_principal_that_opened_them(
    pki: Pki, mtls_agent: mesh.Agent
) -> None:
    address = mtls_agent.address
    async with (
        mesh.connect(address, tls=pki.client(ALICE)) as alice,
        mesh.connect(address, tls=pki.client(BOB)) as bob,
        mesh.connect(address, tls=pki.client("spiffe://example.org/ns/admin")) as spiffe,
    ):
        async with alice.proxy("session_counter", session_required=True) as mine:
            assert await mine(increment=5) == 5
            stolen = mine.session_id
            assert stolen is not None
            forged = mtls_agent.instance_id + ".AAAAAAAAAAAAAAAAAAAAAA"
            told = []
            for sid in (stolen, forged):
                with pytest.raises(SessionNotFound) as info:
                    await bob.proxy("session_counter").call_with_session(session_id=sid)
                told.append((info.value.code, info.value.reason, info.value.message))
            # Bob cannot tell the stolen id from a forged one: no oracle.
            same = told[1][2].replace(mesh.short_id(forged), mesh.short_id(stolen))
            assert told[0] == (told[1][0], told[1][1], same)
            assert [s.principal for s in mtls_agent.sessions.sessions()] == [ALICE]
            assert not await bob.proxy("session_counter").close_session(stolen)  # as for any id
            assert await mine(increment=1) == 6  # untouched by all of that
            assert len((await alice.list_sessions()).sessions) == 1
            assert len((await bob.list_sessions()).sessions) == 0
            assert len((await spiffe.list_sessions()).sessions) == 0  # not an admin
    # The URI SAN is the principal of a SPIFFE certificate.
    async with mesh.connect(address, tls=pki.client("spiffe://example.org/ns/admin")) as one:
        with pytest.raises(PermissionDenied, match=r"spiffe://example\.org/ns/admin may not"):
            await one.proxy("alice_only")()


async def test_tools_with_allow_lists_and_admins(pki: Pki, tmp_path: Path) -> None:
    agent = await started(increment, alice_only, tls=pki.server(), admins=["admin.example.org"])
    try:
        async with (
            mesh.connect(agent.address, tls=pki.client(ALICE)) as alice,
            mesh.connect(agent.address, tls=pki.client(BOB)) as bob,
            mesh.connect(agent.address, tls=pki.client("admin.example.org")) as admin,
        ):
            assert await alice.proxy("alice_only")() == "for alice"
            with pytest.raises(PermissionDenied, match=f"{BOB} may not call 'alice_only'") as info:
                await bob.proxy("alice_only")()
            assert info.value.reason == "PERMISSION_DENIED"
            assert info.value.code == Code.PERMISSION_DENIED
            async with alice.proxy("session_counter", session_required=True) as a:
                await a(increment=1)
                async with bob.proxy("session_counter", session_required=True) as b:
                    await b(increment=1)
                    assert len((await admin.list_sessions()).sessions) == 2
                    # Moving sessions (and handing them over) is for admins alone.
                    move = pb.MoveSessionsRequest(to_instance="elsewhere", count=1)
                    accept = pb.AcceptSessionRequest(session_id=b.session_id or "")
                    with pytest.raises(PermissionDenied, match="only the agent's admins"):
                        await bob._transport.pick().move_sessions(move, 5)
                    with pytest.raises(PermissionDenied, match="only the agent's admins"):
                        await bob._transport.pick().accept_session(accept, 5)
                    with pytest.raises(InvalidArguments, match="not a serving replica"):
                        await admin._transport.pick().move_sessions(move, 5)
    finally:
        await agent.stop(grace=0)


async def test_bearer_tokens_over_tls(pki: Pki, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# principal token\n" + "".join(f"{p} {t}\n" for p, t in TOKENS.items()))
    agent = await started(increment, tls=pki.server(client_ca=False), auth_tokens=str(tokens))
    ca = mesh.TLS(ca=pki.ca_file)
    try:
        async with mesh.connect(agent.address, tls=ca, token=TOKENS["alice"]) as alice:
            async with alice.proxy("session_counter", session_required=True) as counter:
                assert await counter(increment=2) == 2
                assert [s.principal for s in agent.sessions.sessions()] == ["alice"]
                async with mesh.connect(agent.address, tls=ca, token=TOKENS["bob"]) as bob:
                    with pytest.raises(SessionNotFound):
                        await bob.proxy("session_counter").call_with_session(
                            session_id=str(counter.session_id)
                        )
        for token in ("not-a-token-anybody-has", None):
            async with mesh.connect(agent.address, tls=ca, token=token) as stranger:
                with pytest.raises(Unauthenticated) as info:
                    await stranger.proxy("session_counter", session_required=True)(increment=1)
                assert info.value.reason == "UNAUTHENTICATED"
                with pytest.raises(Unauthenticated):
                    await stranger.list_tools()
    finally:
        await agent.stop(grace=0)


async def test_a_verifier_names_callers_and_may_refuse_them(pki: Pki) -> None:
    seen: list[Peer] = []

    async def verify(metadata: Mapping[str, str], peer: Peer) -> str | None:
        seen.append(peer)
        key = metadata.get("x-api-key", "")
        if key == "banned":
            raise PermissionError("this key was revoked on 2026-11-01")
        return {"k1": "service-one"}.get(key)

    agent = await started(echo, tls=pki.server(), authenticate=verify)
    try:
        async with grpc.aio.secure_channel(
            agent.address, _channel_credentials(pki.client(ALICE))
        ) as channel:
            call = channel.unary_unary(
                "/sessionmesh.v1.SessionService/Call",
                request_serializer=pb.CallRequest.SerializeToString,
                response_deserializer=pb.CallResponse.FromString,
            )
            request = pb.CallRequest(tool="echo")
            await call(request, metadata=(("x-api-key", "k1"),))
            for key, code, says in (
                ("banned", grpc.StatusCode.PERMISSION_DENIED, "revoked on 2026-11-01"),
                ("k2", grpc.StatusCode.UNAUTHENTICATED, "verifier did not accept"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(request, metadata=(("x-api-key", key),))
                assert info.value.code() == code
                assert says in str(info.value.details())
        assert seen[0].certificate == ALICE  # the verifier sees the certificate too
    finally:
        await agent.stop(grace=0)


async def test_one_caller_cannot_take_every_session(pki: Pki) -> None:
    agent = await started(increment, tls=pki.server(), max_sessions_per_principal=2)
    try:
        async with (
            mesh.connect(agent.address, tls=pki.client(ALICE)) as alice,
            mesh.connect(agent.address, tls=pki.client(BOB)) as bob,
        ):
            mine, theirs = alice.proxy("session_counter"), bob.proxy("session_counter")
            held = [await mine.create_session() for _ in range(2)]
            with pytest.raises(TooManySessions, match=r"alice\.example\.org has 2 open sessions"):
                await mine.create_session()
            assert await theirs.create_session()  # others still get theirs
            await mine.close_session(held[0])
            assert await mine.create_session()  # and a closed one frees a place
    finally:
        await agent.stop(grace=0)


# -- the registry -----------------------------------------------------------------------------


async def test_the_registry_knows_who_registers_what(pki: Pki, tmp_path: Path) -> None:
    registrants = tmp_path / "registrants"
    registrants.write_text(f"{ALICE} session_counter_agent  # alice runs the counter\n")
    async with mesh.Registry(tls=pki.server(), registrants=str(registrants)) as registry:
        # A stranger cannot advertise itself as the counter ...
        async with grpc.aio.secure_channel(
            registry.address, _channel_credentials(pki.client(BOB))
        ) as channel:
            stub = rpb_grpc.RegistryServiceStub(channel)
            call = stub.Register()
            instance = rpb.Instance(
                instance_id="b0b", agent_name="session_counter_agent", endpoint="127.0.0.1:1"
            )
            await call.write(rpb.RegisterRequest(instance=instance))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "may not register agent 'session_counter_agent'" in str(info.value.details())
        # ... and the one it names can, over mutual TLS, and be found and called.
        cert, key = pki.issue("alice-agent", "127.0.0.1", ALICE)
        tls = mesh.TLS(cert=cert, key=key, ca=pki.ca_file, client_ca=pki.ca_file)
        agent = await started(
            increment, name="session_counter_agent", tls=tls, registry=registry.address
        )
        try:
            async with mesh.connect(registry=registry.address, tls=pki.client(BOB)) as client:
                await eventually(lambda: len(client.instances()) == 1, what="the agent listed")
                async with client.proxy("session_counter", session_required=True) as counter:
                    assert await counter(increment=3) == 3
        finally:
            await agent.stop(grace=0)
        # Without a certificate, not even the list of instances.
        anonymous = mesh.connect(registry=registry.address, tls=mesh.TLS(ca=pki.ca_file))
        with pytest.raises(AgentUnavailable, match="no answer from the registry"):
            await anonymous.ready(within=1)
        await anonymous.aclose()


def _channel_credentials(tls: mesh.TLS) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(tls.read("ca"), tls.read("key"), tls.read("cert"))


# -- the command line, in real processes ------------------------------------------------------


async def test_run_and_the_cli_over_mutual_tls(pki: Pki) -> None:
    server = pki.server()
    flags = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    flags += ["--tls-ca", pki.ca_file, "--tls-client-ca", pki.ca_file]
    files = [str(ROOT / "examples/counter.py"), str(ROOT / "examples/consumer.py")]
    async with process("run", *files, "--registry-port", "0", *flags) as (_, ready):
        registry = str(ready["registry"])
        alice = pki.client(ALICE)
        as_alice = {**alice.env(), REGISTRY_ENV: registry}

        def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            clean = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONMESH_")}
            return subprocess.run(
                [*CLI, *args, "--wait", "3"],
                capture_output=True,
                text=True,
                timeout=60,
                env={**clean, **env},
            )

        # Consumer -> counter over mutual TLS, each with the certificate `run` handed it.
        called = await asyncio.to_thread(
            cli, "call", "auto_session_test", '{"test_rounds": 3}', env=as_alice
        )
        assert called.returncode == 0, called.stderr
        assert [r["response"]["count"] for r in json.loads(called.stdout)["results"]] == [1, 3, 6]
        listed = await asyncio.to_thread(cli, "list", "--json", env=as_alice)
        assert sorted(r["agent"] for r in json.loads(listed.stdout)) == ["consumer", "counter"]
        # Without a client certificate: refused, and told where to look.
        anonymous = await asyncio.to_thread(
            cli, "list", env={"SESSIONMESH_TLS_CA": pki.ca_file, REGISTRY_ENV: registry}
        )
        assert anonymous.returncode == 1
        assert "no answer from the registry" in anonymous.stderr
        plaintext = await asyncio.to_thread(cli, "list", env={REGISTRY_ENV: registry})
        assert plaintext.returncode == 1


async def test_a_registry_with_tokens_tells_a_caller_without_one_at_once(pki: Pki) -> None:
    ca = mesh.TLS(ca=pki.ca_file)
    async with mesh.Registry(tls=pki.server(client_ca=False), auth_tokens=TOKENS) as registry:
        with pytest.raises(Unauthenticated, match="requires to know its callers"):
            async with mesh.connect(registry=registry.address, tls=ca):
                pass
        async with mesh.connect(registry=registry.address, tls=ca, token=TOKENS["bob"]) as c:
            assert c.instances() == []


async def test_only_its_registrant_may_update_an_instance(pki: Pki) -> None:
    async with mesh.Registry(tls=pki.server()) as registry:
        instance = rpb.Instance(instance_id="a11ce", agent_name="cart", endpoint="127.0.0.1:1")
        async with (
            grpc.aio.secure_channel(
                registry.address, _channel_credentials(pki.client(ALICE))
            ) as alice,
            grpc.aio.secure_channel(registry.address, _channel_credentials(pki.client(BOB))) as bob,
        ):
            mine = rpb_grpc.RegistryServiceStub(alice).Register()
            await mine.write(rpb.RegisterRequest(instance=instance))
            assert isinstance(await mine.read(), rpb.RegisterResponse)
            theirs = rpb_grpc.RegistryServiceStub(bob).Register()
            await theirs.write(rpb.RegisterRequest(instance=instance))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await theirs.read()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "registered by another principal" in str(info.value.details())
            listed = await rpb_grpc.RegistryServiceStub(bob).ListInstances(
                rpb.ListInstancesRequest()
            )
            assert [i.endpoint for i in listed.instances] == ["127.0.0.1:1"]  # still alice's
            mine.cancel()


async def test_a_client_dials_only_the_addresses_the_registry_lists(reg: str) -> None:
    """An agent (say, a compromised one) that points callers elsewhere is not followed."""
    trap = socket.create_server(("127.0.0.9", 0))
    trap.setblocking(False)
    host, port = trap.getsockname()
    elsewhere = f"{host}:{port}"

    @mesh.tool
    async def lure() -> None:
        raise Fail(
            "SESSION_ELSEWHERE",
            f"the session lives at {elsewhere}",
            {"session_id": "x", "owner_instance": "evil", "owner_endpoint": elsewhere},
        )

    agent = await started(lure, registry=reg)
    try:
        async with mesh.connect(registry=reg) as client:
            await eventually(lambda: len(client.instances()) == 1, what="the agent listed")
            with pytest.raises(SessionElsewhere):
                await client.proxy("lure", retry_count=2, retry_delay=0)()
            with pytest.raises(BlockingIOError):
                trap.accept()  # nobody came
    finally:
        trap.close()
        await agent.stop(grace=0)
