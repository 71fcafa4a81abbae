"""The unmodified `e2b-code-interpreter` SDK against Cubicle's code interpreter (port
49999 of `code-interpreter` sandboxes): the seed's hello world, state, streaming output,
errors, rich results, contexts, other languages, timeouts, crashes, concurrency, bad
input, and what the kernels can see of the host.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import struct
import time

import httpx
import pytest
from e2b import NotFoundException, SandboxException, TimeoutException
from e2b_code_interpreter import Sandbox
from e2b_code_interpreter.charts import ChartType
from e2b_code_interpreter.models import Context

import harness

TEMPLATE = "code-interpreter"


@pytest.fixture(scope="module")
def ci(conn):
    """One code-interpreter sandbox shared by the module's tests: each test uses names
    or contexts of its own."""
    sbx = harness.create_ci(conn, TEMPLATE, timeout=900)
    yield sbx
    harness.kill_quietly(sbx)


def interpreter(sbx, daemon) -> httpx.Client:
    """Raw HTTP to a sandbox's port 49999 through the daemon's proxy, as the SDK goes."""
    return httpx.Client(
        base_url=daemon.url,
        headers={
            "E2b-Sandbox-Id": sbx.sandbox_id,
            "E2b-Sandbox-Port": "49999",
            "X-Access-Token": sbx._envd_access_token or "",
        },
        timeout=30,
    )


# --- the seed's use ----------------------------------------------------------------------


def test_seed_hello_world(conn):
    """Section 3.1 of the seed's report, with the template named."""
    with Sandbox.create(template=TEMPLATE, **conn) as sandbox:
        harness.track(sandbox.sandbox_id)
        result = sandbox.run_code("print('Hello from Cube Sandbox, safely isolated!')")
    assert result.error is None
    assert result.logs.stdout == ["Hello from Cube Sandbox, safely isolated!\n"]
    assert result.logs.stderr == []


def test_sdk_default_template_is_served(conn):
    """`Sandbox.create()` asks for `code-interpreter-v1`: an alias of our template."""
    sbx = harness.create_ci(conn)
    try:
        info = sbx.get_info()
        assert info.template_id == TEMPLATE
        assert sbx.run_code("6 * 7").text == "42"
    finally:
        harness.kill_quietly(sbx)


def test_interpreter_is_warm_when_create_returns(ci):
    """The scientific stack is imported before the first `run_code` (a fresh kernel of
    the default context already has it)."""
    ctx = ci.create_code_context()
    r = ci.run_code("import sys; sorted(m for m in ('numpy', 'pandas', 'matplotlib') if m in sys.modules)", context=ctx)
    assert r.error is None
    assert r.text == "['matplotlib', 'numpy', 'pandas']"


def test_state_persists_between_runs(ci):
    assert ci.run_code("x_state = 41").error is None
    r = ci.run_code("x_state + 1")
    assert r.text == "42"
    assert r.results[0].is_main_result
    assert r.execution_count is not None and r.execution_count >= 2


# --- output --------------------------------------------------------------------------


def test_stdout_and_stderr_reach_callbacks_in_order(ci):
    seen = []
    code = (
        "import sys\n"
        "print('one')\n"
        "print('two', file=sys.stderr)\n"
        "print('three')\n"
    )
    r = ci.run_code(
        code,
        on_stdout=lambda m: seen.append(("out", m.line)),
        on_stderr=lambda m: seen.append(("err", m.line)),
    )
    assert r.error is None
    assert "".join(t for _, t in seen) == "one\ntwo\nthree\n"
    # Merged in the order written: stdout, then stderr, then stdout again.
    kinds = [k for k, _ in seen]
    assert kinds.index("err") > kinds.index("out")
    assert kinds[-1] == "out"
    assert r.logs.stdout and r.logs.stderr == ["two\n"]


def test_output_streams_while_the_code_runs(ci):
    started = time.monotonic()
    arrivals = []
    r = ci.run_code(
        "import time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')",
        on_stdout=lambda m: arrivals.append((m.line, time.monotonic() - started)),
    )
    assert r.error is None
    assert [a[0] for a in arrivals] == ["first\n", "second\n"]
    assert arrivals[0][1] < arrivals[1][1] - 1.0, arrivals


def test_output_carries_rfc3339_timestamps(ci):
    """As upstream (the Jupyter message date; the SDK passes it through untouched)."""
    from datetime import datetime, timezone

    before = datetime.now(timezone.utc).timestamp()
    lines = []
    ci.run_code("print('t')", on_stdout=lines.append)
    assert len(lines) == 1
    stamp = datetime.fromisoformat(lines[0].timestamp).timestamp()
    assert before - 5 < stamp < datetime.now(timezone.utc).timestamp() + 5


def test_zero_division_is_an_error_with_a_traceback(ci):
    errors = []
    r = ci.run_code("def f():\n    return 1 / 0\nf()", on_error=errors.append)
    assert r.error is not None
    assert r.error.name == "ZeroDivisionError"
    assert "division by zero" in r.error.value
    assert "ZeroDivisionError" in r.error.traceback
    assert "return 1 / 0" in r.error.traceback
    assert errors and errors[0].name == "ZeroDivisionError"
    assert r.results == []


def test_syntax_error_is_an_error(ci):
    r = ci.run_code("def (:")
    assert r.error is not None and r.error.name == "SyntaxError"


# --- rich results ----------------------------------------------------------------------


def test_dataframe_comes_back_as_html_and_text(ci):
    r = ci.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
    assert r.error is None
    [result] = r.results
    assert result.is_main_result
    assert "<table" in result.html and "</table>" in result.html
    assert "a" in result.text and "b" in result.text


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_matplotlib_figure_comes_back_as_png_and_chart(ci):
    r = ci.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9], label='squares')\n"
        "plt.title('growth')\n"
        "plt.show()\n"
    )
    assert r.error is None
    pngs = [x for x in r.results if x.png]
    assert len(pngs) == 1, r.results
    width, height = png_size(base64.b64decode(pngs[0].png))
    assert width > 100 and height > 100
    chart = pngs[0].chart
    assert chart is not None and chart.type == ChartType.LINE
    assert chart.title == "growth"


def test_figure_as_last_expression_is_shown_like_jupyter(ci):
    """As in Jupyter: the value of `fig` (the main result) and the inline backend's
    display of the cell's open figure; closed figures are not shown again."""
    r = ci.run_code(
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.bar(['a', 'b'], [3, 5])\nfig"
    )
    assert r.error is None
    pngs = [x for x in r.results if x.png]
    assert len(pngs) == 2 and sum(x.is_main_result for x in pngs) == 1
    assert pngs[0].chart is not None and pngs[0].chart.type == ChartType.BAR
    r = ci.run_code("plt.close('all')\n1")
    assert [x.text for x in r.results] == ["1"]


def test_display_and_last_expression(ci):
    r = ci.run_code(
        "from IPython.display import display, HTML\n"
        "display(HTML('<b>shown</b>'))\n"
        "{'answer': 42}"
    )
    assert r.error is None
    assert len(r.results) == 2
    shown, last = r.results
    assert not shown.is_main_result and "<b>shown</b>" in shown.html
    assert last.is_main_result and last.text == "{'answer': 42}"
    assert last.json == {"answer": 42}


def test_svg_result(ci):
    r = ci.run_code(
        "from IPython.display import SVG\n"
        "SVG('<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"4\" height=\"4\"></svg>')"
    )
    assert r.error is None
    assert r.results[0].svg.startswith("<svg")


# --- environment -----------------------------------------------------------------------


def test_per_execution_env_vars(ci):
    r = ci.run_code("import os; os.environ.get('CI_ONLY_HERE')", envs={"CI_ONLY_HERE": "yes"})
    assert r.text == "yes"
    r = ci.run_code("import os; os.environ.get('CI_ONLY_HERE', 'gone')")
    assert r.text == "gone"


def test_sandbox_env_vars_reach_the_kernel(conn):
    sbx = harness.create_ci(conn, TEMPLATE, envs={"FROM_CREATE": "hello"})
    try:
        assert sbx.run_code("import os; os.environ['FROM_CREATE']").text == "hello"
        assert sbx.run_code("import os; os.getcwd()").text == "/home/user"
        assert sbx.run_code("import getpass; getpass.getuser()").text == "user"
    finally:
        harness.kill_quietly(sbx)


# --- contexts --------------------------------------------------------------------------


def test_contexts_lifecycle_and_isolation(ci):
    a = ci.create_code_context()
    b = ci.create_code_context(cwd="/tmp", language="python")
    assert a.id != b.id
    assert a.language == "python" and b.cwd == "/tmp"
    ids = {c.id for c in ci.list_code_contexts()}
    assert {a.id, b.id} <= ids

    assert ci.run_code("iso = 'in a'", context=a).error is None
    r = ci.run_code("iso", context=b)
    assert r.error is not None and r.error.name == "NameError"
    assert ci.run_code("import os; os.getcwd()", context=b).text == "/tmp"
    assert ci.run_code("iso", context=a).text == "in a"

    ci.restart_code_context(a)
    r = ci.run_code("iso", context=a)
    assert r.error is not None and r.error.name == "NameError"
    assert ci.run_code("1 + 1", context=a).text == "2"

    ci.remove_code_context(b)
    assert b.id not in {c.id for c in ci.list_code_contexts()}
    with pytest.raises(NotFoundException):
        ci.run_code("1", context=b)
    ci.remove_code_context(a)


def test_default_contexts_are_listed(ci):
    languages = {c.language for c in ci.list_code_contexts()}
    assert {"python", "javascript"} <= languages


# --- other languages -------------------------------------------------------------------


def test_javascript(ci):
    r = ci.run_code("const jsv = 20; console.log('js says', jsv); jsv * 2 + 2", language="javascript")
    assert r.error is None
    assert r.text == "42"
    assert r.logs.stdout == ["js says 20\n"]
    assert ci.run_code("jsv + 1", language="javascript").text == "21"
    r = ci.run_code("null.x", language="javascript")
    assert r.error is not None and r.error.name == "TypeError"


def test_javascript_context(ci):
    ctx = ci.create_code_context(language="javascript")
    assert ci.run_code("let only = 1; only", context=ctx).text == "1"
    r = ci.run_code("typeof only", language="javascript")
    assert r.text == "undefined"


def test_bash(ci):
    r = ci.run_code("BV=5\necho $((BV * 2))", language="bash")
    assert r.error is None
    assert r.logs.stdout == ["10\n"]
    assert ci.run_code("echo $BV", language="bash").logs.stdout == ["5\n"]
    r = ci.run_code("echo oops >&2; false", language="bash")
    assert r.logs.stderr == ["oops\n"]
    assert r.error is not None


# --- timeouts, interrupts, crashes -----------------------------------------------------


def test_infinite_loop_stopped_by_timeout_then_the_context_still_works(ci):
    ctx = ci.create_code_context()
    assert ci.run_code("kept = 'still here'", context=ctx).error is None
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        ci.run_code("while True:\n    pass", context=ctx, timeout=2)
    assert time.monotonic() - started < 10
    # The client left: the kernel was interrupted, the context and its state survive.
    r = ci.run_code("kept", context=ctx, timeout=30)
    assert r.error is None and r.text == "still here"
    ci.remove_code_context(ctx)


def test_kernel_crash_is_an_error_and_the_next_run_gets_a_fresh_kernel(ci):
    ctx = ci.create_code_context()
    assert ci.run_code("doomed = 1", context=ctx).error is None
    r = ci.run_code("import os\nos._exit(1)", context=ctx)
    assert r.error is not None
    r = ci.run_code("1 + 1", context=ctx)
    assert r.error is None and r.text == "2"
    r = ci.run_code("doomed", context=ctx)
    assert r.error is not None and r.error.name == "NameError"
    ci.remove_code_context(ctx)


def test_ten_sandboxes_run_code_concurrently(conn):
    def one(i):
        sbx = harness.create_ci(conn, TEMPLATE)
        try:
            r = sbx.run_code(f"import numpy as np\nint(np.arange({i + 1}).sum())")
            return sbx.sandbox_id, r.error, r.text
        finally:
            harness.kill_quietly(sbx)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    assert len({r[0] for r in results}) == 10
    for i, (_, error, text) in enumerate(results):
        assert error is None
        assert text == str(sum(range(i + 1)))


# --- bad input -------------------------------------------------------------------------


def test_unknown_language_is_refused(ci):
    with pytest.raises(SandboxException) as e:
        ci.run_code("1", language="cobol")
    assert "400" in str(e.value) and "not supported" in str(e.value)
    with pytest.raises(SandboxException) as e:
        ci.create_code_context(language="cobol")
    assert "not supported" in str(e.value)


def test_unknown_context_is_not_found(ci):
    ghost = Context(context_id="no-such-context", language="python", cwd="/home/user")
    with pytest.raises(NotFoundException):
        ci.run_code("1", context=ghost)
    with pytest.raises(NotFoundException):
        ci.restart_code_context(ghost)
    with pytest.raises(NotFoundException):
        ci.remove_code_context(ghost)


def test_malformed_requests_are_400(ci, daemon):
    with interpreter(ci, daemon) as http:
        for body in [b"{not json", b"[]", b'{"code": 5}', b"{}", b'"code"']:
            r = http.post("/execute", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (body, r.status_code, r.text)
            assert r.text.strip(), body
        r = http.post("/execute", json={"code": "1", "language": "python", "context_id": "x"})
        assert r.status_code == 400 and "mutually exclusive" in r.text
        r = http.post("/contexts", json={"cwd": "/no/such/dir"})
        assert r.status_code == 400 and "not an existing directory" in r.text
        r = http.post("/contexts", content=b"{oops")
        assert r.status_code == 400
        r = http.get("/no-such-route")
        assert r.status_code == 404


def test_execute_needs_the_access_token(ci, daemon):
    with interpreter(ci, daemon) as http:
        r = http.post("/execute", json={"code": "1"}, headers={"X-Access-Token": "wrong"})
        assert r.status_code == 401
        r = http.post("/execute", json={"code": "1"})
        assert r.status_code == 200
        assert '"end_of_execution"' in r.text


def test_sandbox_without_interpreter_answers_clearly(sandbox, daemon):
    """A `base` sandbox has nothing on 49999: the proxy says so (the SDK raises)."""
    with interpreter(sandbox, daemon) as http:
        r = http.post("/execute", json={"code": "1"})
    assert r.status_code == 502
    assert "49999" in r.text


# --- isolation -------------------------------------------------------------------------


def test_kernels_are_confined_like_any_sandbox_process(ci):
    code = (
        "import os, json\n"
        "status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
        "mounts = {l.split()[0] for l in open('/proc/self/mountinfo')}\n"
        "fds = {}\n"
        "for f in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        mnt = [l.split()[1] for l in open('/proc/self/fdinfo/' + f) if l.startswith('mnt_id:')][0]\n"
        "        fds[f] = (os.readlink('/proc/self/fd/' + f), mnt in mounts)\n"
        "    except OSError:\n"
        "        pass\n"
        "json.dumps({\n"
        "  'uid': status['Uid'].split()[0], 'eff': status['CapEff'], 'seccomp': status['Seccomp'],\n"
        "  'cgroup': open('/proc/self/cgroup').read().split(),\n"
        "  'fds': fds,\n"
        "  'host_dir': os.path.exists('/run/host'),\n"
        "  'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),\n"
        "  'cmds': [open('/proc/%s/cmdline' % p, 'rb').read().split(b'\\0')[0].decode() for p in os.listdir('/proc') if p.isdigit()],\n"
        "})"
    )
    r = ci.run_code(code)
    assert r.error is None, r.error
    import json

    seen = json.loads(r.text)
    assert seen["uid"] == "1000"
    assert seen["eff"] == "0000000000000000"
    assert seen["seccomp"] == "2"
    assert all(line.endswith(":/") for line in seen["cgroup"]), seen["cgroup"]
    assert not seen["host_dir"]
    # Every open file is on one of the sandbox's own mounts (what CRIU needs, too):
    # nothing of the host's or of the template zygote's.
    for fd, (link, ours) in seen["fds"].items():
        assert ours or link.startswith(("pipe:", "socket:", "anon_inode:")), (fd, link)
        assert not link.startswith("/run/host"), (fd, link)
    # The agent is pid 1; no process of the host (or of the template zygote) is visible.
    assert seen["pids"][0] == 1
    assert all(c in ("cubicle-agent", "python3", "node", "bash", "/bin/bash") or c.startswith("/") or c == "" for c in seen["cmds"]), seen["cmds"]
    assert not any("template-zygote" in c for c in seen["cmds"])


def test_template_zygote_restarts_after_it_dies(daemon, conn):
    zygotes = harness.template_zygotes(daemon)
    if not zygotes:
        # It starts in the background at daemon start; a create waits for it.
        harness.kill_quietly(harness.create_ci(conn, TEMPLATE))
        zygotes = harness.template_zygotes(daemon)
    assert len(zygotes) == 1, zygotes
    os.kill(zygotes[0], 9)
    harness.wait_until(lambda: not harness.pid_alive(zygotes[0]), 5, what="zygote gone")
    sbx = harness.create_ci(conn, TEMPLATE)
    try:
        assert sbx.run_code("2 ** 10").text == "1024"
    finally:
        harness.kill_quietly(sbx)
    replacement = harness.template_zygotes(daemon)
    assert len(replacement) == 1 and replacement != zygotes
