"""Robustness (brief item 12): create/kill under concurrency, a daemon killed with
SIGKILL and restarted on the same data dir, and daemons on different data dirs.

These tests run their own daemons (not the session's): they count everything on their
data dir and kill the daemon on purpose.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox, SandboxNotFoundException, SandboxQuery, SandboxState

import harness

CYCLES = int(os.environ.get("CUBICLE_STRESS_CYCLES", "500"))
CONCURRENCY = int(os.environ.get("CUBICLE_STRESS_CONCURRENCY", "20"))


@pytest.fixture(scope="module")
def own_daemon(daemon):
    """A daemon of this module's own (the session daemon must hold no sandboxes now,
    see harness.Daemon.start)."""
    d = harness.Daemon("cbr")
    try:
        d.start()
    except Exception:
        d.force_cleanup()
        raise
    yield d
    problems = d.kill_all() if d.alive() else [f"the daemon was not running at teardown"]
    try:
        d.stop()
    except RuntimeError as e:
        problems.append(str(e))
    problems += d.leaks(harness.SEEN_IDS)
    if problems:
        log = d.force_cleanup()
        pytest.fail(f"robustness daemon teardown (log kept in {log}):\n  " + "\n  ".join(problems), pytrace=False)
    d.cleanup()


def test_create_kill_cycles_under_concurrency(own_daemon):
    conn = own_daemon.conn(own_daemon.create_key("stress"))
    create_s: list[float] = []
    health_s: list[float] = []
    kill_s: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def cycle(i: int) -> None:
        try:
            t0 = time.perf_counter()
            sbx = Sandbox.create(timeout=120, metadata={"cycle": str(i)}, **conn)
            t1 = time.perf_counter()
            harness.track(sbx.sandbox_id)
            running = sbx.is_running()
            t2 = time.perf_counter()
            killed = sbx.kill()
            t3 = time.perf_counter()
            with lock:
                create_s.append(t1 - t0)
                health_s.append(t2 - t1)
                kill_s.append(t3 - t2)
                if not running:
                    errors.append(f"cycle {i}: {sbx.sandbox_id} not running after create")
                if killed is not True:
                    errors.append(f"cycle {i}: kill returned {killed!r}")
        except Exception as e:  # noqa: BLE001 - collect every failure
            with lock:
                errors.append(f"cycle {i}: {type(e).__name__}: {e}")

    # a serial baseline first: latency without queueing
    for i in range(20):
        cycle(-1 - i)
    serial = (list(create_s), list(health_s), list(kill_s))
    create_s.clear(), health_s.clear(), kill_s.clear()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(cycle, range(CYCLES)))
    wall = time.perf_counter() - t0

    def ms(v: list[float], p: float) -> str:
        return f"{harness.percentile(v, p) * 1000:.0f}"

    harness.MEASUREMENTS.append(
        "stress: serial baseline (20 cycles): "
        + ", ".join(f"{n} p50 {ms(v, 50)} ms" for n, v in zip(("create", "is_running", "kill"), serial))
    )
    harness.MEASUREMENTS.append(
        f"stress: {CYCLES} create/is_running/kill cycles through the SDK at concurrency {CONCURRENCY}: "
        f"wall {wall:.1f}s ({CYCLES / wall:.1f} cycles/s), {len(errors)} failures"
    )
    for name, v in (("create", create_s), ("is_running", health_s), ("kill", kill_s)):
        if v:
            harness.MEASUREMENTS.append(
                f"stress: {name:<10} p50 {ms(v, 50)} ms, p90 {ms(v, 90)} ms, p99 {ms(v, 99)} ms, "
                f"max {ms(v, 100)} ms, mean {statistics.mean(v) * 1000:.0f} ms"
            )
    assert not errors, f"{len(errors)} of {CYCLES} cycles failed:\n  " + "\n  ".join(errors[:20])
    assert len(create_s) == CYCLES and len(serial[0]) == 20
    # no leaks: the daemon lists nothing, no sandbox dirs, no cgroups
    assert own_daemon.list_ids(conn["api_key"]) == []
    leaks = own_daemon.leaks(harness.SEEN_IDS)
    assert not leaks, "\n".join(leaks[:20])


COUNTER = (
    "i=0; while true; do i=$((i+1)); echo $i > /home/user/counter.tmp; "
    "mv /home/user/counter.tmp /home/user/counter; sleep 0.1; done"
)


def _counter(sbx) -> int:
    return int(sbx.files.read("/home/user/counter").strip())


def test_daemon_restart_after_sigkill(own_daemon):
    d = own_daemon
    conn = d.conn(d.create_key("restart"))
    s1 = Sandbox.create(timeout=600, metadata={"role": "counter"}, **conn)
    s2 = Sandbox.create(timeout=600, metadata={"role": "idle"}, **conn)
    s3 = Sandbox.create(timeout=600, metadata={"role": "victim"}, **conn)
    s4 = Sandbox.create(timeout=3, metadata={"role": "expires-while-down"}, **conn)
    s4_deadline = time.monotonic() + 3
    all_ids = [s.sandbox_id for s in (s1, s2, s3, s4)]
    harness.track(*all_ids)
    try:
        loop = s1.commands.run(COUNTER, background=True)
        harness.wait_until(lambda: _counter(s1) > 2, 10, what="the counter to start")
        s2.files.write("/home/user/keep.txt", "kept across restarts")
        tokens = {s.sandbox_id: s._envd_access_token for s in (s1, s2)}
        victim_pid = d.runtime_record(s3.sandbox_id)["pid"]
        agent_pids = {s.sandbox_id: d.runtime_record(s.sandbox_id)["pid"] for s in (s1, s2)}
        before = _counter(s1)

        d.kill9()
        assert not d.alive()
        # the sandboxes do not depend on the daemon
        for sid, pid in agent_pids.items():
            assert harness.pid_alive(pid), f"{sid}'s agent died with the daemon"
        os.kill(victim_pid, signal.SIGKILL)  # killed behind the daemon's back
        harness.wait_until(lambda: not harness.pid_alive(victim_pid), 10, what="the victim's agent to die")
        # let s4's deadline pass while the daemon is down
        time.sleep(max(0.0, s4_deadline + 0.5 - time.monotonic()))

        d.start()

        running = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING]), **conn).next_items()
        listed = {s.sandbox_id: s for s in running}
        assert s1.sandbox_id in listed and s2.sandbox_id in listed, sorted(listed)
        assert listed[s1.sandbox_id].metadata == {"role": "counter"}
        assert s3.sandbox_id not in listed, "a sandbox killed while the daemon was down is still listed"
        with pytest.raises(SandboxNotFoundException):
            Sandbox.get_info(s3.sandbox_id, **conn)
        assert Sandbox.kill(s3.sandbox_id, **conn) is False
        assert not s3.is_running()
        # s4 expired while the daemon was down: it goes at (or right after) the restart
        def s4_gone():
            try:
                Sandbox.get_info(s4.sandbox_id, **conn)
                return False
            except SandboxNotFoundException:
                return True

        harness.wait_until(s4_gone, 10, what="the sandbox that expired during the downtime to go")

        # the survivors answer through the SDK, with the same envd tokens
        again = Sandbox.connect(s1.sandbox_id, **conn)
        assert again._envd_access_token == tokens[s1.sandbox_id]
        after = _counter(s1)  # the old Sandbox object (old token) still works
        assert after > before, f"counter did not move across the restart ({before} -> {after})"
        harness.wait_until(lambda: _counter(again) > after, 5, what="the counter to keep increasing")
        assert loop.pid in {p.pid for p in again.commands.list()}
        assert s2.files.read("/home/user/keep.txt") == "kept across restarts"
        assert s2.commands.run("echo alive").stdout == "alive\n"
        info = s2.get_info()
        assert info.state == SandboxState.RUNNING
        assert (info.end_at - info.started_at).total_seconds() > 590, "restart changed the deadline"
        assert s2.get_metrics(), "no metrics for an adopted sandbox"
        # raw: the token from before the crash is accepted, a wrong one is not
        with httpx.Client(base_url=d.url, headers={"E2b-Sandbox-Id": s2.sandbox_id}) as c:
            r = c.get("/files", params={"path": "/home/user/keep.txt"}, headers={"X-Access-Token": tokens[s2.sandbox_id]})
            assert r.status_code == 200
            r = c.get("/files", params={"path": "/home/user/keep.txt"}, headers={"X-Access-Token": "x"})
            assert r.status_code == 401
        # the victim and the expired sandbox left nothing behind
        assert not {s3.sandbox_id, s4.sandbox_id} & d.sandbox_dirs()
        assert not harness.cgroups_of([s3.sandbox_id, s4.sandbox_id])

        # the adopted sandboxes can be killed normally
        assert s1.kill() is True
        assert s2.kill() is True
        assert Sandbox.list(**conn).next_items() == []
        leaks = d.leaks(all_ids)
        assert not leaks, "\n".join(leaks)
    finally:
        if d.alive():
            for s in (s1, s2, s3, s4):
                harness.kill_quietly(s)


def test_graceful_restart_keeps_sandboxes(own_daemon):
    d = own_daemon
    conn = d.conn(d.create_key("graceful"))
    sbx = Sandbox.create(timeout=300, **conn)
    harness.track(sbx.sandbox_id)
    try:
        sbx.files.write("/home/user/x", "1")
        assert d.stop() == 0, "SIGTERM should stop the daemon cleanly"
        d.start()
        assert sbx.files.read("/home/user/x") == "1"
        assert [s.sandbox_id for s in Sandbox.list(**conn).next_items()] == [sbx.sandbox_id]
    finally:
        harness.kill_quietly(sbx)
    assert not d.leaks([sbx.sandbox_id])


def test_sigterm_stops_the_daemon_despite_open_streams(own_daemon):
    """`cubicle serve` runs "until SIGINT or SIGTERM". A client streaming a long command
    (timeout=0, as the SDK allows) must not keep it from stopping; the sandbox and its
    command survive the restart (a client disconnect does not kill the process)."""
    d = own_daemon
    conn = d.conn()
    sbx = Sandbox.create(timeout=300, **conn)
    harness.track(sbx.sandbox_id)
    marker = "cbt-sigterm-stream"
    streaming = threading.Thread(
        target=lambda: _ignore(lambda: sbx.commands.run(f"sleep 600 # {marker}", timeout=0)), daemon=True
    )
    try:
        streaming.start()
        harness.wait_until(
            lambda: any(marker in " ".join(p.args) for p in sbx.commands.list()), 10, what="the command to start"
        )
        t0 = time.monotonic()
        try:
            d.stop(timeout=10)
            stopped = time.monotonic() - t0
        except RuntimeError:
            stopped = None  # stop() fell back to SIGKILL
        d.start()
        assert sbx.sandbox_id in d.list_ids(), d.log_tail(30)
        try:
            listed = sbx.commands.list()
        except Exception as e:
            pid = d.runtime_record(sbx.sandbox_id)["pid"]
            raise AssertionError(
                f"the adopted sandbox does not answer through the proxy: {e!r}\n"
                f"agent pid {pid} alive={harness.pid_alive(pid)}\n--- daemon log:\n{d.log_tail(25)}\n"
                f"--- agent log:\n{d.agent_log(sbx.sandbox_id)}"
            ) from e
        assert any(marker in " ".join(p.args) for p in listed), "the command died with the daemon"
        assert stopped is not None, "cubicle serve did not exit within 10 s of SIGTERM while a command stream was open"
    finally:
        if not d.alive():
            d.start()
        harness.kill_quietly(sbx)


def _ignore(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - the stream breaks when the daemon stops
        pass


def test_second_daemon_start_spares_other_data_dirs(daemon):
    """Two daemons on two data dirs (e.g. /var/lib/cubicle and a test dir, or two
    users' dirs) must not touch each other's sandboxes. Starting B must leave A's
    running sandbox alone."""
    a = harness.Daemon("cba")
    b = harness.Daemon("cbb")
    sbx = None
    try:
        a.start()
        sbx = Sandbox.create(timeout=120, **a.conn())
        harness.track(sbx.sandbox_id)
        pid = a.runtime_record(sbx.sandbox_id)["pid"]
        b.start()
        alive = harness.pid_alive(pid)
        cgroups = harness.cgroups_of([sbx.sandbox_id])
        answers = sbx.is_running()
        still_listed = sbx.sandbox_id in a.list_ids()
        assert alive and cgroups and answers, (
            f"starting a daemon on {b.data} destroyed sandbox {sbx.sandbox_id} of {a.data}: "
            f"agent alive={alive}, cgroups left={len(cgroups)}, is_running={answers}, "
            f"daemon A still lists it as running={still_listed}; "
            f"B's log: {[l for l in b.log_tail(60).splitlines() if sbx.sandbox_id in l]}"
        )
    finally:
        b.stop()
        if sbx is not None and a.alive():
            harness.kill_quietly(sbx)
        a.stop()
        leftovers = a.leaks([sbx.sandbox_id] if sbx else []) + b.leaks()
        # a sandbox destroyed by B leaves A's directory behind: clean up so the host
        # stays clean, but keep the failure above
        a.force_cleanup()
        b.force_cleanup()
        for d in (a, b):
            Path(f"{d.data}.daemon.log").unlink(missing_ok=True)
        assert not harness.cgroups_of([sbx.sandbox_id] if sbx else []), leftovers
