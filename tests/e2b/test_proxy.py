"""Reaching user ports: header routing, host routing, closed ports (brief item 7)."""

from __future__ import annotations

import hashlib
import os
import uuid

import httpx
import pytest

import harness

PORT = 8080


@pytest.fixture(scope="module")
def web(sandbox, daemon):
    """python3 -m http.server 8080 serving /home/user/www in the shared sandbox."""
    sandbox.files.write("/home/user/www/hello.txt", "hi from the sandbox\n")
    handle = sandbox.commands.run(
        f"cd /home/user/www && exec python3 -m http.server {PORT} --bind 127.0.0.1", background=True
    )
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": str(PORT)}
    with httpx.Client(base_url=daemon.url, headers=headers, timeout=10) as c:
        harness.wait_until(
            lambda: c.get("/hello.txt").status_code == 200, 20, interval=0.1, what="http.server to answer"
        )
    yield sandbox
    handle.kill()


def test_header_routing(daemon, web):
    headers = {"E2b-Sandbox-Id": web.sandbox_id, "E2b-Sandbox-Port": str(PORT)}
    r = httpx.get(daemon.url + "/hello.txt", headers=headers)
    assert r.status_code == 200
    assert r.text == "hi from the sandbox\n"
    assert "SimpleHTTP" in r.headers.get("server", "")
    # a missing file is the server's own 404, passed through
    r = httpx.get(daemon.url + "/missing.txt", headers=headers)
    assert r.status_code == 404 and "SimpleHTTP" in r.headers.get("server", "")


def test_host_routing(daemon, web):
    host = web.get_host(PORT)
    assert host == f"{PORT}-{web.sandbox_id}.localhost:{daemon.port}", host
    r = httpx.get(daemon.url + "/hello.txt", headers={"Host": host})
    assert r.status_code == 200 and r.text == "hi from the sandbox\n"
    # host names are case-insensitive
    r = httpx.get(daemon.url + "/hello.txt", headers={"Host": host.upper()})
    assert r.status_code == 200


def test_host_routing_to_envd(daemon, web):
    r = httpx.get(daemon.url + "/health", headers={"Host": web.get_host(49983)})
    assert 200 <= r.status_code < 300
    r = httpx.get(
        daemon.url + "/files",
        params={"path": "/etc/hostname"},
        headers={"Host": web.get_host(49983), "X-Access-Token": web._envd_access_token},
    )
    assert r.status_code == 200 and r.text.strip() == web.sandbox_id


def test_large_download_through_port_proxy(daemon, web):
    data = os.urandom(8 * 1024 * 1024)
    name = f"big-{uuid.uuid4().hex[:6]}.bin"
    web.files.write(f"/home/user/www/{name}", data)
    headers = {"E2b-Sandbox-Id": web.sandbox_id, "E2b-Sandbox-Port": str(PORT)}
    r = httpx.get(f"{daemon.url}/{name}", headers=headers, timeout=60)
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(data).hexdigest()


def test_many_requests_reuse_connections(daemon, web):
    headers = {"E2b-Sandbox-Id": web.sandbox_id, "E2b-Sandbox-Port": str(PORT)}
    with httpx.Client(base_url=daemon.url, headers=headers) as c:
        for _ in range(50):
            assert c.get("/hello.txt").status_code == 200


def test_closed_port(daemon, web):
    headers = {"E2b-Sandbox-Id": web.sandbox_id, "E2b-Sandbox-Port": "8081"}
    r = httpx.get(daemon.url + "/", headers=headers)
    body = harness.assert_error_body(r, 502)
    assert "port is not open" in body["message"]
    r = httpx.get(daemon.url + "/", headers={"Host": web.get_host(8081)})
    body = harness.assert_error_body(r, 502)
    assert "port is not open" in body["message"]


@pytest.mark.parametrize("sid", ["abcdefghijklmnopqrst", "../../etc", "x" * 300])
def test_unknown_sandbox(daemon, sid):
    for port in ("49983", "8080"):
        r = httpx.get(daemon.url + "/health", headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": port})
        body = harness.assert_error_body(r, 502)
        assert "was not found" in body["message"]


@pytest.mark.parametrize("port", ["0", "65536", "abc", "-1", ""])
def test_bad_port_header(daemon, sandbox, port):
    r = httpx.get(
        daemon.url + "/health", headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": port}
    )
    harness.assert_error_body(r, 400)


def test_host_that_is_not_a_sandbox_goes_to_the_api(daemon):
    for host in (f"localhost:{daemon.port}", f"api.localhost:{daemon.port}", "8080-abc.evil.example"):
        r = httpx.get(daemon.url + "/health", headers={"Host": host})
        assert r.status_code == 200 and r.json()["status"] == "ok", (host, r.text)


UPGRADE_SERVER = r'''
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen()
while True:
    conn, _ = srv.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(1024)
    ok = b"upgrade: echo" in head.lower()
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
                 if ok else b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    while ok:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data.upper())
    conn.close()
'''


def test_upgraded_connections_are_spliced_both_ways(daemon, sandbox):
    """A protocol upgrade (as WebSocket does) through the proxy: after `101` the client
    and the server in the sandbox talk directly, bytes flowing both ways."""
    import socket

    port = 8765
    sandbox.files.write("/home/user/upgrade_server.py", UPGRADE_SERVER)
    handle = sandbox.commands.run(f"exec python3 /home/user/upgrade_server.py {port}", background=True)
    try:
        def handshake() -> tuple[socket.socket, bytes]:
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            s.sendall(
                (
                    f"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nE2b-Sandbox-Id: {sandbox.sandbox_id}\r\n"
                    f"E2b-Sandbox-Port: {port}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
                ).encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(1024)
                if not chunk:
                    break
                head += chunk
            return s, head

        # Ready when the server answers the upgrade (a closed port answers 502 first).
        def ready():
            s, head = handshake()
            s.close()
            return head.startswith(b"HTTP/1.1 101")

        harness.wait_until(ready, 20, interval=0.1, what="the upgrade server to listen")
        s, head = handshake()
        assert head.startswith(b"HTTP/1.1 101"), head
        for message in (b"hello", b"x" * 200_000):
            s.sendall(message)
            got = b""
            while len(got) < len(message):
                chunk = s.recv(65536)
                assert chunk, "connection closed mid-echo"
                got += chunk
            assert got == message.upper()
        s.close()
    finally:
        handle.kill()
