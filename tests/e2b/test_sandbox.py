"""Creating sandboxes, get_info, is_running, metrics and templates (brief items 1, 8, 9)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from e2b import E2B, AsyncSandbox, Sandbox, SandboxState
from e2b.api.client.api.templates import get_templates
from e2b.api.client_sync import get_api_client
from e2b.connection_config import ConnectionConfig

import harness

SLACK = timedelta(seconds=5)


def test_create_default_template(new_sandbox):
    sbx = new_sandbox()
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.template_id == "base"
    assert info.state == SandboxState.RUNNING
    assert sbx.is_running() is True
    # The sandbox is real: its host name is its id.
    assert sbx.commands.run("hostname").stdout.strip() == sbx.sandbox_id


def test_create_named_template_with_metadata_envs_timeout(new_sandbox):
    before = datetime.now(timezone.utc)
    sbx = new_sandbox(
        "base",
        timeout=120,
        metadata={"suite": "e2b", "purpose": "create test", "unicode": "héllo ✓"},
        envs={"GREETING": "hello world", "EMPTY": ""},
    )
    after = datetime.now(timezone.utc)
    info = sbx.get_info()
    assert info.template_id == "base"
    assert info.name == "base"
    assert info.metadata == {"suite": "e2b", "purpose": "create test", "unicode": "héllo ✓"}
    assert info.state == SandboxState.RUNNING
    assert before - SLACK <= info.started_at <= after + SLACK
    lifetime = (info.end_at - info.started_at).total_seconds()
    assert 115 <= lifetime <= 125, f"end_at - started_at = {lifetime}s for timeout=120"
    assert info.cpu_count >= 1 and info.memory_mb >= 32
    assert info.envd_version and tuple(int(x) for x in info.envd_version.split(".")) >= (0, 1, 0)
    assert sbx.is_running()
    r = sbx.commands.run('echo "$GREETING|${EMPTY-unset}"')
    assert r.stdout == "hello world|\n"
    # the class-method form of get_info answers the same
    again = Sandbox.get_info(sbx.sandbox_id, **_conn_of(sbx))
    assert again.sandbox_id == sbx.sandbox_id and again.metadata == info.metadata


def _conn_of(sbx) -> dict:
    cfg = sbx.connection_config
    return dict(api_url=cfg.api_url, sandbox_url=cfg._sandbox_url, api_key=cfg.api_key)


def test_default_timeout_is_300_seconds(new_sandbox):
    info = new_sandbox().get_info()
    lifetime = (info.end_at - info.started_at).total_seconds()
    assert 295 <= lifetime <= 305, lifetime


def test_is_running_turns_false_after_kill(new_sandbox):
    sbx = new_sandbox()
    assert sbx.is_running() is True
    assert sbx.kill() is True
    assert sbx.is_running() is False


def test_e2b_client_binding(daemon):
    """`E2B(...)` binds connection params to the resource classes."""
    client = E2B(**daemon.conn())
    sbx = client.Sandbox.create(timeout=60)
    harness.track(sbx.sandbox_id)
    try:
        assert sbx.commands.run("echo bound").stdout == "bound\n"
        assert sbx.sandbox_id in [s.sandbox_id for s in client.Sandbox.list().next_items()]
    finally:
        assert sbx.kill() is True


def test_configuration_from_environment(daemon, monkeypatch):
    """The documented set-up: E2B_API_URL = E2B_SANDBOX_URL = the daemon, E2B_API_KEY."""
    monkeypatch.setenv("E2B_API_URL", daemon.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", daemon.url)
    monkeypatch.setenv("E2B_API_KEY", daemon.api_key)
    sbx = Sandbox.create(timeout=60)
    harness.track(sbx.sandbox_id)
    try:
        assert sbx.commands.run("echo env-config").stdout == "env-config\n"
        assert sbx.files.read("/etc/hostname").strip() == sbx.sandbox_id
    finally:
        assert Sandbox.kill(sbx.sandbox_id) is True


def test_async_create_info_and_kill(conn):
    async def scenario():
        sbx = await AsyncSandbox.create(timeout=60, metadata={"async": "yes"}, **conn)
        harness.track(sbx.sandbox_id)
        try:
            info = await sbx.get_info()
            assert info.metadata == {"async": "yes"} and info.state == SandboxState.RUNNING
            assert await sbx.is_running()
            r = await sbx.commands.run("echo from-async")
            assert r.stdout == "from-async\n"
        finally:
            assert await sbx.kill() is True
        assert not await sbx.is_running()

    asyncio.run(scenario())


def test_metrics(sandbox):
    sandbox.commands.run("head -c 3000000 /dev/urandom > /home/user/metrics.bin")
    metrics = sandbox.get_metrics()
    assert len(metrics) >= 1
    m = metrics[-1]
    assert m.cpu_count >= 1
    assert 0.0 <= m.cpu_used_pct <= 100.0
    assert m.mem_total > 0 and 0 < m.mem_used <= m.mem_total
    assert m.mem_cache >= 0
    assert m.disk_total > 0 and 0 <= m.disk_used <= m.disk_total
    assert isinstance(m.timestamp, datetime)
    assert abs(datetime.now(timezone.utc) - m.timestamp) < timedelta(minutes=15)


def test_templates_through_generated_client(daemon):
    client = get_api_client(ConnectionConfig(**daemon.conn()))
    res = get_templates.sync_detailed(client=client)
    assert res.status_code == 200, res.content
    templates = {t.template_id: t for t in res.parsed}
    assert "base" in templates, list(templates)
    base = templates["base"]
    assert "base" in base.aliases or "base" in base.names
    assert base.cpu_count >= 1 and base.memory_mb >= 32 and base.disk_size_mb > 0
    assert base.build_status.value in ("ready", "uploaded")
    assert base.envd_version


def test_templates_raw(http):
    r = http.get("/templates")
    assert r.status_code == 200
    items = r.json()
    base = next(t for t in items if t["templateID"] == "base")
    for field in (
        "templateID", "buildID", "cpuCount", "memoryMB", "diskSizeMB", "public", "aliases",
        "names", "createdAt", "updatedAt", "createdBy", "lastSpawnedAt", "spawnCount",
        "buildCount", "envdVersion", "buildStatus",
    ):
        assert field in base, f"template is missing {field}: {base}"
    one = http.get("/templates/base")
    assert one.status_code == 200 and one.json()["templateID"] == "base"
    harness.assert_error_body(http.get("/templates/no-such-template"), 404)


def test_unknown_template_is_an_sdk_error(conn):
    with pytest.raises(Exception) as ei:
        Sandbox.create("no-such-template", **conn)
    assert "no-such-template" in str(ei.value) or "404" in str(ei.value)
