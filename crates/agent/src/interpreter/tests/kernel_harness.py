"""A tiny driver that launches kernels exactly as cubicle-agent does (see
docs/interpreter.md): `python3 -c <source> [--zygote]`, `node -e <source>`, with pipes on
fds 0 (requests), 1/2 (raw output) and 3 (events), plus a socketpair on fd 4 for the
zygote, which receives the four fds of every forked kernel over it (SCM_RIGHTS)."""

import ctypes
import fcntl
import json
import os
import queue
import shutil
import signal
import socket
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# Measurements the tests report (printed at the end of the run by conftest.py).
METRICS = []


def record_metric(name, value):
    METRICS.append((name, value))

INTERPRETER_DIR = os.path.dirname(HERE)
# KERNEL_TEST_ROOT: a root file system to run the kernels in (chroot), e.g. the
# code-interpreter template, as scripts/kernel-tests sets up; default: this host's.
ROOT = os.environ.get("KERNEL_TEST_ROOT") or None
PYTHON = "/usr/bin/python3"
# KERNEL_TEST_NODE: another node to test with (e.g. Debian's node 18, as in the template).
NODE = "/usr/bin/node" if ROOT else os.environ.get("KERNEL_TEST_NODE") or shutil.which(
    "node", path="/usr/bin:/usr/local/bin:" + os.environ.get("PATH", "")) or "node"


def missing(program):
    """Why `program` cannot run here, or None."""
    if not ROOT:
        if os.path.exists(program) or shutil.which(program):
            return None
    elif program.startswith("/"):
        if os.path.exists(os.path.join(ROOT, program.lstrip("/"))):
            return None
    elif any(os.path.exists(os.path.join(ROOT, d, program)) for d in ("usr/bin", "bin")):
        return None
    return "%s is not installed%s: run scripts/kernel-tests (it uses the code-interpreter template)" % (
        program, " in " + ROOT if ROOT else "")


def source(name):
    with open(os.path.join(INTERPRETER_DIR, name), encoding="utf-8") as f:
        return f.read()


def python_argv(zygote=False):
    argv = [PYTHON, "-c", source("python_kernel.py")]
    if zygote:
        argv.append("--zygote")
    return argv


def node_argv():
    return [NODE, "-e", source("js_kernel.js")]


def bash_argv():
    return [PYTHON, "-c", source("bash_kernel.py")]


def _high(fd):
    """A close-on-exec duplicate numbered >= 10 (so posix_spawn's dup2 onto 0-4 never
    meets a source that already has the target number)."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


def become_subreaper():
    """Orphaned descendants (the zygote's grandchildren) are re-parented to us."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap(pid, timeout=10.0):
    """Waits for a child (or re-parented orphan) to exit; returns its wait status."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if got == pid:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError("pid %d did not exit" % pid)
        time.sleep(0.01)


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def ppid_of(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def pss_kib(pid):
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise ValueError("no Pss")


class _Pipes:
    """The four pipes of a kernel: the child's ends (0, 1, 2, 3) and ours."""

    def __init__(self):
        req_r, req_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ev_r, ev_w = os.pipe()
        self.child = [_high(req_r), _high(out_w), _high(err_w), _high(ev_w)]
        self.requests = _high(req_w)
        self.stdout = _high(out_r)
        self.stderr = _high(err_r)
        self.events = _high(ev_r)

    def close_child_ends(self):
        for fd in self.child:
            os.close(fd)
        self.child = []


class Kernel:
    """One kernel seen from the agent's side."""

    def __init__(self, pipes, pid, language=None):
        self.pid = pid
        self.language = language
        self._requests = os.fdopen(pipes.requests, "wb", buffering=0)
        self._events = queue.Queue()
        self.stdout = bytearray()
        self.stderr = bytearray()
        self._raw_lock = threading.Lock()
        self.raw = []  # (time, "stdout"|"stderr", bytes)
        self.events_closed = threading.Event()
        self._threads = [
            threading.Thread(target=self._read_events, args=(pipes.events,), daemon=True),
            threading.Thread(target=self._read_raw, args=(pipes.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read_raw, args=(pipes.stderr, "stderr"), daemon=True),
        ]
        for t in self._threads:
            t.start()
        self.ready_event = None

    def _read_events(self, fd):
        with os.fdopen(fd, "rb") as f:
            for line in f:
                now = time.monotonic()
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"type": "__malformed__", "line": line}
                self._events.put((now, event))
        self.events_closed.set()
        self._events.put((time.monotonic(), None))

    def _read_raw(self, fd, name):
        with os.fdopen(fd, "rb", buffering=0) as f:
            while True:
                data = f.read(65536)
                if not data:
                    return
                with self._raw_lock:
                    getattr(self, name).extend(data)
                    self.raw.append((time.monotonic(), name, bytes(data)))

    def send(self, obj):
        self._requests.write(json.dumps(obj).encode() + b"\n")

    def close_requests(self):
        self._requests.close()

    def next_event(self, timeout=30.0):
        """(arrival time, event) or raises queue.Empty; event None means fd 3 closed."""
        return self._events.get(timeout=timeout)

    def wait_ready(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            _, event = self.next_event(max(0.01, deadline - time.monotonic()))
            if event is None:
                raise RuntimeError("kernel exited before ready; stderr: %s" % self.stderr.decode(errors="replace"))
            if event.get("type") == "ready":
                self.ready_event = event
                return event

    def execute(self, code, env=None, exec_id=None, timeout=60.0, timed=False):
        """Runs code; returns the execution's events (up to end_of_execution), or
        (arrival time, event) pairs with timed=True."""
        exec_id = exec_id or "x%d" % int(time.monotonic() * 1e9)
        self.send({"op": "execute", "id": exec_id, "code": code, "env": env or {}})
        return self.collect(exec_id, timeout=timeout, timed=timed)

    def collect(self, exec_id, timeout=60.0, timed=False):
        out = []
        deadline = time.monotonic() + timeout
        while True:
            when, event = self.next_event(max(0.01, deadline - time.monotonic()))
            if event is None:
                raise RuntimeError("kernel died; events so far: %r" % out)
            assert event.get("id") == exec_id, event
            out.append((when, event) if timed else event)
            if event["type"] == "end_of_execution":
                return out

    def signal(self, sig):
        os.kill(self.pid, sig)

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def spawn(argv, cwd=None, env=None, extra_fds=()):
    """Starts a kernel with pipes on 0-3 (and extra (fd, target) pairs); returns
    (pid, pipes)."""
    pipes = _Pipes()
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(pipes.child)]
    for fd, target in extra_fds:
        actions.append((os.POSIX_SPAWN_DUP2, fd, target))
    if ROOT:
        # chroot enters the root at "/"; env -C then enters the test's directory
        # (the tests keep theirs under /tmp, which scripts/kernel-tests binds in).
        argv = ["/usr/sbin/chroot", ROOT, "/usr/bin/env", "-C", cwd or "/"] + list(argv)
        cwd = None
    if cwd:
        old = os.getcwd()
        os.chdir(cwd)
    try:
        pid = os.posix_spawn(argv[0], argv, env if env is not None else kernel_env(),
                             file_actions=actions)
    finally:
        if cwd:
            os.chdir(old)
    pipes.close_child_ends()
    return pid, pipes


def kernel_env(extra=None):
    env = {
        "HOME": os.environ.get("KERNEL_TEST_HOME", os.environ.get("HOME", "/tmp")),
        "USER": os.environ.get("USER", "user"),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "SHELL": "/bin/bash",
    }
    if extra:
        env.update(extra)
    return env


def start_kernel(argv, cwd=None, env=None, language=None):
    pid, pipes = spawn(argv, cwd=cwd, env=env)
    kernel = Kernel(pipes, pid, language)
    kernel.wait_ready()
    return kernel


class Zygote:
    """The Python zygote and the forks it makes."""

    def __init__(self, cwd=None, env=None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs_fd = _high(os.dup(theirs.fileno()))
        theirs.close()
        started = time.monotonic()
        pid, pipes = spawn(python_argv(zygote=True), cwd=cwd, env=env,
                           extra_fds=[(theirs_fd, 4)])
        os.close(theirs_fd)
        self.control = ours
        self.kernel = Kernel(pipes, pid, "python")
        self.kernel.wait_ready()
        self.start_seconds = time.monotonic() - started
        self.pid = pid
        self._n = 0

    def fork(self, cwd=None, env=None, timeout=30.0):
        """Returns (kernel, seconds from the request to the kernel's `ready`)."""
        self._n += 1
        fork_id = "fork-%d" % self._n
        pipes = _Pipes()
        started = time.monotonic()
        request = {"op": "fork", "id": fork_id}
        if cwd is not None:
            request["cwd"] = cwd
        if env is not None:
            request["env"] = env
        self.kernel.send(request)
        socket.send_fds(self.control, [b"F"], pipes.child)
        pipes.close_child_ends()
        while True:
            _, event = self.kernel.next_event(timeout)
            if event is None:
                raise RuntimeError("zygote died: %s" % self.kernel.stderr.decode(errors="replace"))
            if event.get("id") == fork_id:
                break
        if event["type"] != "forked":
            raise RuntimeError("fork failed: %r" % event)
        kernel = Kernel(pipes, event["pid"], "python")
        kernel.wait_ready(timeout)
        return kernel, time.monotonic() - started

    def close(self):
        try:
            self.kernel.close_requests()
        except OSError:
            pass
        try:
            reap(self.pid, 10)
        except TimeoutError:
            self.kernel.kill()
            reap(self.pid, 10)
        self.control.close()


def stop(kernel, timeout=10.0):
    """Closes a kernel's requests (it exits) and reaps it (child or re-parented)."""
    try:
        kernel.close_requests()
    except OSError:
        pass
    try:
        return reap(kernel.pid, timeout)
    except TimeoutError:
        kernel.kill()
        return reap(kernel.pid, timeout)


def by_type(events, kind):
    return [e for e in events if e["type"] == kind]


def stdout_text(events):
    return "".join(e["text"] for e in events if e["type"] == "stdout")


def stderr_text(events):
    return "".join(e["text"] for e in events if e["type"] == "stderr")
