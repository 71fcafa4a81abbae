"""API keys and the envd access token (brief item 6)."""

from __future__ import annotations

import httpx
import pytest
from e2b import (
    AuthenticationException,
    Sandbox,
    SandboxNotFoundException,
    SandboxQuery,
)

import harness


def test_wrong_api_key(daemon):
    bad = daemon.conn("e2b_" + "0" * 40)
    with pytest.raises(AuthenticationException):
        Sandbox.create(timeout=30, **bad)
    with pytest.raises(AuthenticationException):
        Sandbox.list(**bad).next_items()
    with pytest.raises(AuthenticationException):
        Sandbox.get_info("abcdefghijklmnopqrst", **bad)
    with pytest.raises(AuthenticationException):
        Sandbox.kill("abcdefghijklmnopqrst", **bad)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-KEY": ""},
        {"X-API-KEY": "wrong"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic dXNlcjo="},
    ],
    ids=["none", "empty", "wrong", "bearer-wrong", "basic"],
)
def test_missing_or_invalid_key_is_401_json(daemon, headers):
    with httpx.Client(base_url=daemon.url, headers=headers) as c:
        for method, path in [
            ("GET", "/v2/sandboxes"),
            ("GET", "/sandboxes"),
            ("POST", "/v2/sandboxes"),
            ("GET", "/sandboxes/abcdefghijklmnopqrst"),
            ("DELETE", "/sandboxes/abcdefghijklmnopqrst"),
            ("GET", "/templates"),
        ]:
            r = c.request(method, path, json={"templateID": "base"} if method == "POST" else None)
            harness.assert_error_body(r, 401)


def test_bearer_token_works(daemon):
    with httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {daemon.api_key}"}) as c:
        assert c.get("/v2/sandboxes").status_code == 200


def test_health_needs_no_key(daemon):
    r = httpx.get(daemon.url + "/health")
    assert r.status_code == 200


def test_second_key_cannot_touch_first_keys_sandbox(new_sandbox, conn, other_conn):
    mine = new_sandbox(timeout=300, metadata={"owner": "first"})
    sid = mine.sandbox_id
    assert sid not in [s.sandbox_id for s in Sandbox.list(**other_conn).next_items()]
    assert Sandbox.list(query=SandboxQuery(metadata={"owner": "first"}), **other_conn).next_items() == []
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sid, **other_conn)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sid, **other_conn)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(sid, 5, **other_conn)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_metrics(sid, **other_conn)
    assert Sandbox.kill(sid, **other_conn) is False
    # nothing happened to it
    info = mine.get_info()
    assert info.state.value == "running"
    assert (info.end_at - info.started_at).total_seconds() > 250
    assert mine.commands.run("echo still").stdout == "still\n"

    # and the other way round
    theirs = new_sandbox(timeout=60, conn_override=other_conn)
    assert theirs.sandbox_id not in [s.sandbox_id for s in Sandbox.list(**conn).next_items()]
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(theirs.sandbox_id, **conn)
    assert Sandbox.kill(theirs.sandbox_id, **conn) is False
    assert theirs.is_running()


def _envd(daemon, sid: str, token: str | None) -> httpx.Client:
    headers = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"}
    if token is not None:
        headers["X-Access-Token"] = token
    return httpx.Client(base_url=daemon.url, headers=headers, timeout=30)


@pytest.mark.parametrize("token", [None, "", "wrong", "other-sandbox"], ids=["none", "empty", "wrong", "other-sandbox"])
def test_envd_access_token_is_enforced(daemon, sandbox, new_sandbox, token):
    sid = sandbox.sandbox_id
    if token == "other-sandbox":
        token = new_sandbox(timeout=60)._envd_access_token
    with _envd(daemon, sid, token) as c:
        r = c.get("/files", params={"path": "/etc/hostname"})
        harness.assert_error_body(r, 401)
        r = c.post("/files", params={"path": "/tmp/unauth"}, files={"file": ("x", b"x")})
        harness.assert_error_body(r, 401)
        r = c.post(
            "/filesystem.Filesystem/Stat",
            json={"path": "/etc"},
            headers={"Connect-Protocol-Version": "1"},
        )
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated", r.text
        r = c.post(
            "/process.Process/List", json={}, headers={"Connect-Protocol-Version": "1"}
        )
        assert r.status_code == 401, r.text
    assert not sandbox.files.exists("/tmp/unauth")


def test_envd_access_token_right_one_works(daemon, sandbox):
    token = sandbox._envd_access_token
    assert token, "v2 sandboxes must have an envd access token"
    with _envd(daemon, sandbox.sandbox_id, token) as c:
        r = c.get("/files", params={"path": "/etc/hostname"})
        assert r.status_code == 200 and r.text.strip() == sandbox.sandbox_id
        r = c.post(
            "/filesystem.Filesystem/Stat", json={"path": "/etc"}, headers={"Connect-Protocol-Version": "1"}
        )
        assert r.status_code == 200 and r.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY"


def test_envd_health_needs_no_token(daemon, sandbox):
    with _envd(daemon, sandbox.sandbox_id, None) as c:
        r = c.get("/health")
        assert 200 <= r.status_code < 300


def test_get_info_returns_the_token_only_to_the_owner(daemon, sandbox, other_key):
    with daemon.http() as c:
        assert c.get(f"/sandboxes/{sandbox.sandbox_id}").json()["envdAccessToken"] == sandbox._envd_access_token
        listed = c.get("/v2/sandboxes").json()
        assert all("envdAccessToken" not in s for s in listed), "list must not leak tokens"
    with daemon.http(other_key) as c:
        r = c.get(f"/sandboxes/{sandbox.sandbox_id}")
        harness.assert_error_body(r, 404)
        assert sandbox._envd_access_token not in r.text
