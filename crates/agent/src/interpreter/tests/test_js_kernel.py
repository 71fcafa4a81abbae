"""The JavaScript kernel (node), driven through real pipes."""

import json
import os
import signal
import time

import pytest

import kernel_harness as harness
from kernel_harness import by_type


def main_text(events):
    results = [e for e in by_type(events, "result") if e["is_main_result"]]
    assert len(results) == 1, events
    return results[0]["text"]


def no_result(events):
    assert by_type(events, "result") == [], events
    assert by_type(events, "error") == [], events


def test_ready(js):
    assert js.ready_event == {"type": "ready", "pid": js.pid, "language": "javascript"}


def test_hello_and_last_expression(js):
    events = js.execute("console.log('hello world')\n1 + 1")
    assert [e["type"] for e in events] == ["stdout", "result", "number_of_executions", "end_of_execution"]
    assert events[0]["text"] == "hello world\n"
    assert events[1]["text"] == "2" and events[1]["is_main_result"] is True
    models = pytest.importorskip("e2b_code_interpreter.models")
    execution = models.Execution()
    for e in events:
        models.parse_output(execution, json.dumps({k: v for k, v in e.items() if k != "id"}))
    assert execution.text == "2" and execution.logs.stdout == ["hello world\n"]


def test_result_text(js):
    assert main_text(js.execute("'abc'")) == "abc"
    assert main_text(js.execute("({a: 1, b: [1, 2]})")) == "{ a: 1, b: [ 1, 2 ] }"
    assert main_text(js.execute("null")) == "null"
    no_result(js.execute("undefined"))
    no_result(js.execute("let nothing"))


def test_let_and_const_persist_and_can_be_redeclared(js):
    no_result(js.execute("let a = 1\nconst b = 2"))
    assert main_text(js.execute("a + b")) == "3"
    assert main_text(js.execute("let a = 10; a")) == "10"
    assert main_text(js.execute("const b = 20; a + b")) == "30"
    js.execute("const {p, q: [r, s = 4]} = {p: 1, q: [3]}")
    assert main_text(js.execute("[p, r, s]")) == "[ 1, 3, 4 ]"


def test_functions_and_classes_persist(js):
    js.execute("function twice(x) { return 2 * x }\nclass Point { constructor(x) { this.x = x } }")
    assert main_text(js.execute("twice(new Point(21).x)")) == "42"
    js.execute("class Point { constructor(x) { this.x = x + 1 } }")  # redefined
    assert main_text(js.execute("new Point(1).x")) == "2"


def test_top_level_await(js):
    events = js.execute("const v = await new Promise(r => setTimeout(() => r(21), 50))\nv * 2")
    assert main_text(events) == "42"
    assert main_text(js.execute("v")) == "21"  # declared with await: still global
    assert main_text(js.execute("let w = await Promise.resolve(1), u\n[w, u]")) == "[ 1, undefined ]"
    assert main_text(js.execute("async function later() { return 'later' }\nawait later()")) == "later"
    assert main_text(js.execute("await later()")) == "later"


def test_imports(js):
    assert main_text(js.execute("import path from 'path'\npath.join('a', 'b')")) == "a/b"
    assert main_text(js.execute("import { basename as bn } from 'path'\nbn('/x/y.txt')")) == "y.txt"
    assert main_text(js.execute("const os = require('os'); typeof os.cpus")) == "function"
    assert main_text(js.execute("const { sep } = await import('path'); sep")) == "/"


def test_console_order_and_streams(js):
    events = js.execute(
        "console.log('one'); console.error('two'); console.warn('three'); console.info('four');"
        "process.stdout.write('five\\n'); 'six'"
    )
    seen = [(e["type"], e.get("text")) for e in events if e["type"] in ("stdout", "stderr", "result")]
    assert seen == [("stdout", "one\n"), ("stderr", "two\n"), ("stderr", "three\n"),
                    ("stdout", "four\n"), ("stdout", "five\n"), ("result", "six")]


def test_console_streams_during_a_sync_loop(js):
    started = time.monotonic()
    timed = js.execute(
        "for (let i = 0; i < 3; i++) { console.log(i); const end = Date.now() + 300; while (Date.now() < end) {} }",
        timed=True,
    )
    outs = [t - started for t, e in timed if e["type"] == "stdout"]
    end = [t - started for t, e in timed if e["type"] == "end_of_execution"][0]
    assert len(outs) == 3
    assert outs[0] < end - 0.5


def test_error_with_stack(js):
    events = js.execute("function boom() { throw new TypeError('bad thing') }\nboom()")
    err = by_type(events, "error")[0]
    assert err["name"] == "TypeError" and err["value"] == "bad thing"
    assert "at boom" in err["traceback"] and "<cell-" in err["traceback"]
    assert "node:internal" not in err["traceback"]
    assert events[-1]["type"] == "end_of_execution"
    err = by_type(js.execute("null.x"), "error")[0]
    assert err["name"] == "TypeError"


def test_syntax_error_and_thrown_values(js):
    err = by_type(js.execute("let q = "), "error")[0]
    assert err["name"] == "SyntaxError"
    assert "let q" in err["traceback"]  # the user's code, not our rewrite of it
    err = by_type(js.execute("throw 'boom'"), "error")[0]
    assert err["value"] == "boom"
    err = by_type(js.execute("await Promise.reject(new RangeError('later'))"), "error")[0]
    assert (err["name"], err["value"]) == ("RangeError", "later")


def test_execution_count(js):
    a = by_type(js.execute("1"), "number_of_executions")[0]["execution_count"]
    b = by_type(js.execute("throw 1"), "number_of_executions")[0]["execution_count"]
    assert b == a + 1


def test_env(js):
    js.execute("delete process.env.CUBICLE_J")
    events = js.execute("process.env.CUBICLE_J", env={"CUBICLE_J": "set"})
    assert main_text(events) == "set"
    assert main_text(js.execute("String(process.env.CUBICLE_J)")) == "undefined"


def test_interrupt_sync_loop(js):
    js.send({"op": "execute", "id": "spin", "code": "while (true) {}", "env": {}})
    time.sleep(0.5)
    js.signal(signal.SIGINT)
    events = js.collect("spin", timeout=10)
    assert by_type(events, "error")[0]["name"] == "KeyboardInterrupt"
    assert main_text(js.execute("'alive'")) == "alive"


def test_interrupt_pending_await(js):
    js.send({"op": "execute", "id": "wait", "code": "await new Promise(() => {})", "env": {}})
    time.sleep(0.5)
    js.signal(signal.SIGINT)
    events = js.collect("wait", timeout=10)
    assert by_type(events, "error")[0]["name"] == "KeyboardInterrupt"
    js.signal(signal.SIGINT)  # idle: ignored
    time.sleep(0.2)
    assert main_text(js.execute("1")) == "1"


def test_errors_in_callbacks_do_not_kill_the_kernel(js):
    js.execute("setTimeout(() => { throw new Error('late') }, 10); Promise.reject(new Error('nobody'))")
    time.sleep(0.3)
    assert main_text(js.execute("'still here'")) == "still here"
    assert b"late" in bytes(js.stderr)


def test_large_output(js):
    events = js.execute("console.log('y'.repeat(5 * 1024 * 1024))")
    outs = by_type(events, "stdout")
    assert sum(len(e["text"]) for e in outs) == 5 * 1024 * 1024 + 1
    assert max(len(e["text"]) for e in outs) <= 64 * 1024


def test_closing_requests_stops_the_kernel():
    kernel = harness.start_kernel(harness.node_argv())
    kernel.execute("setInterval(() => {}, 1000)")  # a live timer does not keep it alive
    status = harness.stop(kernel)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# Code the cell rewriting (declarations, top-level await) must leave meaning the same.
REWRITE_CASES = [
    ("const A = class { m() { return 1 } }\nnew A().m()", "1"),
    ("let s = `a${'}'}b`; s", "a}b"),
    ("let re = /[/]/.source; re", "[/]"),
    ("let a1 = 4, b1 = a1 / 2\nb1", "2"),
    ("outer: for (let i = 0; i < 2; i++) { for (;;) { continue outer } }\n'done'", "done"),
    ("do { var dd = 1 } while (false)\ndd", "1"),
    ("let obj = {\n  x: 1,\n  y: [1, 2],\n}\nobj.y.length", "2"),
    ("if (true) { let inner = 5 }\ntypeof inner", "undefined"),
    ("let z1 = 1\n;[1, 2].map(v => v + z1)", "[ 2, 3 ]"),
    ("const f2 = async () => {\n  return 3\n}\nawait f2()", "3"),
    ("let [m1, ...rest] = await Promise.resolve([1, 2, 3])\nrest", "[ 2, 3 ]"),
    ("const { a: { b: deep } = { b: 9 } } = {}\nawait 0\ndeep", "9"),
    ("let t2 = 0\nfor await (const v of (async function*() { yield 1; yield 2 })()) t2 += v\nt2", "3"),
    ("try { JSON.parse('{') } catch (e) { 'caught' }", "caught"),
    ("let q1 = 1 // comment with `backtick\nq1", "1"),
    ("/* block\ncomment */ let q2 = 2; q2", "2"),
    ("const x3 = 1\nconst y3 = x3\n  + 1\ny3", "2"),
    ("class B2 extends Array {}\nnew B2().length", "0"),
    ("function* gen() { yield 1 }\n[...gen()]", "[ 1 ]"),
    ("let n5 = 0\nn5++\nn5", "1"),
    ("await null; const e7 = 2 ** 3; e7", "8"),
]


@pytest.mark.parametrize("code,expected", REWRITE_CASES)
def test_rewriting_keeps_meaning(js, code, expected):
    assert main_text(js.execute(code)) == expected
