"""pause / connect (resume) through the SDK: the freeze depth of issue 6. A paused
sandbox keeps every process where it stopped (memory kept), answers no traffic, does not
expire, and comes back through `Sandbox.connect` exactly as it was."""

from __future__ import annotations

import time

import pytest
from e2b import Sandbox, SandboxException, SandboxNotFoundException, SandboxQuery, SandboxState

import harness

COUNTER = (
    "nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; "
    "mv /tmp/count.new /tmp/count; sleep 0.01; done' >/dev/null 2>&1 &"
)


def _count(sbx) -> int:
    return int(sbx.files.read("/tmp/count").strip() or 0)


def test_pause_keeps_processes_files_and_fds_and_connect_resumes(new_sandbox, conn):
    sbx = new_sandbox()
    sbx.commands.run(COUNTER)
    sbx.files.write("/home/user/kept.txt", "on disk")
    sbx.commands.run("echo in-shm > /dev/shm/kept")
    # A process holding an open file: it appends through the same fd after resume.
    sbx.commands.run(
        "nohup python3 -c 'import sys, time\n"
        "f = open(\"/tmp/fd.log\", \"a\", buffering=1)\n"
        "n = 0\n"
        "while True:\n"
        "    n += 1; f.write(str(n) + chr(10)); time.sleep(0.01)' >/dev/null 2>&1 &"
    )
    server = sbx.commands.run("python3 -m http.server 8080", background=True)
    harness.wait_until(lambda: _count(sbx) > 2, 10, what="the counter")
    harness.wait_until(lambda: _http_ok(sbx), 10, what="the http server")

    assert sbx.pause() is True
    assert sbx.get_info().state == SandboxState.PAUSED
    # A paused sandbox answers no envd traffic (E2B's 502 "not found").
    with pytest.raises(SandboxException):
        sbx.commands.run("true", request_timeout=5)
    # Pausing again is not an error: the SDK answers False (409).
    assert sbx.pause() is False
    listed = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED]), **conn).next_items()]
    assert sbx.sandbox_id in listed

    resumed = Sandbox.connect(sbx.sandbox_id, **conn)
    assert resumed.sandbox_id == sbx.sandbox_id
    assert resumed.get_info().state == SandboxState.RUNNING
    before = _count(resumed)
    harness.wait_until(lambda: _count(resumed) > before, 10, what="the counter to go on")
    assert resumed.files.read("/home/user/kept.txt") == "on disk"
    assert resumed.commands.run("cat /dev/shm/kept").stdout == "in-shm\n"
    lines = resumed.files.read("/tmp/fd.log").split()
    harness.wait_until(
        lambda: len(resumed.files.read("/tmp/fd.log").split()) > len(lines),
        10,
        what="the open fd to be written again",
    )
    numbers = [int(x) for x in resumed.files.read("/tmp/fd.log").split()]
    assert numbers == list(range(1, len(numbers) + 1)), "the writer went on where it stopped"
    assert server.pid in {p.pid for p in resumed.commands.list()}
    assert _http_ok(resumed), "the http server answers after resume"


def _http_ok(sbx) -> bool:
    r = sbx.commands.run(
        "python3 -c 'import urllib.request as u; print(u.urlopen(\"http://127.0.0.1:8080\").status)'"
    )
    return r.stdout.strip() == "200"


def test_code_interpreter_variables_survive_a_pause(conn):
    sbx = harness.create_ci(conn)
    try:
        sbx.run_code("x = 41")
        assert sbx.pause() is True
        from e2b_code_interpreter import Sandbox as CiSandbox

        back = CiSandbox.connect(sbx.sandbox_id, **conn)
        assert back.run_code("x + 1").text == "42"
    finally:
        harness.kill_quietly(sbx)


def test_a_paused_sandbox_does_not_expire_and_resume_restarts_its_timeout(new_sandbox, conn):
    sbx = new_sandbox(timeout=2)
    sbx.pause()
    # Past the original deadline the paused sandbox is still there...
    time.sleep(3)
    assert Sandbox.get_info(sbx.sandbox_id, **conn).state == SandboxState.PAUSED
    # ...and resuming gives it a fresh timeout from now.
    start = time.time()
    back = Sandbox.connect(sbx.sandbox_id, timeout=60, **conn)
    end_at = back.get_info().end_at.timestamp()
    assert end_at >= start + 55, (end_at, start)


def test_auto_pause_pauses_at_the_timeout(new_sandbox, conn):
    sbx = new_sandbox(timeout=1, lifecycle={"on_timeout": "pause"})
    sbx.commands.run("echo before > /tmp/mark")
    harness.wait_until(
        lambda: Sandbox.get_info(sbx.sandbox_id, **conn).state == SandboxState.PAUSED,
        15,
        what="the auto-pause",
    )
    back = Sandbox.connect(sbx.sandbox_id, **conn)
    assert back.commands.run("cat /tmp/mark").stdout == "before\n"


def test_paused_sandboxes_can_be_killed(new_sandbox, conn):
    sbx = new_sandbox()
    sbx.pause()
    assert sbx.kill() is True
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id, **conn)
    with pytest.raises(SandboxNotFoundException):
        sbx.pause()


def test_other_keys_cannot_pause_or_resume(new_sandbox, other_conn, conn):
    sbx = new_sandbox()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.pause(sbx.sandbox_id, **other_conn)
    sbx.pause()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id, **other_conn)
    assert Sandbox.get_info(sbx.sandbox_id, **conn).state == SandboxState.PAUSED


def test_pause_resume_cycles_are_fast_and_lossless(new_sandbox, conn):
    sbx = new_sandbox()
    sbx.commands.run(COUNTER)
    harness.wait_until(lambda: _count(sbx) > 0, 10, what="the counter")
    pauses, resumes = [], []
    for _ in range(10):
        t = time.perf_counter()
        assert sbx.pause() is True
        pauses.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        sbx = Sandbox.connect(sbx.sandbox_id, **conn)
        resumes.append((time.perf_counter() - t) * 1000)
    before = _count(sbx)
    harness.wait_until(lambda: _count(sbx) > before, 10, what="the counter after 10 cycles")
    harness.MEASUREMENTS.append(
        f"pause via SDK: p50 {harness.percentile(pauses, 50):.1f} ms, "
        f"resume (connect) p50 {harness.percentile(resumes, 50):.1f} ms over 10 cycles"
    )


def test_hibernate_frees_memory_and_connect_restores_everything(new_sandbox, daemon, conn):
    """Cubicle's deep pause ({"hibernate": true}): processes are checkpointed to disk and
    end, and `Sandbox.connect` restores them under the same id."""
    sbx = new_sandbox()
    sbx.commands.run(COUNTER)
    sbx.files.write("/home/user/kept.txt", "on disk")
    sbx.commands.run("echo in-shm > /dev/shm/kept")
    harness.wait_until(lambda: _count(sbx) > 2, 10, what="the counter")
    with daemon.http() as c:
        r = c.post(f"/sandboxes/{sbx.sandbox_id}/pause", json={"hibernate": True})
        assert r.status_code == 204, r.text
        # No process of it is left on the host: its cgroups are gone.
        assert harness.cgroups_of([sbx.sandbox_id]) == []
        assert Sandbox.get_info(sbx.sandbox_id, **conn).state == SandboxState.PAUSED
        again = c.post(f"/sandboxes/{sbx.sandbox_id}/pause", json={})
        assert again.status_code == 409, again.text
    t = time.perf_counter()
    back = Sandbox.connect(sbx.sandbox_id, **conn)
    resume_ms = (time.perf_counter() - t) * 1000
    assert back.commands.run("hostname").stdout.strip() == sbx.sandbox_id
    before = _count(back)
    harness.wait_until(lambda: _count(back) > before, 10, what="the counter to go on")
    assert back.files.read("/home/user/kept.txt") == "on disk"
    assert back.commands.run("cat /dev/shm/kept").stdout == "in-shm\n"
    harness.MEASUREMENTS.append(f"hibernate: resume (connect, restore from disk) {resume_ms:.0f} ms")


def test_code_interpreter_variables_survive_hibernation(daemon, conn):
    sbx = harness.create_ci(conn)
    try:
        sbx.run_code("x = 41")
        with daemon.http() as c:
            r = c.post(f"/sandboxes/{sbx.sandbox_id}/pause", json={"hibernate": True})
            assert r.status_code == 204, r.text
        from e2b_code_interpreter import Sandbox as CiSandbox

        back = CiSandbox.connect(sbx.sandbox_id, **conn)
        assert back.run_code("x + 1").text == "42"
    finally:
        harness.kill_quietly(sbx)
