"""commands.* through the SDK (brief item 2). The module shares one sandbox, created
with envs SBX_LEVEL=from-create and SBX_SPACES="a b  c" (see conftest.sandbox)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from e2b import (
    AsyncSandbox,
    CommandExitException,
    InvalidArgumentException,
    Sandbox,
    SandboxException,
    TimeoutException,
)

import harness


def _pids(sbx) -> set[int]:
    return {p.pid for p in sbx.commands.list()}


def test_foreground_stdout_stderr_exit_code(sandbox):
    r = sandbox.commands.run("echo out; echo err >&2; printf 'no newline'")
    assert r.exit_code == 0
    assert r.stdout == "out\nno newline"
    assert r.stderr == "err\n"
    assert r.error is None


def test_failing_command_raises_with_exit_code_and_stderr(sandbox):
    with pytest.raises(CommandExitException) as ei:
        sandbox.commands.run("echo partial; echo boom >&2; exit 3")
    e = ei.value
    assert e.exit_code == 3
    assert e.stderr == "boom\n"
    assert e.stdout == "partial\n"
    assert "3" in (e.error or "")


def test_command_not_found_is_127(sandbox):
    with pytest.raises(CommandExitException) as ei:
        sandbox.commands.run("definitely-not-a-command-xyz")
    assert ei.value.exit_code == 127
    assert "not found" in ei.value.stderr


def test_envs_and_cwd(sandbox):
    r = sandbox.commands.run(
        'echo "$FOO|$SBX_LEVEL"; pwd', envs={"FOO": "bar baz", "SBX_LEVEL": "overridden"}, cwd="/tmp"
    )
    assert r.stdout == "bar baz|overridden\n/tmp\n"
    assert sandbox.commands.run("pwd").stdout == "/home/user\n"


def test_missing_cwd_is_an_error(sandbox):
    with pytest.raises((InvalidArgumentException, SandboxException)) as ei:
        sandbox.commands.run("pwd", cwd="/no/such/dir")
    assert "/no/such/dir" in str(ei.value)


def test_sandbox_envs_visible_in_commands(sandbox):
    assert sandbox.commands.run('echo "$SBX_LEVEL"').stdout == "from-create\n"
    assert sandbox.commands.run('echo "[$SBX_SPACES]"').stdout == "[a b  c]\n"
    assert sandbox.commands.run('echo "$SBX_LEVEL"', user="root").stdout == "from-create\n"


def test_users(sandbox):
    r = sandbox.commands.run("id -u; whoami; echo $HOME")
    assert r.stdout == "1000\nuser\n/home/user\n"
    r = sandbox.commands.run("id -u; whoami; echo $HOME", user="root")
    assert r.stdout == "0\nroot\n/root\n"
    # files created by a command belong to its user
    sandbox.commands.run("touch /tmp/owned-by-root", user="root")
    assert sandbox.files.get_info("/tmp/owned-by-root").owner == "root"


def test_background_list_connect_kill(sandbox, conn):
    marker = f"cbt-bg-{uuid.uuid4().hex[:8]}"
    handle = sandbox.commands.run(
        f"while true; do echo tick {marker}; sleep 0.2; done", background=True
    )
    assert handle.pid > 0
    listed = {p.pid: p for p in sandbox.commands.list()}
    assert handle.pid in listed
    assert listed[handle.pid].cmd == "/bin/bash"
    assert any(marker in a for a in listed[handle.pid].args)

    # a second SDK object for the same sandbox, as another client would get it
    other = Sandbox.connect(sandbox.sandbox_id, **conn)
    attached = other.commands.connect(handle.pid)
    assert attached.pid == handle.pid
    # it receives live output
    seen = ""
    deadline = time.monotonic() + 10
    for stdout, _stderr, _pty in attached:
        seen += stdout or ""
        if f"tick {marker}" in seen or time.monotonic() > deadline:
            break
    assert f"tick {marker}" in seen

    assert other.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as ei:
        attached.wait()
    assert ei.value.exit_code != 0
    harness.wait_until(lambda: handle.pid not in _pids(sandbox), 10, what="killed pid to leave the list")
    assert other.commands.kill(handle.pid) is False
    assert sandbox.commands.kill(handle.pid) is False


def test_connect_to_unknown_pid_fails(sandbox):
    with pytest.raises(SandboxException):
        sandbox.commands.connect(999_999)


def test_stdin(sandbox):
    handle = sandbox.commands.run("cat; echo done-$?", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "hello\n")
    handle.send_stdin(b"bytes too\n")
    sandbox.commands.close_stdin(handle.pid)
    r = handle.wait()
    assert r.stdout == "hello\nbytes too\ndone-0\n"


def test_stdin_is_closed_by_default(sandbox):
    # without stdin=True the command reads EOF at once instead of hanging
    r = sandbox.commands.run("cat; echo eof", timeout=10)
    assert r.stdout == "eof\n"


def test_output_callbacks(sandbox):
    out: list[str] = []
    err: list[str] = []
    r = sandbox.commands.run(
        "echo a; sleep 0.1; echo b >&2; sleep 0.1; echo c",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert "".join(out) == "a\nc\n" == r.stdout
    assert "".join(err) == "b\n" == r.stderr
    assert len(out) >= 2, "stdout arrived in one chunk although it was written 0.2 s apart"


def test_command_timeout(sandbox):
    marker = f"cbt-timeout-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run(f"sleep 10 # {marker}", timeout=1)
    took = time.monotonic() - t0
    assert took < 5, f"timeout=1 took {took:.1f}s to raise"

    # envd kills the process when the deadline passes
    def still_running():
        return [p for p in sandbox.commands.list() if any(marker in a for a in p.args)]

    harness.wait_until(lambda: not still_running(), 5, what="the timed-out command to be killed")


def test_large_output(sandbox):
    r = sandbox.commands.run("head -c 5000000 /dev/zero | tr '\\0' a; echo; seq 1 20000 >&2")
    assert len(r.stdout) == 5_000_001 and r.stdout.count("a") == 5_000_000
    assert r.stderr.splitlines()[-1] == "20000"


def test_unicode_and_binary_output(sandbox):
    r = sandbox.commands.run("printf 'h\\xc3\\xa9llo \\xe2\\x9c\\x93\\n'")
    assert r.stdout == "héllo ✓\n"


def test_concurrent_commands(sandbox):
    handles = [sandbox.commands.run(f"sleep 0.3; echo {i}", background=True) for i in range(8)]
    assert [h.wait().stdout for h in handles] == [f"{i}\n" for i in range(8)]


def test_async_commands(sandbox, conn):
    async def scenario():
        sbx = await AsyncSandbox.connect(sandbox.sandbox_id, **conn)
        out: list[str] = []
        r = await sbx.commands.run("echo one; echo two", on_stdout=out.append)
        assert r.stdout == "one\ntwo\n" and "".join(out) == r.stdout
        handle = await sbx.commands.run("sleep 30", background=True)
        assert handle.pid in {p.pid for p in await sbx.commands.list()}
        assert await sbx.commands.kill(handle.pid) is True
        with pytest.raises(CommandExitException):
            await handle.wait()
        assert await sbx.commands.kill(handle.pid) is False
        with pytest.raises(CommandExitException) as ei:
            await sbx.commands.run("exit 7")
        assert ei.value.exit_code == 7

    asyncio.run(scenario())


def test_env_var_over_the_execve_limit(conn):
    """A single NAME=value over 128 KiB (Linux MAX_ARG_STRLEN) cannot be passed to any
    process. Create must refuse it (400), or commands must still work; a 201 followed
    by every command failing with E2BIG is a broken sandbox."""
    try:
        sbx = harness.create(conn, timeout=60, envs={"BIG": "x" * 140_000})
    except SandboxException as e:
        assert "400" in str(e), e
        return
    try:
        r = sbx.commands.run('echo "${#BIG}"')
        assert r.stdout == "140000\n"
    except SandboxException as e:
        pytest.fail(f"create accepted a 140 KB env var (201) but commands fail: {e}")
    finally:
        harness.kill_quietly(sbx)
