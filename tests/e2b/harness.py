"""Test harness for the E2B-compatibility suite: runs `cubicle serve` daemons on
throw-away data dirs and checks the host for leftovers.

Nothing here talks E2B: tests use the real `e2b` SDK (or raw httpx for the wire
protocol) against `Daemon.url`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

import httpx

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO / "target" / "x86_64-unknown-linux-gnu" / "release" / "cubicle"
BIN = Path(os.environ.get("CUBICLE_BIN", str(DEFAULT_BIN)))
TEMPLATES = Path(os.environ.get("CUBICLE_TEMPLATES_DIR", "/var/lib/cubicle/templates"))
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "cubicle"

# Every sandbox id a test saw (created through the SDK or the raw API). Used by the
# final leak check: none of them may keep a cgroup or a directory.
SEEN_IDS: set[str] = set()
_seen_lock = threading.Lock()

# Lines printed in pytest's terminal summary (measurements, e.g. the stress test's).
MEASUREMENTS: list[str] = []



def track(*ids: str) -> None:
    """Remembers sandbox ids for the final leak check."""
    with _seen_lock:
        SEEN_IDS.update(i for i in ids if i)


def preflight() -> Optional[str]:
    """Why the suite cannot run here, or None. Never a skip: the caller fails."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the suite must run as root (sandboxes need namespaces and cgroups)")
    if not BIN.is_file():
        problems.append(
            f"no cubicle binary at {BIN}: run `scripts/setup` (or `cargo build --release`), "
            "or point CUBICLE_BIN at one"
        )
    elif not (BIN.parent / "cubicle-agent").is_file():
        problems.append(f"no cubicle-agent next to {BIN}: run `scripts/setup`")
    for template in ("base", "code-interpreter"):
        if not (TEMPLATES / template / "rootfs").is_dir():
            problems.append(
                f"no {template} template in {TEMPLATES}: run `scripts/setup` "
                "(or set CUBICLE_TEMPLATES_DIR)"
            )
    if problems:
        return "cannot run the E2B suite:\n  - " + "\n  - ".join(problems)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cgroup_dirs() -> list[Path]:
    """The parents sandbox cgroups are created in: `cubicle` (the default data dir) or
    `cubicle-<hash>` (every other data dir has its own), in every v1 hierarchy or in v2."""
    out = []
    if not CGROUP_ROOT.is_dir():
        return out
    hierarchies = [CGROUP_ROOT, CGROUP_ROOT / "unified"]
    hierarchies += [p for p in CGROUP_ROOT.iterdir() if p.is_dir()]
    for h in hierarchies:
        try:
            children = list(h.iterdir())
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for c in children:
            if c.is_dir() and (c.name == CGROUP_PARENT or c.name.startswith(CGROUP_PARENT + "-")):
                if c not in out:
                    out.append(c)
    return out


def cgroup_ids() -> set[str]:
    """Names of every sandbox cgroup on the host (all data dirs)."""
    ids: set[str] = set()
    for parent in cgroup_dirs():
        try:
            ids.update(p.name for p in parent.iterdir() if p.is_dir())
        except FileNotFoundError:
            pass
    return ids


def cgroups_of(ids: Iterable[str]) -> list[str]:
    """Cgroup directories that still exist for these sandbox ids."""
    left = []
    ids = list(ids)
    for parent in cgroup_dirs():
        for i in ids:
            if (parent / i).exists():
                left.append(str(parent / i))
    return left


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


class Daemon:
    """One `cubicle serve` on its own data dir and port."""

    def __init__(self, name: str = "cbt"):
        self.data = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp"))
        os.chmod(self.data, 0o711)
        (self.data / "templates").symlink_to(TEMPLATES)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.keys: dict[str, str] = {}
        self.starts = 0
        self._clients: dict[str, httpx.Client] = {}

    # --- process -----------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Starts the daemon and waits until `GET /health` answers 200.

        A starting daemon only ever touches sandboxes of its own data dir (each data dir
        has its own cgroup parent), so daemons of other data dirs are left alone.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUBICLE_")}
        env.setdefault("RUST_LOG", "info")
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts + 1} at {time.ctime()} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [
                str(BIN),
                "--data-dir",
                str(self.data),
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
        log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"cubicle serve exited with {self.proc.returncode} during start-up:\n"
                    + self.log_tail()
                )
            try:
                r = httpx.get(self.url + "/health", timeout=1.0)
                if r.status_code == 200:
                    break
                last = f"status {r.status_code}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.05)
        else:
            self.kill9()
            raise RuntimeError(
                f"cubicle serve not ready after {timeout}s ({last}):\n" + self.log_tail()
            )
        if "default" not in self.keys:
            self.keys["default"] = (self.data / "initial-api-key").read_text().strip()

    @property
    def log_path(self) -> Path:
        return self.data / "daemon.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close_clients(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; SIGKILL (and an error) if it does not stop in time."""
        self.close_clients()
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"cubicle serve did not stop within {timeout}s of SIGTERM")

    def kill9(self) -> None:
        self.close_clients()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        try:
            text = re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))
            lines = text.splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-n:])

    # --- keys and API ---------------------------------------------------------------

    @property
    def api_key(self) -> str:
        return self.keys["default"]

    def create_key(self, name: str) -> str:
        if name in self.keys:
            return self.keys[name]
        out = subprocess.run(
            [str(BIN), "--data-dir", str(self.data), "keys", "create", name],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, f"keys create {name} failed: {out.stderr}"
        key = out.stdout.strip()
        assert key, f"keys create printed no key: {out.stderr}"
        self.keys[name] = key
        return key

    def conn(self, key: Optional[str] = None) -> dict:
        """The E2B SDK's connection kwargs for this daemon."""
        return dict(api_url=self.url, sandbox_url=self.url, api_key=key or self.api_key)

    def http(self, key: Optional[str] = None, **kw) -> httpx.Client:
        headers = {"X-API-KEY": key or self.api_key}
        headers.update(kw.pop("headers", {}))
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60), **kw)

    def client(self, key: Optional[str] = None) -> httpx.Client:
        """A shared, pooled raw client for a key (do not close it)."""
        key = key or self.api_key
        if key not in self._clients:
            self._clients[key] = self.http(key)
        return self._clients[key]

    def list_ids(self, key: Optional[str] = None) -> list[str]:
        """Every sandbox the daemon lists for a key (all pages, running and paused)."""
        ids: list[str] = []
        token = None
        c = self.client(key)
        for _ in range(1000):
            params = {"limit": "1000"}
            if token:
                params["nextToken"] = token
            r = c.get("/v2/sandboxes", params=params)
            assert r.status_code == 200, f"list failed: {r.status_code} {r.text}"
            ids += [s["sandboxID"] for s in r.json()]
            token = r.headers.get("x-next-token")
            if not token:
                break
        return ids

    def kill_all(self) -> list[str]:
        """Kills every sandbox of every key this harness knows; returns failures."""
        failures = []
        for name, key in self.keys.items():
            try:
                ids = self.list_ids(key)
            except Exception as e:  # noqa: BLE001 - report, continue cleaning up
                failures.append(f"list for key {name}: {e}")
                continue
            track(*ids)
            c = self.client(key)
            for i in ids:
                r = c.delete(f"/sandboxes/{i}")
                if r.status_code not in (204, 404):
                    failures.append(f"DELETE /sandboxes/{i}: {r.status_code} {r.text}")
        return failures

    # --- host state -------------------------------------------------------------------

    def sandbox_dirs(self) -> set[str]:
        d = self.data / "sandboxes"
        try:
            return {p.name for p in d.iterdir()}
        except FileNotFoundError:
            return set()

    def agent_log(self, sandbox_id: str, n: int = 30) -> str:
        try:
            text = (self.data / "sandboxes" / sandbox_id / "run" / "agent.log").read_text(errors="replace")
        except OSError as e:
            return f"(no agent log: {e})"
        return "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()[-n:])

    def runtime_record(self, sandbox_id: str) -> dict:
        return json.loads((self.data / "sandboxes" / sandbox_id / "runtime.json").read_text())

    def leaks(self, ids: Iterable[str] = ()) -> list[str]:
        """What is left on the host: sandbox dirs of this data dir, and cgroups of
        `ids` plus of every dir entry."""
        ids = set(ids)
        dirs = self.sandbox_dirs()
        problems = [f"{self.data}/sandboxes/{d} still exists" for d in sorted(dirs)]
        problems += [f"cgroup {c} still exists" for c in cgroups_of(ids | dirs)]
        return problems

    def cleanup(self) -> None:
        """Removes the data dir (never follows the templates symlink)."""
        shutil.rmtree(self.data, ignore_errors=True)

    def force_cleanup(self) -> Optional[Path]:
        """Last resort after a failure: stops the daemon, kills whatever sandboxes of this
        data dir still run (agents found through runtime.json, then anything left in their
        cgroups), removes their cgroups and the data dir. Keeps the daemon log; returns
        where it went."""
        self.kill9()
        ids = self.sandbox_dirs()
        for i in ids:
            try:
                pid = self.runtime_record(i)["pid"]
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"cubicle-agent" in f.read():
                        os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
        for i in ids:
            for parent in cgroup_dirs():
                cg = parent / i
                for _ in range(200):
                    if not cg.exists():
                        break
                    try:
                        for line in (cg / "cgroup.procs").read_text().split():
                            os.kill(int(line), signal.SIGKILL)
                        cg.rmdir()
                    except OSError:
                        time.sleep(0.01)
        kept = None
        if self.log_path.exists():
            kept = Path(f"{self.data}.daemon.log")
            shutil.copy(self.log_path, kept)
        self.cleanup()
        return kept


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Polls `predicate` until it returns a truthy value; raises AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            v = predicate()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")


def assert_error_body(r: httpx.Response, status: Optional[int] = None) -> dict:
    """The E2B error contract: a JSON object {"code": <status>, "message": <str>}."""
    if status is not None:
        assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:300]}"
    ctype = r.headers.get("content-type", "")
    assert ctype.startswith("application/json"), (
        f"{r.request.method} {r.request.url.path}: error body is not JSON "
        f"(content-type {ctype!r}): {r.text[:200]!r}"
    )
    body = r.json()
    assert isinstance(body, dict), f"error body is not an object: {body!r}"
    assert body.get("code") == r.status_code, f"code {body.get('code')!r} != {r.status_code}: {body}"
    assert isinstance(body.get("message"), str), f"message is not a string: {body}"
    return body


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def create(conn: dict, template: Optional[str] = None, **kw):
    """Sandbox.create through the SDK, remembered for the leak check."""
    from e2b import Sandbox

    sbx = Sandbox.create(template, **kw, **conn) if template else Sandbox.create(**kw, **conn)
    track(sbx.sandbox_id)
    return sbx


def create_ci(conn: dict, template: Optional[str] = None, **kw):
    """`e2b_code_interpreter.Sandbox.create` (default template: the SDK's), remembered
    for the leak check."""
    from e2b_code_interpreter import Sandbox

    sbx = Sandbox.create(template, **kw, **conn) if template else Sandbox.create(**kw, **conn)
    track(sbx.sandbox_id)
    return sbx


def template_zygotes(daemon: "Daemon") -> list[int]:
    """Pids of the daemon's template zygotes (its children running
    `python_kernel.py --template-zygote`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = next((l.split()[1] for l in status.splitlines() if l.startswith("PPid:")), None)
        if ppid == str(daemon.pid) and b"--template-zygote" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def kill_quietly(sbx) -> None:
    try:
        sbx.kill()
    except Exception:  # noqa: BLE001 - already gone is fine at teardown
        pass
