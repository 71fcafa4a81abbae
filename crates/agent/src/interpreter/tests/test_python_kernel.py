"""The Python kernel (without zygote), driven through real pipes."""

import base64
import json
import os
import re
import signal
import struct
import time

import pytest

import kernel_harness as harness
from kernel_harness import by_type, stdout_text
from kernel_harness import record_metric

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def main_result(events):
    mains = [e for e in by_type(events, "result") if e["is_main_result"]]
    assert len(mains) == 1, events
    return mains[0]


def sdk_execution(events):
    """Feeds the events (as the agent forwards them: without `id`) to the SDK's own
    NDJSON parser and returns its Execution."""
    models = pytest.importorskip("e2b_code_interpreter.models")
    execution = models.Execution()
    for event in events:
        line = json.dumps({k: v for k, v in event.items() if k != "id"})
        models.parse_output(execution, line)
    return execution


def png_size(b64):
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_source_fits_in_one_argv_string():
    # The agent passes the program as one argument: Linux limits one argv string to
    # 128 KiB (MAX_ARG_STRLEN).
    for name in ("python_kernel.py", "js_kernel.js", "bash_kernel.py"):
        assert len(harness.source(name).encode()) < 128 * 1024, name


def test_ready_event(py):
    assert py.ready_event == {"type": "ready", "pid": py.pid, "language": "python"}


def test_hello_world(py):
    events = py.execute("print('hello world')")
    assert [e["type"] for e in events] == ["stdout", "number_of_executions", "end_of_execution"]
    assert events[0]["text"] == "hello world\n"
    assert TS_RE.match(events[0]["timestamp"])
    assert all(e["id"] == events[0]["id"] for e in events)


def test_one_plus_one(py):
    events = py.execute("1+1")
    result = main_result(events)
    assert result["text"] == "2"
    assert result["is_main_result"] is True
    assert result["extra"] == {}
    assert by_type(events, "number_of_executions")[0]["execution_count"] >= 1
    assert events[-1]["type"] == "end_of_execution"
    execution = sdk_execution(events)
    assert execution.text == "2"
    assert execution.error is None


def test_state_persists(py):
    py.execute("counter = 41\ndef bump():\n    global counter\n    counter += 1\n    return counter")
    assert main_result(py.execute("bump()"))["text"] == "42"
    assert main_result(py.execute("counter"))["text"] == "42"


def test_execution_count_increments(py):
    a = by_type(py.execute("x = 1"), "number_of_executions")[0]["execution_count"]
    b = by_type(py.execute("x"), "number_of_executions")[0]["execution_count"]
    c = by_type(py.execute("1/0"), "number_of_executions")[0]["execution_count"]
    assert b == a + 1 and c == b + 1


def test_strings_lose_their_quotes(py):
    assert main_result(py.execute("'abc'"))["text"] == "abc"
    assert main_result(py.execute("\"it's\""))["text"] == "it's"
    assert main_result(py.execute("['a']"))["text"] == "['a']"


def test_semicolon_suppresses_result(py):
    assert by_type(py.execute("1+1;"), "result") == []


def test_prints_are_ordered_and_separate_from_stderr(py):
    events = py.execute(
        "import sys\nprint('one')\nprint('two', file=sys.stderr)\nprint('three')\n'done'"
    )
    kinds = [(e["type"], e.get("text")) for e in events if e["type"] in ("stdout", "stderr", "result")]
    assert kinds == [("stdout", "one\n"), ("stderr", "two\n"), ("stdout", "three\n"), ("result", "done")]
    execution = sdk_execution(events)
    assert execution.logs.stdout == ["one\n", "three\n"]
    assert execution.logs.stderr == ["two\n"]


def test_print_is_one_event(py):
    # print() writes "text" and "\n" separately; they arrive as one chunk.
    events = py.execute("print('a', 'b')")
    assert [e["text"] for e in by_type(events, "stdout")] == ["a b\n"]


def test_output_streams_while_the_cell_runs(py):
    started = time.monotonic()
    timed = py.execute(
        "import time\nfor i in range(4):\n    print(i)\n    time.sleep(0.3)", timed=True
    )
    outs = [(t - started, e["text"]) for t, e in timed if e["type"] == "stdout"]
    end = [t - started for t, e in timed if e["type"] == "end_of_execution"][0]
    assert [text for _, text in outs] == ["0\n", "1\n", "2\n", "3\n"]
    # Each line arrived long before the end, roughly when it was printed.
    assert outs[0][0] < end - 0.8
    assert outs[1][0] < end - 0.5
    assert outs[2][0] - outs[0][0] > 0.4


def test_zero_division(py):
    events = py.execute("1/0")
    errors = by_type(events, "error")
    assert len(errors) == 1
    err = errors[0]
    assert err["name"] == "ZeroDivisionError"
    assert err["value"] == "division by zero"
    assert "Traceback" in err["traceback"] and "1/0" in err["traceback"]
    assert events[-2]["type"] == "number_of_executions"
    assert events[-1]["type"] == "end_of_execution"
    execution = sdk_execution(events)
    assert execution.error.name == "ZeroDivisionError"


def test_error_after_output(py):
    events = py.execute("print('before')\nraise ValueError('bad value')")
    assert [e["type"] for e in events] == ["stdout", "error", "number_of_executions", "end_of_execution"]
    assert events[1]["name"] == "ValueError" and events[1]["value"] == "bad value"


def test_syntax_error(py):
    events = py.execute("def f(:\n    pass")
    err = by_type(events, "error")[0]
    assert err["name"] == "SyntaxError"
    assert "invalid syntax" in err["value"]
    assert "def f(:" in err["traceback"]
    assert events[-1]["type"] == "end_of_execution"
    # The kernel stays usable.
    assert main_result(py.execute("2*3"))["text"] == "6"


def test_dataframe_is_html_and_text(py):
    events = py.execute("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', None]})")
    result = main_result(events)
    assert "<table" in result["html"]
    assert "a" in result["text"] and "b" in result["text"]
    assert result["data"] == {"a": [1, 2], "b": ["x", None]}
    execution = sdk_execution(events)
    assert execution.results[0].html == result["html"]


def test_dict_result_carries_json(py):
    result = main_result(py.execute("{'a': [1, 2.5, float('nan')], 'b': None}"))
    assert result["json"] == {"a": [1, 2.5, None], "b": None}
    assert result["text"] == "{'a': [1, 2.5, nan], 'b': None}"
    # Objects that are not data get no json.
    assert "json" not in main_result(py.execute("[object()]"))


def test_matplotlib_line_chart(py):
    events = py.execute("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [4, 5, 6])")
    figures = [e for e in by_type(events, "result") if not e["is_main_result"]]
    assert len(figures) == 1
    fig = figures[0]
    width, height = png_size(fig["png"])
    assert width > 100 and height > 100
    assert fig["text"].startswith("<Figure size")
    chart = fig["chart"]
    assert chart["type"] == "line"
    assert chart["elements"][0]["points"] == [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]
    # The main result is the list of Line2D, like Jupyter.
    assert "Line2D" in main_result(events)["text"]
    charts = pytest.importorskip("e2b_code_interpreter.charts")
    parsed = charts._deserialize_chart(chart)
    assert isinstance(parsed, charts.LineChart)
    assert parsed.elements[0].points == [(1.0, 4.0), (2.0, 5.0), (3.0, 6.0)]
    assert parsed.x_scale == charts.ScaleType.LINEAR
    execution = sdk_execution(events)
    assert isinstance(execution.results[1].chart, charts.LineChart)


def test_matplotlib_labels_title_units(py):
    events = py.execute(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([0, 1], [2, 3], label='speed')\n"
        "plt.title('Run'); plt.xlabel('Time (s)'); plt.ylabel('Distance [m]')\n"
        "plt.show()"
    )
    chart = [e for e in by_type(events, "result") if "chart" in e][0]["chart"]
    assert chart["title"] == "Run"
    assert (chart["x_label"], chart["x_unit"]) == ("Time (s)", "s")
    assert (chart["y_label"], chart["y_unit"]) == ("Distance [m]", "m")
    assert chart["elements"][0]["label"] == "speed"
    assert all(isinstance(t, float) for t in chart["x_ticks"])
    assert len(chart["x_ticks"]) == len(chart["x_tick_labels"])


def test_matplotlib_bar_chart(py):
    events = py.execute(
        "import matplotlib.pyplot as plt\n"
        "plt.bar(['Author A', 'Author B', 'Author C'], [100, 200, 300], label='Books Sold')\n"
        "plt.show()"
    )
    result = [e for e in by_type(events, "result") if "chart" in e][0]
    png_size(result["png"])
    chart = result["chart"]
    assert chart["type"] == "bar"
    assert [(b["label"], b["value"], b["group"]) for b in chart["elements"]] == [
        ("Author A", 100.0, "Books Sold"), ("Author B", 200.0, "Books Sold"), ("Author C", 300.0, "Books Sold"),
    ]
    charts = pytest.importorskip("e2b_code_interpreter.charts")
    parsed = charts._deserialize_chart(chart)
    assert isinstance(parsed, charts.BarChart)
    assert [b.value for b in parsed.elements] == [100.0, 200.0, 300.0]


def test_matplotlib_scatter_pie_box_and_superchart(py):
    charts = pytest.importorskip("e2b_code_interpreter.charts")
    cases = {
        "plt.scatter([1, 2, 3], [3, 1, 2], label='pts')": charts.ScatterChart,
        "plt.pie([90, 10], labels=['No', 'Yes'])": charts.PieChart,
        "plt.boxplot([[1, 2, 3, 4, 100], [2, 3, 4]])": charts.BoxAndWhiskerChart,
        "fig, axs = plt.subplots(1, 2)\naxs[0].plot([1, 2])\naxs[1].bar(['a'], [1])\nfig.suptitle('Both')": charts.SuperChart,
    }
    for code, cls in cases.items():
        events = py.execute("import matplotlib.pyplot as plt\n" + code + "\nplt.show()")
        found = [e["chart"] for e in by_type(events, "result") if "chart" in e]
        assert len(found) == 1, (code, events)
        parsed = charts._deserialize_chart(found[0])
        assert isinstance(parsed, cls), code
    pie = charts._deserialize_chart(found_chart(py, "plt.pie([90, 10], labels=['No', 'Yes'])"))
    assert [(p.label, p.angle) for p in pie.elements] == [("No", 324.0), ("Yes", 36.0)]
    box = charts._deserialize_chart(found_chart(py, "plt.boxplot([[1, 2, 3, 4, 100]])"))
    element = box.elements[0]
    assert (element.min, element.first_quartile, element.median, element.third_quartile, element.max) == (1, 2, 3, 4, 4)
    assert element.outliers == [100]


def found_chart(py, code):
    events = py.execute("import matplotlib.pyplot as plt\n" + code + "\nplt.show()")
    return [e["chart"] for e in by_type(events, "result") if "chart" in e][0]


def test_figure_without_chart(py):
    events = py.execute("import matplotlib.pyplot as plt\nplt.imshow([[1, 2], [3, 4]])\nplt.show()")
    figures = [e for e in by_type(events, "result") if "png" in e]
    assert len(figures) == 1 and "chart" not in figures[0]


def test_display_objects(py):
    events = py.execute(
        "from IPython.display import display, HTML, Markdown, SVG, JSON, Latex, Javascript\n"
        "display(HTML('<b>bold</b>'))\n"
        "display(Markdown('# Title'))\n"
        "display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1\" height=\"1\"></svg>'))\n"
        "display(JSON({'k': [1, 2]}))\n"
        "display(Latex(r'$x^2$'))\n"
        "display(Javascript('1;'))\n"
    )
    results = by_type(events, "result")
    assert all(r["is_main_result"] is False for r in results)
    assert results[0]["html"] == "<b>bold</b>"
    assert results[1]["markdown"] == "# Title"
    assert results[2]["svg"].startswith("<svg")
    assert results[3]["json"] == {"k": [1, 2]}
    assert results[4]["latex"] == "$x^2$"
    assert results[5]["javascript"] == "1;"
    execution = sdk_execution(events)
    assert execution.text is None
    assert [sorted(r.formats()) for r in execution.results][:2] == [["html", "text"], ["markdown", "text"]]


def test_display_custom_mime_goes_to_extra(py):
    events = py.execute("from IPython.display import display\ndisplay({'application/x-thing': 'v', 'text/plain': 't'}, raw=True)")
    result = by_type(events, "result")[0]
    assert result["extra"] == {"application/x-thing": "v"}
    assert result["text"] == "t"


def test_env_is_set_and_restored(py):
    py.execute("import os\nos.environ.pop('CUBICLE_A', None)\nos.environ['CUBICLE_B'] = 'orig'")
    events = py.execute(
        "import os, subprocess\n"
        "print(os.environ['CUBICLE_A'], os.environ['CUBICLE_B'])\n"
        "subprocess.run(['sh', '-c', 'echo child $CUBICLE_A'])",
        env={"CUBICLE_A": "1", "CUBICLE_B": "2"},
    )
    assert stdout_text(events) == "1 2\n"
    assert "child 1" in py.stdout.decode()  # the subprocess saw it (raw fd 1)
    result = main_result(py.execute("os.environ.get('CUBICLE_A'), os.environ.get('CUBICLE_B')"))
    assert result["text"] == "(None, 'orig')"


def test_subprocess_output_is_raw_and_flushed_after_prints(py):
    before = len(py.stdout)
    events = py.execute("print('py-first')\n!echo from-shell")
    assert stdout_text(events) == "py-first\n"
    deadline = time.monotonic() + 5
    while b"from-shell" not in bytes(py.stdout[before:]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b"from-shell\n" in bytes(py.stdout[before:])


def test_stdin_is_not_the_request_pipe(py):
    events = py.execute("input()")
    assert by_type(events, "error")[0]["name"] == "EOFError"
    events = py.execute("import subprocess\nsubprocess.run(['cat']).returncode")
    assert main_result(events)["text"] == "0"


def test_interrupt(py):
    py.send({"op": "execute", "id": "spin", "code": "while True: pass", "env": {}})
    time.sleep(0.5)
    py.signal(signal.SIGINT)
    events = py.collect("spin", timeout=10)
    err = by_type(events, "error")[0]
    assert err["name"] == "KeyboardInterrupt"
    assert "while True: pass" in err["traceback"]
    assert "<string>" not in err["traceback"]
    assert [e["type"] for e in events][-2:] == ["number_of_executions", "end_of_execution"]
    assert main_result(py.execute("'alive'"))["text"] == "alive"


def test_interrupt_while_printing_keeps_the_stream_intact(py):
    py.send({"op": "execute", "id": "spam", "code": "while True: print('x' * 3000)", "env": {}})
    time.sleep(0.5)
    py.signal(signal.SIGINT)
    events = py.collect("spam", timeout=10)  # every line parsed as JSON by the harness
    assert by_type(events, "error")[0]["name"] == "KeyboardInterrupt"
    assert all(e["type"] != "__malformed__" for e in events)


def test_interrupt_system_command(py):
    py.send({"op": "execute", "id": "sleepy", "code": "!sleep 100\nprint('not reached')", "env": {}})
    time.sleep(0.7)
    py.signal(signal.SIGINT)
    events = py.collect("sleepy", timeout=10)
    assert by_type(events, "error")[0]["name"] == "KeyboardInterrupt"
    assert "not reached" not in stdout_text(events)


def test_sigint_while_idle_is_ignored(py):
    py.signal(signal.SIGINT)
    time.sleep(0.2)
    assert main_result(py.execute("3"))["text"] == "3"


def test_large_output_is_streamed_in_chunks(py):
    started = time.monotonic()
    events = py.execute("import sys\nfor i in range(50):\n    sys.stdout.write('x' * (1 << 20))")
    elapsed = time.monotonic() - started
    outs = by_type(events, "stdout")
    assert sum(len(e["text"]) for e in outs) == 50 << 20
    assert max(len(e["text"]) for e in outs) <= 64 * 1024
    record_metric("python: 50 MiB of stdout", "%.2f s in %d events" % (elapsed, len(outs)))
    maxrss = main_result(py.execute("import resource\nresource.getrusage(resource.RUSAGE_SELF).ru_maxrss"))["text"]
    assert int(maxrss) < 400 * 1024  # KiB: the 50 MiB were never held at once (twice)


def test_many_small_prints_are_coalesced(py):
    started = time.monotonic()
    events = py.execute("for i in range(100000): print(i)")
    elapsed = time.monotonic() - started
    outs = by_type(events, "stdout")
    assert "".join(e["text"] for e in outs) == "".join("%d\n" % i for i in range(100000))
    assert len(outs) < 2000
    record_metric("python: 100k print() calls", "%.2f s in %d events" % (elapsed, len(outs)))


def test_round_trip_latency(py):
    samples = []
    for _ in range(20):
        started = time.monotonic()
        py.execute("1+1")
        samples.append(time.monotonic() - started)
    samples.sort()
    median = samples[len(samples) // 2]
    record_metric("python: `1+1` round trip (median of 20)", "%.2f ms" % (median * 1000))
    assert median < 0.05


def test_os_exit_kills_the_kernel(fresh_py):
    fresh_py.send({"op": "execute", "id": "bye", "code": "import os\nos._exit(1)", "env": {}})
    assert fresh_py.events_closed.wait(10), "fd 3 did not close"
    status = harness.reap(fresh_py.pid, 10)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1


def test_background_process_does_not_hold_the_event_pipe(fresh_py):
    events = fresh_py.execute(
        "import subprocess\nsubprocess.Popen(['sleep', '30'], start_new_session=True).pid")
    sleeper = int(main_result(events)["text"])
    try:
        fresh_py.send({"op": "execute", "id": "bye", "code": "import os\nos._exit(3)", "env": {}})
        assert fresh_py.events_closed.wait(10), "fd 3 stayed open (inherited by a child?)"
        harness.reap(fresh_py.pid, 10)
    finally:
        os.kill(sleeper, signal.SIGKILL)
        harness.reap(sleeper, 10)  # re-parented to us (the subreaper)


def test_closing_requests_stops_the_kernel(fresh_py):
    fresh_py.execute("x = 1")
    status = harness.stop(fresh_py)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
