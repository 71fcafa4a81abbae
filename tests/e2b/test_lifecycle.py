"""Timeouts, expiry, kill and what a killed sandbox answers (brief item 5)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from e2b import (
    Sandbox,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
)

import harness


def _close(a: datetime, b: datetime, seconds: float = 5) -> bool:
    return abs((a - b).total_seconds()) <= seconds


def test_set_timeout_moves_end_at(new_sandbox, conn):
    sbx = new_sandbox(timeout=60)
    now = datetime.now(timezone.utc)
    assert _close(sbx.get_info().end_at, now + timedelta(seconds=60))
    sbx.set_timeout(600)
    assert _close(sbx.get_info().end_at, datetime.now(timezone.utc) + timedelta(seconds=600))
    # it can shorten the life too, and the class-method form works
    Sandbox.set_timeout(sbx.sandbox_id, 30, **conn)
    assert _close(sbx.get_info().end_at, datetime.now(timezone.utc) + timedelta(seconds=30))


def test_connect_extends_but_never_shortens(new_sandbox, conn):
    sbx = new_sandbox(timeout=60)
    Sandbox.connect(sbx.sandbox_id, timeout=600, **conn)
    assert _close(sbx.get_info().end_at, datetime.now(timezone.utc) + timedelta(seconds=600))
    Sandbox.connect(sbx.sandbox_id, timeout=10, **conn)
    assert _close(sbx.get_info().end_at, datetime.now(timezone.utc) + timedelta(seconds=600))


def test_sandbox_expires_by_itself(daemon, new_sandbox, conn):
    sbx = new_sandbox(timeout=2)
    sid = sbx.sandbox_id
    assert sbx.is_running()
    t0 = time.monotonic()

    def gone():
        try:
            sbx.get_info()
            return False
        except SandboxNotFoundException:
            return True

    harness.wait_until(gone, 30, interval=0.1, what="the timeout=2 sandbox to disappear")
    took = time.monotonic() - t0
    assert took < 10, f"timeout=2 sandbox lived {took:.1f}s"
    assert sid not in [s.sandbox_id for s in Sandbox.list(**conn).next_items()]
    assert sbx.is_running() is False
    # the host is clean: directory and cgroups are gone
    harness.wait_until(lambda: not daemon.leaks([sid]) or None, 10, what="host clean-up of the expired sandbox")


def test_kill_then_everything_is_not_found(daemon, new_sandbox, conn):
    sbx = new_sandbox(timeout=120)
    sid = sbx.sandbox_id
    assert sbx.kill() is True
    with pytest.raises(SandboxNotFoundException):
        sbx.get_info()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sid, **conn)
    assert Sandbox.kill(sid, **conn) is False
    assert sbx.kill() is False
    with pytest.raises(SandboxNotFoundException):
        sbx.set_timeout(100)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sid, **conn)
    with pytest.raises(SandboxNotFoundException):
        sbx.get_metrics()
    assert sbx.is_running() is False
    # envd calls answer "not running"
    for call in (
        lambda: sbx.commands.run("true"),
        lambda: sbx.commands.list(),
        lambda: sbx.files.read("/etc/hostname"),
        lambda: sbx.files.write("/tmp/x", "y"),
        lambda: sbx.files.list("/"),
        lambda: sbx.files.exists("/etc"),
    ):
        with pytest.raises(SandboxNotRunningException):
            call()
    assert not daemon.leaks([sid])


def test_kill_while_a_command_streams(new_sandbox):
    sbx = new_sandbox(timeout=120)
    handle = sbx.commands.run("while true; do echo x; sleep 0.05; done", background=True)
    assert sbx.kill() is True
    with pytest.raises(Exception) as ei:
        handle.wait()
    assert not isinstance(ei.value, AssertionError)


def test_context_manager_kills(conn):
    with Sandbox.create(timeout=60, **conn) as sbx:
        harness.track(sbx.sandbox_id)
        assert sbx.commands.run("echo in").stdout == "in\n"
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id, **conn)


def test_idempotency_key(new_sandbox, conn):
    key = f"cbt-{time.time_ns()}"
    a = new_sandbox(timeout=60, idempotency_key=key)
    b = new_sandbox(timeout=60, idempotency_key=key)
    assert a.sandbox_id == b.sandbox_id
    c = new_sandbox(timeout=60, idempotency_key=key + "-other")
    assert c.sandbox_id != a.sandbox_id


def test_connect_returns_a_working_sandbox(new_sandbox, conn):
    sbx = new_sandbox(timeout=60, metadata={"who": "connect"})
    again = Sandbox.connect(sbx.sandbox_id, **conn)
    assert again.sandbox_id == sbx.sandbox_id
    assert again.commands.run("hostname").stdout.strip() == sbx.sandbox_id
    listed = Sandbox.list(query=SandboxQuery(metadata={"who": "connect"}), **conn).next_items()
    assert sbx.sandbox_id in [s.sandbox_id for s in listed]


def test_concurrent_kills_only_one_wins(daemon, new_sandbox):
    sbx = new_sandbox(timeout=120)

    def kill(_):
        return httpx.delete(
            f"{daemon.url}/sandboxes/{sbx.sandbox_id}", headers={"X-API-KEY": daemon.api_key}
        ).status_code

    with ThreadPoolExecutor(10) as pool:
        codes = sorted(pool.map(kill, range(10)))
    assert codes == [204] + [404] * 9, codes
    assert not daemon.leaks([sbx.sandbox_id])


def test_concurrent_creates_with_one_idempotency_key_make_one_sandbox(daemon):
    """The SDK retries a create with the same Idempotency-Key (e.g. after a timeout)
    while the first attempt may still be running: every attempt must get the same
    sandbox, never a second one."""
    key = f"cbt-race-{time.time_ns()}"
    headers = {"X-API-KEY": daemon.api_key, "Idempotency-Key": key}

    def create(_):
        r = httpx.post(f"{daemon.url}/v2/sandboxes", json={"templateID": "base", "timeout": 60}, headers=headers)
        assert r.status_code == 201, r.text
        return r.json()["sandboxID"]

    with ThreadPoolExecutor(10) as pool:
        ids = list(pool.map(create, range(10)))
    harness.track(*ids)
    distinct = set(ids)
    for i in distinct:
        daemon.client().delete(f"/sandboxes/{i}")
    assert len(distinct) == 1, f"10 concurrent creates with one Idempotency-Key made {len(distinct)} sandboxes"


def test_shortened_timeout_expires_promptly(new_sandbox):
    sbx = new_sandbox(timeout=600)
    t0 = time.monotonic()
    sbx.set_timeout(1)

    def gone():
        try:
            sbx.get_info()
            return False
        except SandboxNotFoundException:
            return True

    harness.wait_until(gone, 15, interval=0.05, what="the sandbox to expire after set_timeout(1)")
    assert time.monotonic() - t0 < 5
