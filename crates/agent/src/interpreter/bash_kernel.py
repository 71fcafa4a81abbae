"""Cubicle bash kernel: runs code for one code-interpreter context in a persistent bash.

Launched by cubicle-agent as ``python3 -c <this source>`` (self-contained). Protocol in
docs/interpreter.md: fd 0 requests (JSON lines), fds 1/2 raw output, fd 3 events.

One non-interactive ``bash --noprofile --norc`` lives as long as the kernel, so variables,
functions, aliases and the working directory persist across executions. Each execution's
code is written to a private file and ``source``d by that bash with stdin from /dev/null;
its stdout and stderr come back through pipes and are streamed as `stdout`/`stderr`
events as they arrive. The status of the code's last command is reported on a separate
pipe; a non-zero status becomes an `error` named ``ExitCode`` whose value is the status.

SIGINT to the kernel interrupts the running code: bash's process group gets SIGINT (the
foreground command dies; background jobs ignore it, as in any non-interactive shell), and
bash abandons the rest of the code (an INT trap arms a DEBUG trap that returns from
everything running from the code's file). The error is ``KeyboardInterrupt``. If the code
ends bash (``exit``, ``set -e``...), a new bash is started (its state is lost).
"""

import codecs
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time

LANGUAGE = "bash"
REQUEST_FD, STDOUT_FD, STDERR_FD, EVENT_FD = 0, 1, 2, 3
STATUS_FD = 60  # lowest descriptor for the status pipe in bash
READ_SIZE = 64 * 1024
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def timestamp(t=None):
    if t is None:
        t = time.time()
    secs = int(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + ".%06dZ" % int(
        (t - secs) * 1e6
    )


def write_all(fd, data):
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        view = view[n:]


def quote(value):
    return "'" + value.replace("'", "'\\''") + "'"


# Shell functions defined once in every bash we start. The INT trap marks the execution
# interrupted and arms a DEBUG trap (with extdebug, a DEBUG trap returning 2 makes bash
# return from the current function or sourced file) that unwinds everything running from
# the code file; our own top-level commands are not affected.
PRELUDE = r"""
shopt -s expand_aliases
__cubicle_on_int() {
  __cubicle_interrupted=1
  shopt -s extdebug
  trap __cubicle_unwind DEBUG
}
__cubicle_unwind() {
  [[ -n ${__cubicle_interrupted-} ]] || return 0
  local __cubicle_s
  for __cubicle_s in "${BASH_SOURCE[@]:1}"; do
    [[ $__cubicle_s == "$__cubicle_cell" ]] && return 2
  done
  return 0
}
__cubicle_pre() {
  __cubicle_interrupted=
  trap __cubicle_on_int INT
}
trap __cubicle_on_int INT
__cubicle_post() {
  local __cubicle_status=$1
  [[ -n ${__cubicle_interrupted-} ]] && __cubicle_status=130
  __cubicle_interrupted=
  printf '%s %s\n' "$2" "$__cubicle_status" >&"$__cubicle_status_fd"
}
"""


class Bash:
    """The persistent shell."""

    def __init__(self, cell_path):
        self.cell_path = cell_path
        status_r, status_w = os.pipe()
        # bash gets the write end of the status pipe on a high descriptor.
        status_fd = fcntl.fcntl(status_w, fcntl.F_DUPFD_CLOEXEC, STATUS_FD)
        os.close(status_w)
        try:
            # SIGINT is caught by this process, so bash starts with the default action.
            self.proc = subprocess.Popen(
                ["bash", "--noprofile", "--norc"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: SIGINT goes to its jobs
                pass_fds=(status_fd,),
            )
        finally:
            os.close(status_fd)
        self.status_fd = status_r
        self.stdin = self.proc.stdin.fileno()
        self.stdout = self.proc.stdout.fileno()
        self.stderr = self.proc.stderr.fileno()
        for fd in (self.stdout, self.stderr, self.status_fd):
            os.set_blocking(fd, False)
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            self.pidfd = None
        self.status_buffer = b""
        self.send("__cubicle_cell=%s\n__cubicle_status_fd=%d\n%s\n"
                  % (quote(cell_path), status_fd, PRELUDE))

    def send(self, text):
        try:
            write_all(self.stdin, text.encode("utf-8", "surrogateescape"))
        except BrokenPipeError:
            pass

    def alive(self):
        return self.proc.poll() is None

    def interrupt(self):
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def close(self):
        for fd in (self.status_fd, self.pidfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


class Kernel:
    def __init__(self):
        # Requests and events on close-on-exec descriptors (bash and its jobs never hold
        # them), /dev/null on fd 0.
        self.request_fd = os.dup(REQUEST_FD)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, REQUEST_FD)
        os.close(devnull)
        self.event_fd = os.dup(EVENT_FD)
        os.close(EVENT_FD)
        self.dir = tempfile.mkdtemp(prefix="cubicle-bash-")
        self.cell_path = os.path.join(self.dir, "cell")
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.interrupt_requested = False
        self.running = None  # id of the running execution
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.set_wakeup_fd(self.wake_w)
        self.count = 0
        self.request_buffer = b""
        self.requests = []
        self.requests_closed = False
        self.bash = Bash(self.cell_path)
        self.decoders = {}

    def _on_sigint(self, signum, frame):
        if self.running is not None:
            self.interrupt_requested = True

    def emit(self, obj):
        line = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        write_all(self.event_fd, line.encode("utf-8", "replace") + b"\n")

    # --- output -------------------------------------------------------------------------

    def _decoder(self, name):
        decoder = self.decoders.get(name)
        if decoder is None:
            decoder = self.decoders[name] = codecs.getincrementaldecoder("utf-8")("replace")
        return decoder

    def _output(self, name, data, final=False):
        if self.running is None:
            # Output of background jobs while idle: raw, as the agent forwards fds 1/2.
            if data:
                write_all(STDOUT_FD if name == "stdout" else STDERR_FD, data)
            return
        text = self._decoder(name).decode(data, final)
        if text:
            self.emit({"id": self.running, "type": name, "text": text,
                       "timestamp": timestamp()})

    def _select(self, bash, extra_fd, timeout):
        """Waits for bash's output, its exit (pidfd), a wake-up or `extra_fd`; forwards
        the output that arrived and returns the ready descriptors (none if interrupted
        by a signal). `timeout` applies only where bash has no pidfd to wait on."""
        fds = [extra_fd, bash.stdout, bash.stderr, self.wake_r]
        if bash.pidfd is not None:
            fds.append(bash.pidfd)
        try:
            ready, _, _ = select.select(fds, [], [], None if bash.pidfd is not None else timeout)
        except InterruptedError:
            return []
        if self.wake_r in ready:
            try:
                os.read(self.wake_r, 512)
            except (BlockingIOError, InterruptedError):
                pass
        if bash.stdout in ready:
            self._read_stream(bash.stdout, "stdout")
        if bash.stderr in ready:
            self._read_stream(bash.stderr, "stderr")
        return ready

    def _read_stream(self, fd, name):
        """Reads what is available; returns False at EOF."""
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return True
            except InterruptedError:
                continue
            except OSError:
                return False
            if not data:
                return False
            self._output(name, data)
            if len(data) < READ_SIZE:
                return True

    def _drain(self):
        self._read_stream(self.bash.stdout, "stdout")
        self._read_stream(self.bash.stderr, "stderr")
        for name in ("stdout", "stderr"):
            if self.running is not None:
                self._output(name, b"", final=True)
        self.decoders.clear()

    # --- requests -----------------------------------------------------------------------

    def _read_requests(self):
        try:
            data = os.read(self.request_fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self.requests_closed = True
            if self.request_buffer.strip():
                self.requests.append(self.request_buffer)
            self.request_buffer = b""
            return
        self.request_buffer += data
        while b"\n" in self.request_buffer:
            line, self.request_buffer = self.request_buffer.split(b"\n", 1)
            if line.strip():
                self.requests.append(line)

    def _handle(self, line):
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request must be a JSON object")
        except ValueError as e:
            self.emit({"type": "protocol_error", "id": None, "message": "bad request: %s" % e})
            return
        if request.get("op") == "execute":
            self.execute(request)
        else:
            self.emit({"type": "protocol_error", "id": request.get("id"),
                       "message": "unknown op %r" % (request.get("op"),)})

    # --- executions ---------------------------------------------------------------------

    def _wrapper(self, exec_id, env):
        """The command line bash runs for one execution (all on one line)."""
        parts = ["__cubicle_pre", "trap - DEBUG", "shopt -u extdebug"]
        restore = []
        if isinstance(env, dict):
            for i, (key, value) in enumerate(env.items()):
                key = str(key)
                if not NAME_RE.match(key):
                    continue
                value = "" if value is None else str(value)
                v = "__cubicle_env%d" % i
                parts.append(
                    '%s_set=${%s+x}; %s_val=${%s-}; %s_attr=${%s@a}' % (v, key, v, key, v, key)
                )
                parts.append("export %s=%s" % (key, quote(value)))
                restore.append(
                    'if [[ -n $%s_set ]]; then %s=$%s_val; [[ $%s_attr == *x* ]] || export -n %s; '
                    'else unset %s; fi; unset %s_set %s_val %s_attr'
                    % (v, key, v, v, key, key, v, v, v)
                )
        parts.append("source %s < /dev/null" % quote(self.cell_path))
        line = "; ".join(parts)
        # After the code: stop unwinding, restore the environment, report the status.
        line += "; __cubicle_status=$?; trap - DEBUG; shopt -u extdebug"
        for r in restore:
            line += "; " + r
        line += "; __cubicle_post $__cubicle_status %s\n" % quote(exec_id)
        return line

    def execute(self, request):
        exec_id = str(request.get("id"))
        code = request.get("code")
        code = code if isinstance(code, str) else ""
        self.count += 1
        count = self.count
        self.running = exec_id
        self.interrupt_requested = False
        self.decoders.clear()
        status = None
        note = None
        if code.strip():
            fd = os.open(self.cell_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                write_all(fd, code.encode("utf-8", "surrogateescape") + b"\n")
            finally:
                os.close(fd)
            if not self.bash.alive():
                self._restart()
            self.bash.send(self._wrapper(exec_id, request.get("env")))
            status, note = self._wait(exec_id)
        if status == "interrupted":
            self.emit({"id": exec_id, "type": "error", "name": "KeyboardInterrupt",
                       "value": "", "traceback": "KeyboardInterrupt"})
        elif status:
            if note:
                self.emit({"id": exec_id, "type": "stderr", "text": note,
                           "timestamp": timestamp()})
            self.emit({"id": exec_id, "type": "error", "name": "ExitCode",
                       "value": str(status), "traceback": "exit status %d" % status})
        elif note:
            self.emit({"id": exec_id, "type": "stderr", "text": note, "timestamp": timestamp()})
        self.running = None
        self.emit({"id": exec_id, "type": "number_of_executions", "execution_count": count})
        self.emit({"id": exec_id, "type": "end_of_execution"})

    def _wait(self, exec_id):
        """Streams output until bash reports the status of exec_id (or dies). Returns
        (status or "interrupted", note)."""
        bash = self.bash
        interrupted = False
        while True:
            if self.interrupt_requested:
                self.interrupt_requested = False
                interrupted = True
                bash.interrupt()
            ready = self._select(bash, bash.status_fd, 0.2)
            if bash.status_fd in ready:
                status = self._read_status(exec_id)
                if status is not None:
                    self._drain()
                    if interrupted:
                        return "interrupted", None
                    return status, None
            died = (bash.pidfd is not None and bash.pidfd in ready) or (
                bash.pidfd is None and not bash.alive())
            if died:
                code = bash.proc.wait()
                # The status may have been written just before bash exited.
                status = self._read_status(exec_id)
                self._drain()
                if status is not None:
                    return ("interrupted" if interrupted else status), None
                if code < 0:
                    code = 128 - code
                note = ("bash exited (status %d); a new shell was started: variables, "
                        "functions and the working directory were reset\n" % code)
                self._restart()
                if interrupted:
                    return "interrupted", note
                return code, note

    def _read_status(self, exec_id):
        while True:
            try:
                data = os.read(self.bash.status_fd, 4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if not data:
                break
            self.bash.status_buffer += data
        while b"\n" in self.bash.status_buffer:
            line, self.bash.status_buffer = self.bash.status_buffer.split(b"\n", 1)
            tag, _, value = line.decode("utf-8", "replace").rpartition(" ")
            if tag == exec_id:
                try:
                    return int(value)
                except ValueError:
                    return 1
        return None

    def _restart(self):
        try:
            self._drain()
        except OSError:
            pass
        self.bash.close()
        self.bash = Bash(self.cell_path)

    # --- main loop ----------------------------------------------------------------------

    def serve(self):
        self.emit({"type": "ready", "pid": os.getpid(), "language": LANGUAGE})
        os.set_blocking(self.request_fd, False)
        while True:
            while self.requests:
                self._handle(self.requests.pop(0))
            if self.requests_closed:
                return
            bash = self.bash
            ready = self._select(bash, self.request_fd, 0.5)
            if (bash.pidfd is not None and bash.pidfd in ready) or not bash.alive():
                self._restart()  # bash died while idle (killed by a job...)
            if self.request_fd in ready:
                self._read_requests()

    def close(self):
        self.bash.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def main():
    kernel = Kernel()
    try:
        kernel.serve()
    finally:
        kernel.close()


if __name__ == "__main__":
    main()
