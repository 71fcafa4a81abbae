"""Bad input at the REST level (brief item 10): every case is a 4xx with the E2B error
body {"code": <status>, "message": <str>} and changes nothing (the key's sandboxes, the
data dir's sandboxes and the live sandbox's deadline are compared before and after)."""

from __future__ import annotations

import json
import urllib.parse

import pytest

import harness

MIB = 1 << 20
ID = "{sid}"  # replaced by the module sandbox's id
MISSING = "abcdefghij0123456789"

# (case id, method, path, request kwargs, expected status or statuses)
CASES = [
    # --- create: body problems ---
    ("create-malformed-json", "POST", "/v2/sandboxes", {"content": b"{bad json"}, 400),
    ("create-truncated-json", "POST", "/v2/sandboxes", {"content": b'{"templateID": "ba'}, 400),
    ("create-trailing-garbage", "POST", "/v2/sandboxes", {"content": b'{"templateID":"base"} x'}, 400),
    ("create-unknown-field", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "bogus": 1}}, 400),
    ("create-missing-template", "POST", "/v2/sandboxes", {"json": {"timeout": 30}}, 400),
    ("create-template-int", "POST", "/v2/sandboxes", {"json": {"templateID": 5}}, 400),
    ("create-template-null", "POST", "/v2/sandboxes", {"json": {"templateID": None}}, 400),
    ("create-timeout-string", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "timeout": "10"}}, 400),
    ("create-timeout-float", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "timeout": 1.5}}, 400),
    ("create-timeout-bool", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "timeout": True}}, 400),
    ("create-metadata-int-value", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "metadata": {"a": 1}}}, 400),
    ("create-metadata-list", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "metadata": ["a"]}}, 400),
    ("create-envvars-list", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "envVars": ["A=1"]}}, 400),
    ("create-body-array", "POST", "/v2/sandboxes", {"json": ["base"]}, 400),
    ("create-body-array-two", "POST", "/v2/sandboxes", {"json": ["base", 30]}, 400),
    ("create-body-string", "POST", "/v2/sandboxes", {"json": "base"}, 400),
    ("create-body-number", "POST", "/v2/sandboxes", {"content": b"42"}, 400),
    ("create-body-null", "POST", "/v2/sandboxes", {"content": b"null"}, 400),
    ("create-body-not-utf8", "POST", "/v2/sandboxes", {"content": b'{"templateID":"\xff\xfe"}'}, 400),
    ("create-lone-surrogate", "POST", "/v2/sandboxes", {"content": b'{"templateID":"\\ud800"}'}, 400),
    ("create-deep-nesting", "POST", "/v2/sandboxes", {"content": b'{"templateID":"base","network":' + b"[" * 5000 + b"]" * 5000 + b"}"}, 400),
    # --- create: values out of range ---
    ("create-unknown-template", "POST", "/v2/sandboxes", {"json": {"templateID": "no-such-template"}}, (400, 404)),
    ("create-template-traversal", "POST", "/v2/sandboxes", {"json": {"templateID": "../../etc"}}, (400, 404)),
    ("create-template-absolute", "POST", "/v2/sandboxes", {"json": {"templateID": "/var/lib/cubicle/templates/base"}}, (400, 404)),
    ("create-template-empty", "POST", "/v2/sandboxes", {"json": {"templateID": ""}}, (400, 404)),
    ("create-template-huge", "POST", "/v2/sandboxes", {"json": {"templateID": "b" * 100_000}}, (400, 404)),
    ("create-timeout-negative", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "timeout": -1}}, 400),
    ("create-timeout-zero", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "timeout": 0}}, 400),
    ("create-timeout-over-max", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "timeout": 86_401}}, 400),
    ("create-timeout-huge", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "timeout": 10**12}}, 400),
    ("create-timeout-i64-overflow", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "timeout": 2**63}}, 400),
    ("create-timeout-1e30", "POST", "/v2/sandboxes", {"content": b'{"templateID":"base","timeout":1e30}'}, 400),
    ("create-metadata-too-many", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "metadata": {str(i): "v" for i in range(101)}}}, 400),
    ("create-metadata-key-too-long", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "metadata": {"k" * 300: "v"}}}, 400),
    ("create-metadata-empty-key", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "metadata": {"": "v"}}}, 400),
    ("create-envvar-name-with-equals", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "envVars": {"A=B": "x"}}}, 400),
    ("create-envvar-nul", "POST", "/v2/sandboxes", {"json": {"templateID": "base", "envVars": {"A": "x\u0000y"}}}, 400),
    ("create-bad-idempotency-key", "POST", "/v2/sandboxes", {"json": {"templateID": "base"}, "headers": {"Idempotency-Key": "not valid!"}}, 400),
    ("create-oversized-body", "POST", "/v2/sandboxes", {"content": b'{"templateID":"base","metadata":{"x":"' + b"a" * MIB + b'"}}'}, 413),
    ("create-oversized-chunked", "POST", "/v2/sandboxes", {"chunks": [b'{"templateID":"base","metadata":{"x":"'] + [b"a" * 65536] * 20 + [b'"}}']}, 413),
    ("create-v1-malformed", "POST", "/sandboxes", {"content": b"{"}, 400),
    ("create-v1-unknown-template", "POST", "/sandboxes", {"json": {"templateID": "nope-nope"}}, (400, 404)),
    # --- routes and methods ---
    ("unknown-route", "GET", "/nope", {}, 404),
    ("unknown-route-v3", "GET", "/v3/sandboxes", {}, 404),
    ("unknown-subresource", "GET", f"/sandboxes/{ID}/nope", {}, 404),
    ("wrong-method-put-list", "PUT", "/v2/sandboxes", {"json": {}}, 405),
    ("wrong-method-delete-list", "DELETE", "/v2/sandboxes", {}, 405),
    ("wrong-method-patch-sandbox", "PATCH", f"/sandboxes/{ID}", {"json": {}}, 405),
    ("wrong-method-get-timeout", "GET", f"/sandboxes/{ID}/timeout", {}, 405),
    ("wrong-method-post-health", "POST", "/health", {}, 405),
    # --- ids ---
    ("get-traversal", "GET", "/sandboxes/..%2F..%2Fetc", {}, 404),
    ("kill-traversal", "DELETE", "/sandboxes/..%2F..%2Fetc", {}, 404),
    ("timeout-traversal", "POST", "/sandboxes/..%2F..%2Fetc/timeout", {"json": {"timeout": 10}}, (400, 404)),
    ("connect-traversal", "POST", "/v2/sandboxes/..%2F..%2Fetc/connect", {"json": {}}, (400, 404)),
    ("metrics-traversal", "GET", "/sandboxes/..%2F..%2Fetc/metrics", {}, (400, 404)),
    ("template-traversal", "GET", "/templates/..%2F..%2Fetc", {}, (400, 404)),
    ("get-nul-id", "GET", "/sandboxes/%00", {}, 404),
    ("get-unicode-id", "GET", "/sandboxes/%C3%A9t%C3%A9", {}, 404),
    ("get-long-id", "GET", "/sandboxes/" + "a" * 5000, {}, 404),
    ("get-missing", "GET", f"/sandboxes/{MISSING}", {}, 404),
    ("kill-missing", "DELETE", f"/sandboxes/{MISSING}", {}, 404),
    ("timeout-missing", "POST", f"/sandboxes/{MISSING}/timeout", {"json": {"timeout": 10}}, 404),
    ("connect-missing", "POST", f"/v2/sandboxes/{MISSING}/connect", {"json": {}}, 404),
    ("metrics-missing", "GET", f"/sandboxes/{MISSING}/metrics", {}, 404),
    # --- list query ---
    ("list-limit-zero", "GET", "/v2/sandboxes?limit=0", {}, 400),
    ("list-limit-negative", "GET", "/v2/sandboxes?limit=-1", {}, 400),
    ("list-limit-text", "GET", "/v2/sandboxes?limit=abc", {}, 400),
    ("list-limit-huge", "GET", "/v2/sandboxes?limit=99999999999999999999", {}, 400),
    ("list-limit-over-max", "GET", "/v2/sandboxes?limit=100000", {}, 400),
    ("list-state-dead", "GET", "/v2/sandboxes?state=dead", {}, 400),
    ("list-state-killed", "GET", "/v2/sandboxes?state=killed", {}, 400),
    ("list-state-mixed", "GET", "/v2/sandboxes?state=running,dead", {}, 400),
    ("list-order-up", "GET", "/v2/sandboxes?order=up", {}, 400),
    ("list-next-token-garbage", "GET", "/v2/sandboxes?nextToken=garbage!!", {}, 400),
    ("list-next-token-base64-junk", "GET", "/v2/sandboxes?nextToken=Zm9vOmJhcg", {}, 400),
    ("list-next-token-huge", "GET", "/v2/sandboxes?nextToken=" + "A" * 5000, {}, 400),
    ("list-started-after-bad", "GET", "/v2/sandboxes?startedAfter=yesterday", {}, 400),
    ("list-v1-state-dead", "GET", "/sandboxes?state=dead", {}, 400),
    ("metrics-start-text", "GET", f"/sandboxes/{ID}/metrics?start=soon", {}, 400),
    (
        "list-metadata-1000-pairs",
        "GET",
        "/v2/sandboxes?" + urllib.parse.urlencode({"metadata": urllib.parse.urlencode({f"k{i}": "v" for i in range(1000)})}),
        {},
        400,
    ),
    (
        "list-v1-metadata-1000-pairs",
        "GET",
        "/sandboxes?" + urllib.parse.urlencode({"metadata": urllib.parse.urlencode({f"k{i}": "v" for i in range(1000)})}),
        {},
        400,
    ),
    # --- timeout / connect / refresh on the live sandbox: nothing may move its deadline ---
    ("timeout-negative", "POST", f"/sandboxes/{ID}/timeout", {"json": {"timeout": -5}}, 400),
    ("timeout-zero", "POST", f"/sandboxes/{ID}/timeout", {"json": {"timeout": 0}}, 400),
    ("timeout-over-max", "POST", f"/sandboxes/{ID}/timeout", {"json": {"timeout": 86_401}}, 400),
    ("timeout-string", "POST", f"/sandboxes/{ID}/timeout", {"json": {"timeout": "60"}}, 400),
    ("timeout-missing-field", "POST", f"/sandboxes/{ID}/timeout", {"json": {}}, 400),
    ("timeout-empty-body", "POST", f"/sandboxes/{ID}/timeout", {"content": b""}, 400),
    ("timeout-unknown-field", "POST", f"/sandboxes/{ID}/timeout", {"json": {"timeout": 60, "x": 1}}, 400),
    ("timeout-malformed", "POST", f"/sandboxes/{ID}/timeout", {"content": b"[1,2"}, 400),
    ("timeout-oversized", "POST", f"/sandboxes/{ID}/timeout", {"content": b'{"timeout":' + b" " * (MIB + 10) + b"5}"}, 413),
    ("connect-timeout-zero", "POST", f"/v2/sandboxes/{ID}/connect", {"json": {"timeout": 0}}, 400),
    ("connect-timeout-negative", "POST", f"/v2/sandboxes/{ID}/connect", {"json": {"timeout": -1}}, 400),
    ("connect-unknown-field", "POST", f"/v2/sandboxes/{ID}/connect", {"json": {"bogus": True}}, 400),
    ("refresh-negative", "POST", f"/sandboxes/{ID}/refreshes", {"json": {"duration": -1}}, 400),
    ("resume-running", "POST", f"/sandboxes/{ID}/resume", {"json": {}}, 409),
    # --- sandbox proxy headers (not REST, same error contract) ---
    ("proxy-port-zero", "GET", "/health", {"headers": {"E2b-Sandbox-Id": MISSING, "E2b-Sandbox-Port": "0"}}, 400),
    ("proxy-port-text", "GET", "/health", {"headers": {"E2b-Sandbox-Id": MISSING, "E2b-Sandbox-Port": "http"}}, 400),
    ("proxy-id-not-ascii", "GET", "/health", {"headers": {"E2b-Sandbox-Id": b"\xc3\xa9"}}, 400),
]


@pytest.fixture
def unchanged(daemon, sandbox):
    """Nothing a bad request does may change the daemon's state."""

    def snapshot():
        detail = daemon.client().get(f"/sandboxes/{sandbox.sandbox_id}").json()
        return {
            "listed": sorted(daemon.list_ids()),
            "dirs": sorted(daemon.sandbox_dirs()),
            "endAt": detail["endAt"],
            "state": detail["state"],
        }

    before = snapshot()
    yield
    after = snapshot()
    assert after == before, "a rejected request changed the daemon's state"


@pytest.mark.parametrize(
    "method,path,kwargs,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request(daemon, sandbox, unchanged, method, path, kwargs, expected):
    kwargs = dict(kwargs)
    path = path.replace(ID, sandbox.sandbox_id)
    if "chunks" in kwargs:
        chunks = kwargs.pop("chunks")
        kwargs["content"] = iter(chunks)
    c = daemon.client()
    r = c.request(method, path, **kwargs)
    if r.status_code == 201:  # a bad request created a sandbox: undo it, then fail
        sid = r.json().get("sandboxID", "")
        harness.track(sid)
        c.delete(f"/sandboxes/{sid}")
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert r.status_code in expected, f"{method} {path[:80]}: {r.status_code} {r.text[:300]}"
    body = harness.assert_error_body(r)
    assert body["message"], "empty error message"


def test_not_implemented_endpoints_are_501_json(daemon, sandbox, unchanged):
    """Filesystem-only pauses and snapshots and auto-resume are documented as not
    implemented (501); deleting a template in use is a conflict (409)."""
    sid = sandbox.sandbox_id
    with daemon.http() as c:
        for method, path, body in [
            ("POST", f"/sandboxes/{sid}/pause", {"memory": False}),
            ("POST", f"/sandboxes/{sid}/snapshots", {"memory": False}),
            ("POST", "/v2/sandboxes", {"templateID": "base", "autoPause": True, "autoPauseMemory": False}),
            ("POST", "/v2/sandboxes", {"templateID": "base", "autoResume": {"enabled": True}}),
        ]:
            r = c.request(method, path, json=body)
            b = harness.assert_error_body(r, 501)
            assert "not implemented" in b["message"], b
        b = harness.assert_error_body(c.delete("/templates/base"), 409)
        assert "it is in use" in b["message"], b


def test_error_bodies_are_parsed_by_the_sdk(conn):
    """The SDK turns our 400s into SandboxException with the status, not a KeyError."""
    from e2b import Sandbox, SandboxException

    with pytest.raises(SandboxException) as ei:
        Sandbox.create(timeout=0 or -1, **conn)
    assert "400" in str(ei.value)


def test_bad_json_never_creates_anything(daemon, unchanged):
    """A valid body with garbage around it is still rejected as a whole."""
    with daemon.http() as c:
        for body in (
            b'{"templateID":"base"}{"templateID":"base"}',
            b'[{"templateID":"base"}]',
            b'{"templateID":"base","templateID":"base"}',
        ):
            r = c.post("/v2/sandboxes", content=body)
            if r.status_code == 201:
                sid = json.loads(r.text)["sandboxID"]
                harness.track(sid)
                c.delete(f"/sandboxes/{sid}")
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            harness.assert_error_body(r)
