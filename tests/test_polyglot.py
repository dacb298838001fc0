"""Other languages and debuggers: the real grpcurl binary, a Node.js client, buf."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.pki import Pki
from tests.procs import ROOT, process_blocking

SERVICE = "sessionmesh.v1.SessionService"


def _tool(name: str, path: Path | None = None) -> str:
    """A tool's path; missing tools fail the run in CI (it must prove this), skip elsewhere."""
    found = str(path) if path is not None and path.exists() else shutil.which(name)
    if found is None:
        found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        message = f"{name} is not installed (scripts/setup installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def counter() -> Iterator[str]:
    with process_blocking("serve", str(ROOT / "examples/counter.py")) as (_, ready):
        yield str(ready["address"])


def grpcurl(
    address: str,
    *rest: str,
    header: str | None = None,
    data: dict[str, Any] | None = None,
    verbose: bool = False,
    check: bool = True,
    tls: Sequence[str] = ("-plaintext",),
    headers: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """grpcurl [flags] ADDRESS REST... (REST: 'list', 'describe SYMBOL' or a method)."""
    flags = list(tls)
    if verbose:
        flags.append("-v")
    for one in (header, *headers):
        if one is not None:
            flags += ["-H", one]
    if data is not None:
        flags += ["-d", json.dumps(data)]
    command = [_tool("grpcurl"), *flags, address, *rest]
    out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise AssertionError(f"{command} failed ({out.returncode}): {out.stderr}")
    return out


def test_grpcurl_lists_and_describes_through_reflection(counter: str) -> None:
    services = grpcurl(counter, "list").stdout.split()
    assert services == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        SERVICE,
    ]
    described = grpcurl(counter, "describe", SERVICE).stdout
    for rpc in ("CreateSession", "Call", "StreamCall", "Exchange", "CloseSession", "ListTools"):
        assert f"rpc {rpc} " in described
    message = grpcurl(counter, "describe", "sessionmesh.v1.CallRequest").stdout
    assert ".google.protobuf.Struct arguments" in message
    health = grpcurl(counter, "grpc.health.v1.Health/Check", data={"service": SERVICE}).stdout
    assert json.loads(health) == {"status": "SERVING"}


def test_a_whole_session_from_grpcurl(counter: str) -> None:
    created = json.loads(
        grpcurl(counter, f"{SERVICE}/CreateSession", data={"tool": "session_counter"}).stdout
    )
    session_id = created["session"]["id"]
    header = f"x-session-id: {session_id}"
    counts = []
    for n in (1, 2, 3):
        out = grpcurl(
            counter,
            f"{SERVICE}/Call",
            header=header,
            data={"tool": "session_counter", "arguments": {"increment": n}},
        )
        counts.append(json.loads(out.stdout)["result"]["count"])
    assert counts == [1, 3, 6]
    streamed = grpcurl(
        counter,
        f"{SERVICE}/StreamCall",
        header=header,
        data={"start": {"call": {"tool": "stream_count", "arguments": {"n": 2}}}},
    )
    chunks = [
        json.loads(part)["chunk"]
        for part in streamed.stdout.replace("}\n{", "}\x00{").split("\x00")
    ]
    assert chunks == [{"i": 1, "count": 6}, {"i": 2, "count": 6}]
    closed = grpcurl(counter, f"{SERVICE}/CloseSession", data={"session_id": session_id})
    assert json.loads(closed.stdout) == {"closed": True}
    after = grpcurl(
        counter, f"{SERVICE}/Call", header=header, data={"tool": "session_counter"}, check=False
    )
    assert after.returncode != 0
    assert "Code: NotFound" in after.stderr
    assert '"reason":"SESSION_NOT_FOUND"' in after.stderr.replace(" ", "")


def test_grpcurl_can_open_a_session_with_its_first_call(counter: str) -> None:
    out = grpcurl(
        counter,
        f"{SERVICE}/Call",
        verbose=True,
        header="x-session-create: 1",
        data={"tool": "session_counter", "arguments": {"increment": 5}},
    )
    body = out.stdout[out.stdout.index("{") : out.stdout.rindex("}") + 1]
    assert json.loads(body)["result"]["count"] == 5
    assert "x-session-id: " in out.stdout  # the new id, in the response headers


def _node_client(address: str, env: dict[str, str] | None = None) -> None:
    node = _tool("node")
    if not (ROOT / "examples/node/node_modules/@grpc/grpc-js").exists():
        if os.environ.get("CI"):
            pytest.fail("examples/node has no node_modules: scripts/setup runs npm ci there")
        pytest.skip("examples/node dependencies are not installed (scripts/setup)")
    out = subprocess.run(
        [node, str(ROOT / "examples/node/client.js"), address],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    steps = [json.loads(line) for line in out.stdout.splitlines()]
    by_step: dict[str, list[dict[str, Any]]] = {}
    for step in steps:
        by_step.setdefault(step["step"], []).append(step)
    assert [s["count"] for s in by_step["call"]] == [1, 3, 6]
    assert by_step["stream"][0]["chunks"] == [
        {"i": 1, "count": 6},
        {"i": 2, "count": 6},
        {"i": 3, "count": 6},
    ]
    assert by_step["error"] == [{"step": "error", "code": "NOT_FOUND", "reason": "TOOL_NOT_FOUND"}]
    assert by_step["close"] == [{"step": "close", "closed": True}]
    assert by_step["after-close"] == [
        {"step": "after-close", "code": "NOT_FOUND", "reason": "SESSION_NOT_FOUND"}
    ]


def test_node_client(counter: str) -> None:
    _node_client(counter)


# -- over TLS: the same clients, with certificates and tokens ----------------------------------

TOKEN = "node-and-grpcurl-token-0123456789"


@pytest.fixture
def tls_counter(tmp_path: Path) -> Iterator[tuple[str, Pki]]:
    """examples/counter.py over TLS: mutual TLS, or a bearer token instead of a certificate."""
    pki = Pki(tmp_path)
    server = pki.server()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"polyglot {TOKEN}\n")
    flags = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    flags += ["--tls-client-ca", pki.ca_file, "--auth-tokens", str(tokens)]
    with process_blocking("serve", str(ROOT / "examples/counter.py"), *flags) as (_, ready):
        yield str(ready["address"]), pki


def test_grpcurl_over_mutual_tls(tls_counter: tuple[str, Pki]) -> None:
    address, pki = tls_counter
    cert, key = pki.issue("grpcurl", "grpcurl.example.org")
    mutual = ("-cacert", pki.ca_file, "-cert", cert, "-key", key)
    created = grpcurl(
        address, f"{SERVICE}/CreateSession", tls=mutual, data={"tool": "session_counter"}
    )
    session_id = json.loads(created.stdout)["session"]["id"]
    out = grpcurl(
        address,
        f"{SERVICE}/Call",
        tls=mutual,
        header=f"x-session-id: {session_id}",
        data={"tool": "session_counter", "arguments": {"increment": 4}},
    )
    assert json.loads(out.stdout)["result"]["count"] == 4
    # The same certificate with a bearer token: the token names the caller, who did not
    # open this session, and is told what a forged id is told.
    other = grpcurl(
        address,
        f"{SERVICE}/Call",
        tls=mutual,
        headers=[f"x-session-id: {session_id}", f"authorization: Bearer {TOKEN}"],
        data={"tool": "session_counter"},
        check=False,
    )
    assert '"reason":"SESSION_NOT_FOUND"' in other.stderr.replace(" ", "")
    no_certificate = grpcurl(address, "list", tls=("-cacert", pki.ca_file), check=False)
    assert no_certificate.returncode != 0
    plaintext = grpcurl(address, "list", check=False)
    assert plaintext.returncode != 0


def test_node_client_over_mutual_tls(tls_counter: tuple[str, Pki]) -> None:
    address, pki = tls_counter
    cert, key = pki.issue("node", "node.example.org")
    env = {"SESSIONMESH_TLS_CA": pki.ca_file, "SESSIONMESH_TLS_CERT": cert}
    _node_client(address, {**env, "SESSIONMESH_TLS_KEY": key, "SESSIONMESH_TOKEN": TOKEN})


def _buf() -> str:
    return _tool("buf", ROOT / "node_modules/.bin/buf")


def test_buf_lint_standard() -> None:
    out = subprocess.run(
        [_buf(), "lint", "protos"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_buf_breaking_against_the_previous_commit() -> None:
    previous = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", "HEAD~1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if previous.returncode != 0:
        pytest.skip("no previous commit to compare with (a shallow or one-commit clone)")
    out = subprocess.run(
        [_buf(), "breaking", "protos", "--against", ".git#ref=HEAD~1,subdir=protos"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, "a breaking wire change:\n" + out.stdout + out.stderr
