"""Fuzzing the REST API (brief item 11): random and mutated bodies and query strings.

Every answer must be below 500 (a 501 "not implemented" for the documented variants is
allowed), every error body must be E2B's JSON {"code", "message"}, the daemon must stay
up, and every sandbox a (valid by chance) request created is killed at the end, after
which nothing may be left. The seed is random unless CUBICLE_FUZZ_SEED is set; it is
printed with every failure.
"""

from __future__ import annotations

import json
import os
import random
import string
import urllib.parse
from collections import defaultdict

import pytest

import harness

REQUESTS = int(os.environ.get("CUBICLE_FUZZ_REQUESTS", "600"))

KNOWN_CREATE_FIELDS = [
    "templateID", "timeout", "autoPause", "autoPauseMemory", "autoResume", "secure",
    "allow_internet_access", "network", "metadata", "envVars", "mcp", "iam", "volumeMounts",
]
LIST_KEYS = ["metadata", "state", "limit", "nextToken", "order", "startedAfter", "template"]
METRIC_KEYS = ["start", "end"]
WEIRD_STRINGS = [
    "", " ", "base", "BASE", "base ", "../base", "..", "/", "\\", "%00", "\u0000", "\ufeff",
    "é", "✓", "😀", "\U0010ffff", "a" * 64, "a" * 5000, "null", "true", "1e309", "-0",
    "running", "paused", "killed", "asc", "desc", "<script>", "'; DROP TABLE sandboxes; --",
    "%", "%%", "%zz", "%ff", "%c3%28", "+", "&", "=", "a=b&c=d", "\r\nX-Injected: 1",
]
WEIRD_NUMBERS = [0, 1, -1, 2, 299, 300, 86_400, 86_401, 2**31, 2**32, 2**53, 2**63 - 1, 2**63,
                 -(2**63), 2**64, 10**30, 1.5, -0.0, 1e308]


class Gen:
    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def string(self) -> str:
        r = self.r
        kind = r.randrange(6)
        if kind == 0:
            return r.choice(WEIRD_STRINGS)
        if kind == 1:
            return "".join(r.choice(string.printable) for _ in range(r.randrange(0, 40)))
        if kind == 2:  # arbitrary code points, surrogates excluded (json.dumps escapes them)
            return "".join(chr(r.choice([r.randrange(0x20, 0x7F), r.randrange(0xA0, 0xD800), r.randrange(0xE000, 0x110000)]))
                           for _ in range(r.randrange(0, 20)))
        if kind == 3:
            return r.choice(string.ascii_lowercase) * r.choice([1, 63, 64, 256, 257, 4096, 4097, 70_000])
        if kind == 4:
            return "".join(r.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(20))
        return str(r.choice(WEIRD_NUMBERS))

    def number(self):
        r = self.r
        return r.choice(WEIRD_NUMBERS + [r.randrange(-(10**6), 10**6), r.random() * 1e6])

    def value(self, depth: int = 0):
        r = self.r
        kinds = ["null", "bool", "int", "str"] + (["list", "dict"] if depth < 4 else [])
        k = r.choice(kinds)
        if k == "null":
            return None
        if k == "bool":
            return r.random() < 0.5
        if k == "int":
            return self.number()
        if k == "str":
            return self.string()
        if k == "list":
            return [self.value(depth + 1) for _ in range(r.randrange(0, 5))]
        return {self.string() if r.random() < 0.5 else r.choice(KNOWN_CREATE_FIELDS): self.value(depth + 1)
                for _ in range(r.randrange(0, 6))}

    def valid_create(self) -> dict:
        body = {"templateID": "base", "timeout": 30, "metadata": {"fuzz": "1"}, "envVars": {"A": "b"}}
        if self.r.random() < 0.3:
            body.update({"autoPause": False, "allow_internet_access": True, "secure": True})
        return body

    def mutated(self, base: dict) -> dict:
        r = self.r
        body = json.loads(json.dumps(base))
        for _ in range(r.randrange(1, 4)):
            op = r.randrange(5)
            keys = list(body) or ["templateID"]
            if op == 0 and body:
                body.pop(r.choice(keys))
            elif op == 1:
                body[r.choice(keys)] = self.value()
            elif op == 2:
                body[r.choice(KNOWN_CREATE_FIELDS)] = self.value()
            elif op == 3:
                body[self.string()] = self.value()
            else:
                body[r.choice(keys)] = {self.string(): self.string() for _ in range(r.randrange(0, 4))}
        return body

    def body(self, template: dict) -> tuple[bytes, str]:
        """A request body and the name of the generator that made it."""
        r = self.r
        k = r.randrange(10)
        if k == 0:
            return json.dumps(self.value()).encode(), "random-json"
        if k in (1, 2):
            return json.dumps(self.mutated(template)).encode(), "mutated"
        if k == 3:
            return bytes(r.randrange(256) for _ in range(r.randrange(0, 2000))), "random-bytes"
        if k == 4:
            raw = json.dumps(template).encode()
            return raw[: r.randrange(0, len(raw))], "truncated"
        if k == 5:
            big = dict(template)
            big[r.choice(list(template) + ["metadata"])] = "x" * r.choice([100_000, 900_000, 1_100_000])
            return json.dumps(big).encode(), "huge-string"
        if k == 6:
            n = r.choice([10, 127, 128, 129, 1000, 100_000])
            open_, close = r.choice([("[", "]"), ('{"a":', "}")])
            inner = (open_ * n + "1" + close * n).encode()
            return b'{"templateID":"base","network":' + inner + b"}", "deep-nesting"
        if k == 7:
            s = json.dumps(template)
            pos = r.randrange(0, len(s) + 1)
            junk = r.choice(["\\ud800", "\\u0000", "\ufeff", "\\x00", "\u2028", "é", '"', "\\", "}", "]"])
            return (s[:pos] + junk + s[pos:]).encode("utf-8", "surrogatepass"), "unicode-splice"
        if k == 8:
            return r.choice([b"", b" ", b"\n", b"{}", b"[]", b"null", b"0", b'""', b"\xef\xbb\xbf{}"]), "tiny"
        return json.dumps(template).encode(), "valid"

    def query(self, keys: list[str]) -> tuple[str, str]:
        r = self.r
        k = r.randrange(6)
        if k == 0:  # random bytes, percent-encoded
            raw = bytes(r.randrange(256) for _ in range(r.randrange(0, 200)))
            return urllib.parse.quote_from_bytes(raw, safe="=&"), "random-bytes"
        if k == 1:  # raw percent garbage
            return "".join(r.choice(["%", "%z", "%ff", "&", "=", "a", "%00", "+", ";", "%2"]) for _ in range(r.randrange(1, 30))), "percent-garbage"
        if k == 2:  # many metadata pairs
            n = r.choice([1, 10, 100, 101, 500, 999, 1000, 2000])
            md = urllib.parse.urlencode({f"k{i}": f"v{i}" for i in range(n)})
            return urllib.parse.urlencode({"metadata": md}), f"metadata-{n}-pairs"
        if k == 3:  # repeated keys
            key = r.choice(keys)
            return "&".join(f"{key}={urllib.parse.quote(self.string())}" for _ in range(r.randrange(2, 6))), "repeated"
        pairs = []
        for _ in range(r.randrange(1, 6)):
            key = r.choice(keys) if r.random() < 0.85 else self.string()
            val = self.string() if r.random() < 0.7 else str(self.number())
            pairs.append((key, val))
        return urllib.parse.urlencode(pairs), "known-keys"


# (method, path, body template or None, query keys or None)
ENDPOINTS = [
    ("POST", "/v2/sandboxes", "create", None),
    ("POST", "/sandboxes", "create", None),
    ("POST", "/sandboxes/{id}/timeout", {"timeout": 60}, None),
    ("POST", "/v2/sandboxes/{id}/connect", {"timeout": 60}, None),
    ("POST", "/sandboxes/{id}/connect", {"timeout": 60}, None),
    ("POST", "/sandboxes/{id}/refreshes", {"duration": 60}, None),
    ("POST", "/sandboxes/{id}/resume", {"timeout": 60}, None),
    ("GET", "/v2/sandboxes", None, LIST_KEYS),
    ("GET", "/sandboxes", None, LIST_KEYS),
    ("GET", "/sandboxes/{id}/metrics", None, METRIC_KEYS),
    ("GET", "/sandboxes/{rid}", None, None),
    ("DELETE", "/sandboxes/{rid}", None, None),
    ("GET", "/templates/{rid}", None, None),
    ("GET", "/templates", None, ["teamID"]),
    ("POST", "/sandboxes/{id}/pause", {}, None),
]
CONTENT_TYPES = ["application/json", "application/json", "application/json", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""]


@pytest.fixture(scope="module")
def fuzz_key(daemon):
    return daemon.create_key("fuzz")


def test_fuzz_rest_api(daemon, fuzz_key):
    seed = int(os.environ.get("CUBICLE_FUZZ_SEED", random.randrange(2**32)))
    gen = Gen(seed)
    r = gen.r
    client = daemon.http(fuzz_key, timeout=30)
    dirs_before = daemon.sandbox_dirs()
    target = client.post("/v2/sandboxes", json={"templateID": "base", "timeout": 600, "metadata": {"fuzz": "target"}})
    assert target.status_code == 201, target.text
    target_id = target.json()["sandboxID"]
    harness.track(target_id)
    created: list[str] = []
    failures: dict[tuple, list[str]] = defaultdict(list)
    statuses: dict[int, int] = defaultdict(int)

    def random_id() -> str:
        return r.choice([
            "".join(r.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(20)),
            urllib.parse.quote(gen.string(), safe=""),
            "..%2F..%2Fetc", "%00", target_id.upper(), target_id + "x",
        ]) or "x"

    try:
        for n in range(REQUESTS):
            method, path_t, template, qkeys = r.choice(ENDPOINTS)
            path = path_t.replace("{id}", target_id if r.random() < 0.7 else random_id())
            path = path.replace("{rid}", random_id())
            kind = "-"
            content = None
            headers = {}
            if template is not None:
                tpl = gen.valid_create() if template == "create" else template
                content, kind = gen.body(tpl)
                ctype = r.choice(CONTENT_TYPES)
                if ctype:
                    headers["Content-Type"] = ctype
            if qkeys is not None and r.random() < 0.9:
                q, qkind = gen.query(qkeys)
                path = f"{path}?{q}"
                kind = qkind if kind == "-" else f"{kind}+{qkind}"
            if len(path) > 60_000:  # httpx refuses URLs over 64 KiB before sending anything
                path = path[:60_000]
            try:
                resp = client.request(method, path, content=content, headers=headers)
            except Exception as e:  # noqa: BLE001 - a transport error is a finding too
                failures[(method, path_t, "transport", type(e).__name__)].append(f"#{n} {kind} {path[:120]}: {e!r}")
                if not daemon.alive():
                    break
                continue
            statuses[resp.status_code] += 1
            if resp.status_code == 201:
                try:
                    sid = resp.json()["sandboxID"]
                    created.append(sid)
                    harness.track(sid)
                except Exception:  # noqa: BLE001
                    failures[(method, path_t, 201, "unparsable")].append(resp.text[:200])
                continue
            problem = None
            if resp.status_code >= 500 and not (
                resp.status_code == 501 and "not implemented" in resp.text
            ):
                problem = "5xx"
            if resp.status_code >= 400:
                try:
                    harness.assert_error_body(resp)
                except (AssertionError, ValueError) as e:
                    problem = f"bad error body: {e}"
            elif resp.status_code != 204:
                try:
                    resp.json()
                except ValueError:
                    problem = "2xx body is not JSON"
            if problem:
                msg = ""
                try:
                    msg = resp.json().get("message", "")[:60]
                except Exception:  # noqa: BLE001
                    msg = resp.text[:60]
                failures[(method, path_t, resp.status_code, problem, msg)].append(
                    f"#{n} {kind}: {path[:100]} body={content[:80] if content else None!r}"
                )
    finally:
        for sid in created + [target_id]:
            client.delete(f"/sandboxes/{sid}")
        client.close()

    health = daemon.client().get("/health")
    assert daemon.alive() and health.status_code == 200, "the daemon did not survive the fuzzing"
    left = daemon.list_ids(fuzz_key)
    assert left == [], f"sandboxes of the fuzz key still listed: {left}"
    new_dirs = daemon.sandbox_dirs() - dirs_before
    assert not new_dirs, f"fuzzing left sandbox dirs behind: {new_dirs}"
    assert not harness.cgroups_of(created + [target_id]), "fuzzing left cgroups behind"
    harness.MEASUREMENTS.append(
        f"fuzz: seed {seed}, {REQUESTS} requests, statuses {dict(sorted(statuses.items()))}, "
        f"{len(created)} sandboxes created by valid bodies (all killed)"
    )
    if failures:
        lines = [f"seed {seed}: {sum(len(v) for v in failures.values())} bad answers in {len(failures)} classes"]
        for key, examples in sorted(failures.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {key} x{len(examples)}, e.g. {examples[0]}")
        pytest.fail("\n".join(lines), pytrace=False)


def test_fuzz_envd_rpc_through_proxy(daemon, sandbox):
    """Random bodies to the envd RPC and file endpoints with a valid token: never a 5xx
    other than the Connect 'internal'/'unknown' mapping, and the sandbox stays usable."""
    seed = int(os.environ.get("CUBICLE_FUZZ_SEED", random.randrange(2**32)))
    gen = Gen(seed)
    r = gen.r
    headers = {
        "E2b-Sandbox-Id": sandbox.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": sandbox._envd_access_token,
        "Connect-Protocol-Version": "1",
    }
    methods = [
        "/filesystem.Filesystem/Stat", "/filesystem.Filesystem/ListDir", "/filesystem.Filesystem/MakeDir",
        "/filesystem.Filesystem/Move", "/filesystem.Filesystem/Remove", "/filesystem.Filesystem/CreateWatcher",
        "/filesystem.Filesystem/GetWatcherEvents", "/filesystem.Filesystem/RemoveWatcher",
        "/process.Process/List", "/process.Process/SendInput", "/process.Process/SendSignal",
        "/process.Process/CloseStdin", "/process.Process/Update",
    ]
    templates = [{"path": "/tmp/fuzz"}, {"source": "/tmp/a", "destination": "/tmp/b"},
                 {"process": {"pid": 1}}, {"watcherId": "x"}, {"path": "/tmp", "depth": 2}]
    failures = defaultdict(list)
    with httpx_client(daemon.url, headers) as c:
        for n in range(200):
            path = r.choice(methods)
            content, kind = gen.body(r.choice(templates))
            if len(content) > 200_000:
                content = content[:200_000]
            try:
                resp = c.post(path, content=content, headers={"Content-Type": "application/json"})
            except Exception as e:  # noqa: BLE001
                failures[(path, "transport")].append(f"#{n} {kind}: {e!r}")
                continue
            if resp.status_code >= 500:
                failures[(path, resp.status_code, resp.text[:60])].append(f"#{n} {kind}: {content[:80]!r}")
            elif resp.status_code >= 400:
                try:
                    body = resp.json()
                    assert isinstance(body.get("code"), str) and "message" in body
                except Exception:  # noqa: BLE001
                    failures[(path, resp.status_code, "not a Connect error body")].append(resp.text[:100])
    assert sandbox.commands.run("echo alive").stdout == "alive\n"
    assert sandbox.files.read("/etc/hostname").strip() == sandbox.sandbox_id
    if failures:
        lines = [f"seed {seed}:"] + [f"  {k} x{len(v)}, e.g. {v[0]}" for k, v in failures.items()]
        pytest.fail("\n".join(lines), pytrace=False)


def httpx_client(base_url, headers):
    import httpx

    return httpx.Client(base_url=base_url, headers=headers, timeout=30)
