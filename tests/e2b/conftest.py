"""Fixtures of the E2B-compatibility suite.

One `cubicle serve` per test session (fresh data dir under /tmp, its own port, the
host's templates symlinked in); the unmodified `e2b` SDK talks to it through its
connection kwargs (`api_url`, `sandbox_url`, `api_key`), never through the process
environment. At the end every sandbox is killed, the daemon is stopped with SIGTERM and
the host is checked for leftovers (sandbox dirs, cgroups).
"""

from __future__ import annotations

import os

import pytest

import harness


@pytest.fixture(scope="session", autouse=True)
def _clean_e2b_environment():
    """E2B_* variables of the caller's shell (E2B_DEBUG, E2B_DOMAIN, a cloud API key...)
    must not steer the SDK; tests that want env-based config set them themselves."""
    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k.startswith("E2B_"):
                mp.delenv(k)
        yield


@pytest.fixture(scope="session")
def daemon():
    problem = harness.preflight()
    if problem:
        pytest.fail(problem, pytrace=False)
    d = harness.Daemon("cbt")
    try:
        d.start()
    except Exception as e:
        d.force_cleanup()
        pytest.fail(str(e), pytrace=False)
    yield d
    failures = d.kill_all()
    alive_at_end = d.alive()
    try:
        rc = d.stop()
    except RuntimeError as e:
        failures.append(str(e))
        rc = None
    leaks = d.leaks(harness.SEEN_IDS)
    problems = failures + leaks
    if not alive_at_end:
        problems.append(f"the session daemon was not running at teardown (rc={rc})")
    if problems:
        log = d.force_cleanup()
        pytest.fail(
            f"session teardown found problems (daemon log kept in {log}):\n  - "
            + "\n  - ".join(problems),
            pytrace=False,
        )
    d.cleanup()


@pytest.fixture(scope="session")
def conn(daemon) -> dict:
    """SDK connection kwargs for the session daemon's first API key."""
    return daemon.conn()


@pytest.fixture(scope="session")
def other_key(daemon) -> str:
    return daemon.create_key("other")


@pytest.fixture(scope="session")
def other_conn(daemon, other_key) -> dict:
    return daemon.conn(other_key)


@pytest.fixture
def http(daemon):
    """Raw httpx client with the default key (X-API-KEY)."""
    return daemon.client()


@pytest.fixture
def new_sandbox(conn):
    """Factory: `new_sandbox(**create_kwargs)`; every sandbox is killed after the test."""
    made: list = []

    def make(template: str | None = None, conn_override: dict | None = None, **kw):
        sbx = harness.create(conn_override or conn, template, **kw)
        made.append(sbx)
        return sbx

    yield make
    for s in made:
        harness.kill_quietly(s)


@pytest.fixture(scope="module")
def sandbox(conn):
    """One sandbox shared by a module's tests (they must not depend on each other)."""
    sbx = harness.create(conn, timeout=900, envs={"SBX_LEVEL": "from-create", "SBX_SPACES": "a b  c"})
    yield sbx
    harness.kill_quietly(sbx)


def pytest_terminal_summary(terminalreporter):
    if harness.MEASUREMENTS:
        terminalreporter.section("cubicle measurements")
        for line in harness.MEASUREMENTS:
            terminalreporter.write_line(line)
