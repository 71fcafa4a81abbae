"""Snapshots, create-from-snapshot, fork (clone) and rollback through the real SDK.

A snapshot keeps a running sandbox's processes, memory, open files, /dev/shm and
filesystem; `Sandbox.create(<snapshot id>)` starts an independent copy with its own id
and host name; `fork(count=n)` makes n copies from one checkpoint while the source runs
on; Cubicle's own `POST /sandboxes/{id}/rollback` puts a sandbox back to one of its own
snapshots. Snapshots outlive their source and belong to the key that took them.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from e2b import Sandbox, SandboxException, SandboxNotFoundException, SandboxState

import harness

COUNTER = (
    "nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; "
    "mv /tmp/count.new /tmp/count; sleep 0.01; done' >/dev/null 2>&1 &"
)
FD_WRITER = (
    "nohup python3 -c 'import sys, time\n"
    "f = open(\"/tmp/fd.log\", \"a\", buffering=1)\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1; f.write(str(n) + chr(10)); time.sleep(0.01)' >/dev/null 2>&1 &"
)


def _count(sbx) -> int:
    return int(sbx.files.read("/tmp/count").strip() or 0)


def _http_ok(sbx) -> bool:
    r = sbx.commands.run(
        "python3 -c 'import urllib.request as u; print(u.urlopen(\"http://127.0.0.1:8080\").status)'"
    )
    return r.stdout.strip() == "200"


def _busy_sandbox(new_sandbox):
    """A sandbox with a counter, files on disk and in /dev/shm, a process writing through
    an open fd and an http server."""
    sbx = new_sandbox(timeout=600)
    sbx.commands.run(COUNTER)
    sbx.files.write("/home/user/kept.txt", "on disk")
    sbx.commands.run("echo in-shm > /dev/shm/kept")
    sbx.commands.run(FD_WRITER)
    server = sbx.commands.run("python3 -m http.server 8080", background=True)
    harness.wait_until(lambda: _count(sbx) > 2, 10, what="the counter")
    harness.wait_until(lambda: _http_ok(sbx), 10, what="the http server")
    return sbx, server


def _assert_alive_as_snapshotted(copy, server_pid):
    before = _count(copy)
    harness.wait_until(lambda: _count(copy) > before, 10, what="the counter to go on")
    assert copy.files.read("/home/user/kept.txt") == "on disk"
    assert copy.commands.run("cat /dev/shm/kept").stdout == "in-shm\n"
    lines = copy.files.read("/tmp/fd.log").split()
    harness.wait_until(
        lambda: len(copy.files.read("/tmp/fd.log").split()) > len(lines),
        10,
        what="the open fd to be written again",
    )
    numbers = [int(x) for x in copy.files.read("/tmp/fd.log").split()]
    assert numbers == list(range(1, len(numbers) + 1)), "the writer went on where it stopped"
    assert server_pid in {p.pid for p in copy.commands.list()}
    assert _http_ok(copy), "the http server answers in the copy"


def _delete_all_snapshots(conn):
    paginator = Sandbox.list_snapshots(**conn)
    while paginator.has_next:
        for s in paginator.next_items():
            Sandbox.delete_snapshot(s.snapshot_id, **conn)


@pytest.fixture
def snapshots(conn):
    """Deletes every snapshot of the default key after the test."""
    yield
    _delete_all_snapshots(conn)


def test_snapshot_then_create_keeps_everything_and_diverges(new_sandbox, conn, snapshots):
    src, server = _busy_sandbox(new_sandbox)
    info = src.create_snapshot()
    assert info.snapshot_id.endswith(":default")
    assert info.names == []
    # The source runs on, as it was.
    assert src.get_info().state == SandboxState.RUNNING
    before = _count(src)
    harness.wait_until(lambda: _count(src) > before, 10, what="the source's counter")

    copy = new_sandbox(info.snapshot_id, timeout=120)
    assert copy.sandbox_id != src.sandbox_id
    assert copy.commands.run("hostname").stdout.strip() == copy.sandbox_id
    assert src.commands.run("hostname").stdout.strip() == src.sandbox_id
    _assert_alive_as_snapshotted(copy, server.pid)

    # Independent: writes in one are not seen in the other.
    copy.files.write("/home/user/kept.txt", "changed in the copy")
    src.commands.run("echo changed-in-source > /dev/shm/kept")
    assert src.files.read("/home/user/kept.txt") == "on disk"
    assert copy.commands.run("cat /dev/shm/kept").stdout == "in-shm\n"
    # Killing the source leaves the copy and the snapshot.
    src.kill()
    assert copy.commands.run("echo still").stdout == "still\n"
    again = new_sandbox(info.snapshot_id, timeout=60)
    assert again.files.read("/home/user/kept.txt") == "on disk"


def test_named_snapshots_list_and_delete(new_sandbox, conn, other_conn, snapshots):
    sbx = new_sandbox()
    named = sbx.create_snapshot(name="my-snap")
    assert named.snapshot_id == "my-snap:default"
    assert len(named.names) == 1 and named.names[0].endswith("/my-snap:default")
    unnamed = Sandbox.create_snapshot(sbx.sandbox_id, **conn)

    ids = [s.snapshot_id for s in sbx.list_snapshots().next_items()]
    assert set(ids) == {named.snapshot_id, unnamed.snapshot_id}
    listed = Sandbox.list_snapshots(name="my-snap", **conn).next_items()
    assert [s.snapshot_id for s in listed] == ["my-snap:default"]
    assert Sandbox.list_snapshots(**other_conn).next_items() == []

    # Pagination: one per page.
    paginator = Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id, limit=1, **conn)
    seen = []
    while paginator.has_next:
        seen += [s.snapshot_id for s in paginator.next_items()]
    assert sorted(seen) == sorted(ids)

    # The same name again is refused.
    with pytest.raises(SandboxException) as ei:
        sbx.create_snapshot(name="my-snap")
    assert "409" in str(ei.value)

    # Other keys can neither delete nor use it.
    assert Sandbox.delete_snapshot(named.snapshot_id, **other_conn) is False
    with pytest.raises(SandboxException):
        Sandbox.create(named.snapshot_id, **other_conn)
    assert Sandbox.delete_snapshot(named.snapshot_id, **conn) is True
    assert Sandbox.delete_snapshot(named.snapshot_id, **conn) is False
    with pytest.raises(SandboxException):
        Sandbox.create(named.snapshot_id, **conn)
    assert [s.snapshot_id for s in sbx.list_snapshots().next_items()] == [unnamed.snapshot_id]


def test_fork_makes_independent_running_copies(new_sandbox, conn):
    src, server = _busy_sandbox(new_sandbox)
    end_before = src.get_info().end_at
    forks = src.fork(count=5, timeout=120)
    assert len(forks) == 5
    errors = [f for f in forks if isinstance(f, Exception)]
    assert not errors, errors
    for f in forks:
        harness.track(f.sandbox_id)
    try:
        ids = {f.sandbox_id for f in forks}
        assert len(ids) == 5 and src.sandbox_id not in ids
        for i, f in enumerate(forks):
            assert f.commands.run("hostname").stdout.strip() == f.sandbox_id
            f.files.write("/home/user/who", f"fork {i}")
        _assert_alive_as_snapshotted(forks[0], server.pid)
        for i, f in enumerate(forks):
            assert f.files.read("/home/user/who") == f"fork {i}"
        # The source keeps its id, its deadline and its state.
        info = src.get_info()
        assert info.state == SandboxState.RUNNING
        assert info.end_at == end_before
        assert not src.files.exists("/home/user/who")
        # Forks leave no snapshot behind.
        assert src.list_snapshots().next_items() == []
    finally:
        for f in forks:
            harness.kill_quietly(f)


def test_rollback_restores_the_snapshot_in_place(new_sandbox, daemon, conn, snapshots):
    sbx, server = _busy_sandbox(new_sandbox)
    snap = sbx.create_snapshot(name="before-change")
    sbx.files.write("/home/user/kept.txt", "changed after the snapshot")
    sbx.commands.run("rm /dev/shm/kept")
    r = daemon.client().post(
        f"/sandboxes/{sbx.sandbox_id}/rollback", json={"snapshotID": snap.snapshot_id}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sandboxID"] == sbx.sandbox_id
    assert body["envdAccessToken"] == sbx._envd_access_token
    # Same Sandbox object keeps working: same id, same token.
    assert sbx.files.read("/home/user/kept.txt") == "on disk"
    _assert_alive_as_snapshotted(sbx, server.pid)
    assert sbx.commands.run("hostname").stdout.strip() == sbx.sandbox_id

    # A paused sandbox comes back running.
    sbx.files.write("/home/user/kept.txt", "changed again")
    assert sbx.pause() is True
    r = daemon.client().post(
        f"/sandboxes/{sbx.sandbox_id}/rollback", json={"snapshotID": "before-change"}
    )
    assert r.status_code == 200, r.text
    assert sbx.get_info().state == SandboxState.RUNNING
    assert sbx.files.read("/home/user/kept.txt") == "on disk"


def test_code_interpreter_state_survives_snapshot_and_create(conn, snapshots):
    from e2b_code_interpreter import Sandbox as CiSandbox

    src = harness.create_ci(conn)
    copy = None
    try:
        src.run_code("x = 41")
        snap = src.create_snapshot()
        copy = CiSandbox.create(snap.snapshot_id, **conn)
        harness.track(copy.sandbox_id)
        assert copy.run_code("x + 1").text == "42"
        copy.run_code("x = 0")
        assert src.run_code("x + 1").text == "42", "the source is independent"
    finally:
        harness.kill_quietly(src)
        if copy is not None:
            harness.kill_quietly(copy)


def test_a_paused_sandbox_can_be_snapshotted_and_stays_paused(new_sandbox, conn, snapshots):
    sbx = new_sandbox()
    sbx.files.write("/home/user/mark", "paused state")
    assert sbx.pause() is True
    snap = Sandbox.create_snapshot(sbx.sandbox_id, **conn)
    assert Sandbox.get_info(sbx.sandbox_id, **conn).state == SandboxState.PAUSED
    copy = new_sandbox(snap.snapshot_id, timeout=60)
    assert copy.files.read("/home/user/mark") == "paused state"


def test_bad_input(new_sandbox, daemon, conn, other_conn, other_key, snapshots):
    a = new_sandbox()
    b = new_sandbox()
    snap_b = b.create_snapshot(name="of-b")
    c = daemon.client()

    # Unknown snapshot: create and delete.
    with pytest.raises(SandboxException):
        Sandbox.create("no-such-snapshot:default", **conn)
    assert Sandbox.delete_snapshot("no-such-snapshot:default", **conn) is False
    # Another key's snapshot is as unknown.
    with pytest.raises(SandboxException) as ei:
        Sandbox.create(snap_b.snapshot_id, **other_conn)
    assert "404" in str(ei.value)
    # Snapshot of an unknown or another key's sandbox.
    with pytest.raises(SandboxNotFoundException):
        Sandbox.create_snapshot("nosuchsandbox", **conn)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.create_snapshot(a.sandbox_id, **other_conn)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.fork("nosuchsandbox", **conn)
    # Rollback to another sandbox's snapshot: 409 with a clear message; unknown: 404.
    r = c.post(f"/sandboxes/{a.sandbox_id}/rollback", json={"snapshotID": snap_b.snapshot_id})
    body = harness.assert_error_body(r, 409)
    assert "own snapshots" in body["message"], body
    r = c.post(f"/sandboxes/{a.sandbox_id}/rollback", json={"snapshotID": "nope:default"})
    harness.assert_error_body(r, 404)
    r = daemon.client(other_key).post(
        f"/sandboxes/{b.sandbox_id}/rollback", json={"snapshotID": snap_b.snapshot_id}
    )
    harness.assert_error_body(r, 404)
    # Malformed bodies.
    for path, body in [
        (f"/sandboxes/{a.sandbox_id}/snapshots", {"name": "Not Valid"}),
        (f"/sandboxes/{a.sandbox_id}/snapshots", {"bogus": 1}),
        (f"/sandboxes/{a.sandbox_id}/fork", {"count": 0}),
        (f"/sandboxes/{a.sandbox_id}/fork", {"count": 21}),
        (f"/sandboxes/{a.sandbox_id}/rollback", {}),
    ]:
        harness.assert_error_body(c.post(path, json=body), 400)
    harness.assert_error_body(
        c.post(f"/sandboxes/{a.sandbox_id}/snapshots", json={"memory": False}), 501
    )
    # The SDK refuses bad fork counts itself.
    with pytest.raises(Exception):
        a.fork(count=21)
    # A killed sandbox: pause, snapshot, fork, rollback are 404; its snapshots stay.
    b.kill()
    with pytest.raises(SandboxNotFoundException):
        b.pause()
    with pytest.raises(SandboxNotFoundException):
        b.create_snapshot()
    harness.assert_error_body(
        c.post(f"/sandboxes/{b.sandbox_id}/rollback", json={"snapshotID": snap_b.snapshot_id}), 404
    )
    assert [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=b.sandbox_id, **conn).next_items()] == [
        snap_b.snapshot_id
    ]
    # Nothing of this changed a.
    assert a.get_info().state == SandboxState.RUNNING
    assert a.commands.run("echo ok").stdout == "ok\n"


def test_concurrent_snapshots_forks_and_rollbacks(new_sandbox, daemon, conn, snapshots):
    sandboxes = []
    with ThreadPoolExecutor(10) as pool:
        sandboxes = list(pool.map(lambda _: new_sandbox(timeout=600), range(10)))
        for i, s in enumerate(sandboxes):
            s.files.write("/home/user/n", str(i))

        # Snapshots of 10 sandboxes at once.
        t = time.perf_counter()
        snaps = list(pool.map(lambda s: s.create_snapshot(), sandboxes))
        snap_s = time.perf_counter() - t
        assert len({s.snapshot_id for s in snaps}) == 10

        # Rollbacks of the 10 at once, after each changed its file.
        for s in sandboxes:
            s.files.write("/home/user/n", "changed")
        c = daemon.client()

        def rollback(pair):
            sbx, snap = pair
            r = c.post(f"/sandboxes/{sbx.sandbox_id}/rollback", json={"snapshotID": snap.snapshot_id})
            assert r.status_code == 200, r.text
            return sbx

        t = time.perf_counter()
        list(pool.map(rollback, zip(sandboxes, snaps)))
        rollback_s = time.perf_counter() - t
        for i, s in enumerate(sandboxes):
            assert s.files.read("/home/user/n") == str(i)

        # 20 forks of one sandbox, two requests of 10 at once.
        src = sandboxes[0]
        t = time.perf_counter()
        results = [f for batch in pool.map(lambda _: src.fork(count=10, timeout=120), range(2)) for f in batch]
        fork_s = time.perf_counter() - t
    forks = [f for f in results if not isinstance(f, Exception)]
    for f in forks:
        harness.track(f.sandbox_id)
    try:
        assert len(forks) == 20, [f for f in results if isinstance(f, Exception)]
        assert len({f.sandbox_id for f in forks}) == 20
        for f in forks:
            assert f.files.read("/home/user/n") == "0"
    finally:
        for f in forks:
            harness.kill_quietly(f)
    harness.MEASUREMENTS.append(
        f"snapshots: 10 at once {snap_s:.2f} s, 10 rollbacks at once {rollback_s:.2f} s, "
        f"20 forks (2 requests of 10 at once) {fork_s:.2f} s"
    )
