"""The bash kernel, driven through real pipes."""

import os
import signal
import time

import kernel_harness as harness
from kernel_harness import by_type, stdout_text, stderr_text


def test_ready(bash):
    assert bash.ready_event == {"type": "ready", "pid": bash.pid, "language": "bash"}


def test_hello(bash):
    events = bash.execute("echo hello world")
    assert [e["type"] for e in events] == ["stdout", "number_of_executions", "end_of_execution"]
    assert events[0]["text"] == "hello world\n"


def test_variables_functions_and_cwd_persist(bash, tmp_path):
    assert stdout_text(bash.execute("pwd")) == bash.start_cwd + "\n"
    bash.execute("NAME=world; greet() { echo \"hello $1\"; }; cd %s" % tmp_path)
    events = bash.execute("greet $NAME; pwd")
    assert stdout_text(events) == "hello world\n%s\n" % tmp_path
    bash.execute("alias hi='echo hi there'")
    assert stdout_text(bash.execute("hi")) == "hi there\n"


def test_stderr_and_exit_status(bash):
    events = bash.execute("echo out; echo err >&2; exit_with() { return $1; }; exit_with 3")
    assert stdout_text(events) == "out\n"
    assert stderr_text(events) == "err\n"
    err = by_type(events, "error")[0]
    assert (err["name"], err["value"]) == ("ExitCode", "3")
    assert events[-1]["type"] == "end_of_execution"
    assert by_type(bash.execute("true"), "error") == []
    err = by_type(bash.execute("ls /definitely/not/here"), "error")[0]
    assert err["value"] == "2"


def test_only_the_last_status_counts(bash):
    assert by_type(bash.execute("false; echo fine"), "error") == []


def test_syntax_error(bash):
    events = bash.execute("if then")
    assert "syntax error" in stderr_text(events)
    assert by_type(events, "error")[0]["name"] == "ExitCode"
    assert stdout_text(bash.execute("echo ok")) == "ok\n"


def test_streaming(bash):
    started = time.monotonic()
    timed = bash.execute("for i in 1 2 3; do echo $i; sleep 0.3; done", timed=True)
    outs = [(t - started, e["text"]) for t, e in timed if e["type"] == "stdout"]
    end = [t - started for t, e in timed if e["type"] == "end_of_execution"][0]
    assert "".join(text for _, text in outs) == "1\n2\n3\n"
    assert outs[0][0] < end - 0.5


def test_env(bash):
    bash.execute("unset CUBICLE_B; export CUBICLE_C=orig")
    events = bash.execute('echo "$CUBICLE_B $CUBICLE_C"; sh -c \'echo "child $CUBICLE_B"\'',
                          env={"CUBICLE_B": "it's set", "CUBICLE_C": "new"})
    assert stdout_text(events) == "it's set new\nchild it's set\n"
    assert stdout_text(bash.execute('echo "${CUBICLE_B-unset} $CUBICLE_C"')) == "unset orig\n"
    assert stdout_text(bash.execute("sh -c 'echo $CUBICLE_C'")) == "orig\n"  # still exported


def test_stdin_is_empty(bash):
    assert stdout_text(bash.execute("cat; read x || echo eof")) == "eof\n"


def test_interrupt_sleep(bash):
    bash.send({"op": "execute", "id": "sleepy", "code": "echo before\nsleep 100\necho after", "env": {}})
    time.sleep(0.5)
    started = time.monotonic()
    bash.signal(signal.SIGINT)
    events = bash.collect("sleepy", timeout=10)
    assert time.monotonic() - started < 5
    assert stdout_text(events) == "before\n"
    assert by_type(events, "error")[0]["name"] == "KeyboardInterrupt"
    assert stdout_text(bash.execute("echo $NAME")) == "world\n"  # same shell, state kept


def test_interrupt_unwinds_functions_and_loops(bash):
    code = "f() { sleep 100; echo in-f; }\nf\necho after-f\nwhile true; do :; done"
    bash.send({"op": "execute", "id": "nested", "code": code, "env": {}})
    time.sleep(0.5)
    bash.signal(signal.SIGINT)
    events = bash.collect("nested", timeout=10)
    assert stdout_text(events) == ""
    assert by_type(events, "error")[0]["name"] == "KeyboardInterrupt"
    bash.send({"op": "execute", "id": "loop", "code": "while true; do :; done", "env": {}})
    time.sleep(0.3)
    bash.signal(signal.SIGINT)
    assert by_type(bash.collect("loop", timeout=10), "error")[0]["name"] == "KeyboardInterrupt"
    # The next execution is not affected by the interrupt.
    assert stdout_text(bash.execute("echo next; true")) == "next\n"


def test_exit_restarts_bash(bash):
    events = bash.execute("exit 4")
    assert by_type(events, "error")[0]["value"] == "4"
    assert "new shell" in stderr_text(events)
    assert stdout_text(bash.execute("echo ${NAME-gone}")) == "gone\n"


def test_background_output_while_idle_goes_to_raw_stdout(bash):
    before = len(bash.stdout)
    events = bash.execute("(sleep 0.3; echo late-line) &")
    assert stdout_text(events) == ""
    deadline = time.monotonic() + 5
    while b"late-line" not in bytes(bash.stdout[before:]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"late-line\n" in bytes(bash.stdout[before:])


def test_unicode_and_partial_lines(bash):
    events = bash.execute("printf 'é€'; printf '😀'")
    assert stdout_text(events) == "é€😀"


def test_large_output(bash):
    events = bash.execute("head -c 20000000 /dev/zero | tr '\\0' x")
    outs = by_type(events, "stdout")
    assert sum(len(e["text"]) for e in outs) == 20000000
    assert max(len(e["text"]) for e in outs) <= 64 * 1024


def test_closing_requests_stops_the_kernel():
    kernel = harness.start_kernel(harness.bash_argv())
    kernel.execute("sleep 30 &")
    status = harness.stop(kernel)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
