"""The Python zygote: forks kernels whose fds arrive over the control socket (fd 4)."""

import os
import signal
import socket
import statistics
import time

import kernel_harness as harness
from kernel_harness import by_type
from kernel_harness import record_metric


def main_text(events):
    return [e for e in by_type(events, "result") if e["is_main_result"]][0]["text"]


def test_zygote_is_ready_and_single_threaded(zygote):
    assert zygote.kernel.ready_event == {"type": "ready", "pid": zygote.pid, "language": "python"}
    assert len(os.listdir("/proc/%d/task" % zygote.pid)) == 1
    record_metric("zygote: start to ready", "%.0f ms" % (zygote.start_seconds * 1000))


def test_thread_limits_are_not_visible_to_user_code(zygote):
    kernel, _ = zygote.fork()
    try:
        text = main_text(kernel.execute("import os\n[k for k in os.environ if k.endswith('_NUM_THREADS')]"))
        assert text == "[]"
    finally:
        harness.stop(kernel)


def test_three_isolated_contexts(zygote):
    kernels = [zygote.fork()[0] for _ in range(3)]
    try:
        pids = [k.pid for k in kernels]
        assert len(set(pids)) == 3 and zygote.pid not in pids
        for kernel in kernels:
            assert kernel.ready_event["pid"] == kernel.pid
            events = kernel.execute("import os\nos.getpid()")
            assert main_text(events) == str(kernel.pid)
            # Re-parented: the parent is the subreaper (this test process), not the zygote.
            assert harness.ppid_of(kernel.pid) == os.getpid()
            # Its own session and process group.
            assert main_text(kernel.execute("os.getsid(0) == os.getpid() == os.getpgrp()")) == "True"
        kernels[0].execute("secret = 'only in the first'")
        assert main_text(kernels[0].execute("secret")) == "only in the first"
        for other in kernels[1:]:
            events = other.execute("secret")
            assert by_type(events, "error")[0]["name"] == "NameError"
        # Execution counts are per context.
        counts = [by_type(k.execute("1"), "number_of_executions")[0]["execution_count"] for k in kernels]
        assert counts[1] == counts[2]
        # Random state is not shared between forks.
        randoms = {main_text(k.execute("import numpy as np, random\n(np.random.rand(), random.random())")) for k in kernels}
        assert len(randoms) == 3
    finally:
        for kernel in kernels:
            harness.stop(kernel)


def test_fork_with_cwd_and_env(zygote, tmp_path):
    kernel, _ = zygote.fork(cwd=str(tmp_path), env={"CUBICLE_FORK_VAR": "yes"})
    try:
        assert main_text(kernel.execute("import os\nos.getcwd()")) == str(tmp_path)
        assert main_text(kernel.execute("os.environ['CUBICLE_FORK_VAR']")) == "yes"
    finally:
        harness.stop(kernel)


def test_forked_kernel_runs_everything(zygote):
    kernel, _ = zygote.fork()
    try:
        assert main_text(kernel.execute("1+1")) == "2"
        events = kernel.execute("import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [1, 2])\nplt.show()")
        chart = [e for e in by_type(events, "result") if "chart" in e][0]["chart"]
        assert chart["type"] == "bar"
        events = kernel.execute("print('hi'); 1/0")
        assert [e["type"] for e in events] == ["stdout", "error", "number_of_executions", "end_of_execution"]
        kernel.send({"op": "execute", "id": "spin", "code": "while True: pass", "env": {}})
        time.sleep(0.3)
        kernel.signal(signal.SIGINT)
        assert by_type(kernel.collect("spin"), "error")[0]["name"] == "KeyboardInterrupt"
        assert main_text(kernel.execute("'ok'")) == "ok"
    finally:
        harness.stop(kernel)


def test_forked_kernel_owns_the_files_zygote_objects_keep_open(zygote, tmp_path):
    """Objects of the zygote keep files open (IPython's `devnull`, for one). A fork gets
    them reopened on descriptions of its own, on the same numbers: files that user code
    opens never take those numbers, and the objects keep working."""
    kernel, _ = zygote.fork()
    try:
        code = (
            "import os, IPython.utils.io as iio\n"
            "files = [open(os.path.join(%r, 'f%%d' %% i), 'w') for i in range(20)]\n"
            "held = iio.devnull.fileno()\n"
            "iio.devnull.write('x'); iio.devnull.flush()\n"
            "(os.readlink('/proc/self/fd/%%d' %% held), held in [f.fileno() for f in files])"
        ) % str(tmp_path)
        assert main_text(kernel.execute(code)) == "('/dev/null', False)"
        # Nothing written to the user's files through the zygote's objects.
        assert all(os.path.getsize(tmp_path / ("f%d" % i)) == 0 for i in range(20))
    finally:
        harness.stop(kernel)


def test_killed_forked_kernel_closes_its_events(zygote):
    kernel, _ = zygote.fork()
    kernel.send({"op": "execute", "id": "bye", "code": "import os\nos._exit(1)", "env": {}})
    assert kernel.events_closed.wait(10)
    status = harness.reap(kernel.pid, 10)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1
    # The zygote is unaffected.
    other, _ = zygote.fork()
    assert main_text(other.execute("2")) == "2"
    harness.stop(other)


def test_fork_without_fds_fails_cleanly(zygote):
    # fds with the wrong count: the zygote answers fork_failed and keeps serving.
    r, w = os.pipe()
    zygote.kernel.send({"op": "fork", "id": "bad"})
    socket.send_fds(zygote.control, [b"F"], [r, w])
    os.close(r)
    os.close(w)
    while True:
        _, event = zygote.kernel.next_event(10)
        if event.get("id") == "bad":
            break
    assert event["type"] == "fork_failed"
    kernel, _ = zygote.fork()
    harness.stop(kernel)


def test_fork_latency_and_memory(zygote):
    latencies = []
    kernels = []
    try:
        for _ in range(20):
            kernel, seconds = zygote.fork()
            kernels.append(kernel)
            latencies.append(seconds)
        median = statistics.median(latencies)
        record_metric("zygote: fork request to kernel ready (20 forks)",
                      "median %.1f ms, min %.1f ms, max %.1f ms"
                      % (median * 1000, min(latencies) * 1000, max(latencies) * 1000))
        assert median < 0.05
        time.sleep(0.3)
        idle = kernels[0]
        zygote_pss = harness.pss_kib(zygote.pid)
        kernel_pss = harness.pss_kib(idle.pid)
        used = kernels[1]
        used.execute("import pandas as pd, matplotlib.pyplot as plt\n"
                     "df = pd.DataFrame({'a': range(1000)})\nplt.plot(df.a)\nplt.show()")
        used_pss = harness.pss_kib(used.pid)
        record_metric("PSS with 21 live forks", "zygote %d KiB, idle forked kernel %d KiB, "
                      "kernel after a pandas+plot cell %d KiB" % (zygote_pss, kernel_pss, used_pss))
        with open("/proc/%d/smaps_rollup" % zygote.pid) as f:
            rss = [int(line.split()[1]) for line in f if line.startswith("Rss:")][0]
        record_metric("zygote RSS", "%d KiB" % rss)
        assert kernel_pss < rss / 3
        started = time.monotonic()
        idle.execute("1+1")
        record_metric("forked kernel: first `1+1` round trip", "%.2f ms" % ((time.monotonic() - started) * 1000))
    finally:
        for kernel in kernels:
            harness.stop(kernel)
