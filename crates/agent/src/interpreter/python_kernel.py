"""Cubicle Python kernel: runs code for one code-interpreter context.

Launched by cubicle-agent as ``python3 -c <this source> [--zygote]`` (the agent embeds
this file, so it is self-contained and must stay below the 128 KiB limit of one argv
string). The protocol is described in docs/interpreter.md:

  fd 0  requests, one JSON object per line        (agent -> kernel)
  fd 1  raw stdout of the kernel and its children  (kernel -> agent)
  fd 2  raw stderr                                 (kernel -> agent)
  fd 3  events, one JSON object per line           (kernel -> agent)
  fd 4  zygote only: unix socket carrying the fds of each new kernel (SCM_RIGHTS)

Without ``--zygote`` this process is one kernel serving on fds 0-3. With ``--zygote`` it
imports the scientific stack and IPython once, builds a pristine shell, then only forks:
every ``fork`` request becomes a kernel (a grandchild, re-parented to the agent) that
shares the imported modules copy-on-write.

With ``--template-zygote`` (started by ``cubicle-agent zygote``, outside any sandbox, one
per template) it does the same imports once per *template*, then turns every ``spawn``
request of the runtime on fd 3 into the first process of a new sandbox plus that
sandbox's own zygote and default kernel, all copies of this process (see "Template
zygote" in docs/interpreter.md).
"""

import os
import sys

# --- thread limits (zygote only) ------------------------------------------------------
# OpenBLAS (and OpenMP/MKL builds of numpy) start worker threads when numpy is imported.
# The zygote must be single-threaded when it forks, so the limits are set to 1 *only if
# the environment does not already set them*, and removed again from os.environ after the
# imports (user code and its subprocesses see the original environment). Each forked
# kernel then raises OpenBLAS back to its default thread count (one per usable CPU), see
# _restore_blas_threads().
_THREAD_VARS = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
_TEMPLATE_ZYGOTE = "--template-zygote" in sys.argv[1:]
_ZYGOTE = "--zygote" in sys.argv[1:] or _TEMPLATE_ZYGOTE
_LIMITED_VARS = []
if _ZYGOTE:
    for _name in _THREAD_VARS:
        if _name not in os.environ:
            os.environ[_name] = "1"
            _LIMITED_VARS.append(_name)

import atexit
import base64
import datetime
import gc
import io
import json
import math
import re
import signal
import socket
import subprocess
import threading
import time
import traceback

import numpy
import pandas
import matplotlib

matplotlib.use("module://matplotlib_inline.backend_inline")
import matplotlib.pyplot  # noqa: E402  (imported once, shared by every fork)
import matplotlib.dates as _mdates  # noqa: E402
import matplotlib.ticker  # noqa: E402
from matplotlib.axes import Axes as _Axes  # noqa: E402
from matplotlib.figure import Figure as _Figure  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg as _FigureCanvasAgg  # noqa: E402
import matplotlib_inline.backend_inline  # noqa: E402,F401  (loaded in the zygote)

from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from IPython.core.displayhook import DisplayHook  # noqa: E402
from IPython.core.displaypub import DisplayPublisher  # noqa: E402
from IPython.core.formatters import BaseFormatter, JSONFormatter  # noqa: E402
from traitlets import Type, Unicode, ObjectName  # noqa: E402
from traitlets.config import Config  # noqa: E402

for _name in _LIMITED_VARS:
    os.environ.pop(_name, None)

LANGUAGE = "python"
REQUEST_FD, STDOUT_FD, STDERR_FD, EVENT_FD, ZYGOTE_SOCKET_FD = 0, 1, 2, 3, 4

# Output coalescing: writes are buffered for at most FLUSH_DELAY seconds (so a print()
# that writes "text" and "\n" separately becomes one event, and a tight print loop does
# not produce one event per write), or until CHUNK characters are pending.
FLUSH_DELAY = 0.005
CHUNK = 64 * 1024

# Chart extraction gives up (no `chart` key) above this many points in one figure.
CHART_MAX_POINTS = 100_000
# DataFrames with more cells than this get html/text but no `data` key.
DATA_MAX_CELLS = 100_000

MIME_KEYS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}
BINARY_MIMES = {"image/png", "image/jpeg", "application/pdf"}


# --- JSON helpers ---------------------------------------------------------------------


def _timestamp(t=None):
    """RFC 3339 UTC timestamp with microseconds: 2025-01-01T12:00:00.123456Z."""
    if t is None:
        t = time.time()
    secs = int(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + ".%06dZ" % int(
        (t - secs) * 1e6
    )


def jsonable(value, depth=0):
    """Converts a value to plain JSON data: NaN/inf become null, numpy and pandas scalars
    become Python numbers, dates become ISO strings, bytes become base64."""
    if depth > 200:
        return None
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_json_key(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, depth + 1) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, numpy.ndarray):
        return jsonable(value.tolist(), depth + 1)
    if isinstance(value, numpy.generic):
        return jsonable(value.item(), depth + 1)
    if value is pandas.NaT:
        return None
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    try:
        if pandas.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def _json_key(key):
    if isinstance(key, str):
        return key
    if isinstance(key, (numpy.generic,)):
        key = key.item()
    if isinstance(key, (datetime.datetime, datetime.date)):
        return key.isoformat()
    if isinstance(key, bool) or key is None:
        return json.dumps(key)
    return str(key)


def encode_line(obj):
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):
        text = json.dumps(jsonable(obj), ensure_ascii=False, separators=(",", ":"))
    # Lone surrogates cannot be encoded as UTF-8; the agent needs valid UTF-8 JSON.
    return text.encode("utf-8", "replace") + b"\n"


def write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# --- the event channel (fd 3) ---------------------------------------------------------


class Channel:
    """Writes event lines. A line is written whole even if SIGINT arrives meanwhile: the
    main thread's writes are critical sections during which the SIGINT handler only
    records the interrupt; it is raised when the section ends."""

    def __init__(self, fd):
        self.fd = fd
        self.lock = threading.Lock()
        self.main_ident = threading.get_ident()
        self.critical = 0
        self.pending_interrupt = False
        self.disabled = False

    def enter(self):
        if threading.get_ident() == self.main_ident:
            self.critical += 1

    def leave(self):
        __tracebackhide__ = True  # noqa: F841 (IPython hides this frame)
        if threading.get_ident() == self.main_ident:
            self.critical -= 1
            if self.critical == 0 and self.pending_interrupt:
                self.pending_interrupt = False
                raise KeyboardInterrupt

    def emit(self, obj):
        if self.disabled:
            return
        line = encode_line(obj)
        self.enter()
        try:
            with self.lock:
                write_all(self.fd, line)
        finally:
            self.leave()


# --- stdout/stderr capture ------------------------------------------------------------


class Output:
    """Buffers sys.stdout/sys.stderr text of the running execution and emits it as
    `stdout`/`stderr` events: after FLUSH_DELAY, when CHUNK characters are pending, when
    the other stream is written, and before results, errors, subprocesses and the end of
    the execution. Outside an execution (e.g. a thread printing later) text goes raw to
    fds 1/2."""

    def __init__(self, channel):
        self.channel = channel
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.exec_id = None
        self.buf = []
        self.buf_len = 0
        self.buf_name = None
        self.buf_time = 0.0
        self.deadline = None
        self.thread = None

    def begin(self, exec_id):
        with self.lock:
            self.exec_id = exec_id

    def end(self):
        self.flush()
        with self.lock:
            self.exec_id = None

    def write(self, name, text):
        __tracebackhide__ = True  # noqa: F841
        channel = self.channel
        channel.enter()
        try:
            with self.lock:
                if self.exec_id is None:
                    write_all(STDOUT_FD if name == "stdout" else STDERR_FD,
                              text.encode("utf-8", "replace"))
                    return
                if self.buf and self.buf_name != name:
                    self._flush_locked()
                if len(text) >= CHUNK:
                    self._flush_locked()
                    for start in range(0, len(text), CHUNK):
                        self._emit_locked(name, text[start:start + CHUNK], time.time())
                    return
                if not self.buf:
                    self.buf_name = name
                    self.buf_time = time.time()
                self.buf.append(text)
                self.buf_len += len(text)
                if self.buf_len >= CHUNK:
                    self._flush_locked()
                elif self.deadline is None:
                    self.deadline = time.monotonic() + FLUSH_DELAY
                    if self.thread is None:
                        self.thread = threading.Thread(
                            target=self._flusher, name="cubicle-output", daemon=True
                        )
                        self.thread.start()
                    else:
                        self.cond.notify()
        finally:
            channel.leave()

    def flush(self):
        __tracebackhide__ = True  # noqa: F841
        self.channel.enter()
        try:
            with self.lock:
                self._flush_locked()
        finally:
            self.channel.leave()

    def _flush_locked(self):
        self.deadline = None
        if not self.buf:
            return
        text = "".join(self.buf)
        self.buf = []
        self.buf_len = 0
        self._emit_locked(self.buf_name, text, self.buf_time)

    def _emit_locked(self, name, text, when):
        self.channel.emit(
            {"id": self.exec_id, "type": name, "text": text, "timestamp": _timestamp(when)}
        )

    def _flusher(self):
        with self.lock:
            while True:
                if self.deadline is None:
                    self.cond.wait()
                    continue
                remaining = self.deadline - time.monotonic()
                if remaining > 0:
                    self.cond.wait(remaining)
                    continue
                try:
                    self._flush_locked()
                except OSError:
                    self.deadline = None

    # os.fork() from user code (multiprocessing...): no thread may hold a lock across the
    # fork, and the child must not write events (its output goes raw to fds 1/2).
    def before_fork(self):
        self.lock.acquire()
        self.channel.lock.acquire()

    def after_fork_parent(self):
        self.channel.lock.release()
        self.lock.release()

    def after_fork_child(self):
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.channel.lock = threading.Lock()
        self.channel.disabled = True
        self.channel.main_ident = threading.get_ident()
        self.channel.critical = 0
        self.exec_id = None
        self.buf = []
        self.buf_len = 0
        self.deadline = None
        self.thread = None


class OutStream(io.TextIOBase):
    """sys.stdout / sys.stderr of a kernel."""

    def __init__(self, output, name, fd):
        super().__init__()
        self._output = output
        self._name = name
        self._fd = fd
        self.buffer = _BinaryOut(self)

    @property
    def name(self):
        return "<%s>" % self._name

    @property
    def encoding(self):
        return "utf-8"

    @property
    def errors(self):
        return "replace"

    @property
    def line_buffering(self):
        return True

    def writable(self):
        return True

    def readable(self):
        return False

    def seekable(self):
        return False

    def isatty(self):
        return False

    def fileno(self):
        return self._fd

    def write(self, text):
        __tracebackhide__ = True  # noqa: F841
        if not isinstance(text, str):
            raise TypeError("write() argument must be str, not %s" % type(text).__name__)
        if text:
            self._output.write(self._name, text)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        self._output.flush()

    def close(self):
        pass


class _BinaryOut:
    """sys.stdout.buffer: bytes are decoded as UTF-8 (incrementally)."""

    def __init__(self, stream):
        import codecs

        self._stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def write(self, data):
        text = self._decoder.decode(bytes(data))
        if text:
            self._stream.write(text)
        return len(data)

    def flush(self):
        self._stream.flush()

    def isatty(self):
        return False

    def fileno(self):
        return self._stream.fileno()

    @property
    def closed(self):
        return False


# --- rich results ---------------------------------------------------------------------


def strip_quotes(text):
    """E2B's server strips one pair of surrounding quotes from a result's text."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def bundle_to_event(data, main):
    event = {"type": "result", "is_main_result": bool(main)}
    extra = {}
    for mime, value in data.items():
        if value is None:
            continue
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = base64.b64encode(bytes(value)).decode("ascii")
        elif mime in BINARY_MIMES and isinstance(value, str):
            value = value.strip()
        key = MIME_KEYS.get(mime)
        if key is None:
            extra[mime] = jsonable(value)
        elif key in ("json", "data", "chart"):
            event[key] = jsonable(value)
        else:
            event[key] = value if isinstance(value, str) else str(value)
    if isinstance(event.get("text"), str):
        event["text"] = strip_quotes(event["text"])
    event["extra"] = extra
    return event


class KernelDisplayHook(DisplayHook):
    """The value of the cell's last expression -> the main result."""

    def start_displayhook(self):
        pass

    def write_output_prompt(self):
        pass

    def write_format_data(self, format_dict, md_dict=None):
        kernel = _KERNEL
        if kernel is not None:
            kernel.emit_result(format_dict, True)

    def finish_displayhook(self):
        pass


class KernelDisplayPublisher(DisplayPublisher):
    """display(...) and figures -> results that are not the main result."""

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False,
                **kwargs):
        if update:
            return  # update_display_data: E2B drops these too
        kernel = _KERNEL
        if kernel is not None:
            kernel.emit_result(data, False)

    def clear_output(self, wait=False):
        pass


class ChartFormatter(BaseFormatter):
    """e2b/chart: E2B's chart JSON for matplotlib figures it can describe."""

    format_type = Unicode("e2b/chart")
    print_method = ObjectName("_repr_e2b_chart_")
    _return_type = (dict,)

    def __call__(self, obj):
        if isinstance(obj, _Figure):
            try:
                return figure_to_chart(obj)
            except Exception:
                return None
        return super().__call__(obj)


class DataFormatter(BaseFormatter):
    """e2b/data: a DataFrame's columns as lists (like E2B's template)."""

    format_type = Unicode("e2b/data")
    print_method = ObjectName("_repr_e2b_data_")
    _return_type = (dict,)

    def __call__(self, obj):
        if isinstance(obj, pandas.DataFrame):
            try:
                if obj.size > DATA_MAX_CELLS:
                    return None
                return jsonable(
                    {_json_key(k): list(v) for k, v in obj.to_dict(orient="list").items()}
                )
            except Exception:
                return None
        return super().__call__(obj)


def strict_json(value, depth=0):
    """Like jsonable() but raises TypeError for anything that is not data (the way
    E2B's orjson-based formatter refuses to serialise arbitrary objects)."""
    if depth > 100:
        raise TypeError("too deep")
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError("key")
            out[_json_key(k)] = strict_json(v, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [strict_json(v, depth + 1) for v in value]
    if isinstance(value, numpy.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError("array")
        return jsonable(value.tolist())
    if isinstance(value, numpy.generic):
        if not isinstance(value, (numpy.bool_, numpy.integer, numpy.floating)):
            raise TypeError("scalar")
        return jsonable(value.item())
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    raise TypeError(type(value).__name__)


class KernelJSONFormatter(JSONFormatter):
    """application/json also for plain dicts and lists of data (E2B's template does
    this with orjson)."""

    def __call__(self, obj):
        if type(obj) in (dict, list):
            try:
                return strict_json(obj), {"expanded": True}
            except (TypeError, ValueError, RecursionError):
                pass
        return super().__call__(obj)


# --- matplotlib figure -> E2B chart ---------------------------------------------------

_UNIT_RE = re.compile(r"[\(\[]\s*([^()\[\]]+?)\s*[\)\]]")

# Axes.bxp (behind boxplot(), pandas and seaborn box plots) records its statistics on
# the axes, so box-and-whisker charts can be described exactly.
_original_bxp = _Axes.bxp


def _recording_bxp(self, bxpstats, *args, **kwargs):
    stats = [dict(s) for s in bxpstats]
    artists = _original_bxp(self, stats, *args, **kwargs)
    vert = kwargs.get("vert", True)
    orientation = kwargs.get("orientation")
    if orientation is not None:
        vert = orientation != "horizontal"
    records = self.__dict__.setdefault("_cubicle_bxp", [])
    records.append((stats, artists, vert, kwargs.get("positions", args[0] if args else None)))
    return artists


_Axes.bxp = _recording_bxp


def _label_or_none(text):
    text = (text or "").strip()
    return text or None


def _unit(label):
    if not label:
        return None
    found = _UNIT_RE.findall(label)
    return found[-1] if found else None


def _axis_converter(axis):
    getter = getattr(axis, "get_converter", None)
    if getter is not None:
        try:
            return getter()
        except Exception:
            pass
    return getattr(axis, "converter", None)


def _axis_kind(axis):
    converter = _axis_converter(axis)
    module = type(converter).__module__ if converter is not None else ""
    if module.startswith("matplotlib.dates") or isinstance(
        axis.get_major_formatter(),
        (_mdates.AutoDateFormatter, _mdates.DateFormatter, _mdates.ConciseDateFormatter),
    ):
        return "datetime"
    if module.startswith("matplotlib.category"):
        return "categorical"
    return "numeric"


def _scale(ax, which):
    axis = ax.xaxis if which == "x" else ax.yaxis
    kind = _axis_kind(axis)
    if kind != "numeric":
        return kind
    return ax.get_xscale() if which == "x" else ax.get_yscale()


def _number(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _point_value(value, kind):
    if kind == "categorical":
        return str(value)
    if kind == "datetime":
        if isinstance(value, (int, float, numpy.integer, numpy.floating)):
            if not math.isfinite(float(value)):
                return None
            return _mdates.num2date(float(value)).isoformat()
        try:
            stamp = pandas.Timestamp(value)
        except Exception:
            return str(value)
        if stamp is pandas.NaT:
            return None
        if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
            return value.isoformat()
        return stamp.isoformat()
    if isinstance(value, str):
        return value
    return _number(value)


def _offset_value(ax, which, value, kind):
    """A scatter offset (always a number) -> the value it stands for."""
    if kind == "categorical":
        return _tick_label_at(ax, which, value) or _number(value)
    return _point_value(value, kind)


def _ticks(ax, which):
    axis = ax.xaxis if which == "x" else ax.yaxis
    kind = _axis_kind(axis)
    lo, hi = sorted(axis.get_view_interval())
    span = (hi - lo) or 1.0
    ticks, labels = [], []
    locs = axis.get_majorticklocs()
    texts = [t.get_text() for t in axis.get_majorticklabels()]
    for i, loc in enumerate(locs):
        loc = float(loc)
        if not (lo - 1e-9 * span <= loc <= hi + 1e-9 * span):
            continue
        if kind == "datetime":
            ticks.append(_mdates.num2date(loc).isoformat())
        else:
            ticks.append(_tidy(loc))
        labels.append(texts[i] if i < len(texts) else "")
    return ticks, labels


def _tidy(value):
    """1.2000000000000002 -> 1.2 (tick positions are computed, not data)."""
    return float("%.12g" % value)


def _bar_label(ax, which, position):
    axis = ax.xaxis if which == "x" else ax.yaxis
    kind = _axis_kind(axis)
    if kind == "categorical" or isinstance(axis.get_major_formatter(),
                                           matplotlib.ticker.FixedFormatter):
        label = _tick_label_at(ax, which, position)
        if label is not None:
            return label
    if kind == "datetime":
        return _mdates.num2date(position).isoformat()
    return "%g" % position


def _tick_label_at(ax, which, position):
    axis = ax.xaxis if which == "x" else ax.yaxis
    locs = axis.get_majorticklocs()
    texts = [t.get_text() for t in axis.get_majorticklabels()]
    for loc, text in zip(locs, texts):
        if abs(float(loc) - position) < 1e-6 * max(1.0, abs(position)) and text:
            return text
    return None


def _series_label(label, prefix, index):
    if not label or label.startswith("_"):
        return "%s %d" % (prefix, index)
    return label


def _base_2d(ax, kind):
    x_label = _label_or_none(ax.get_xlabel())
    y_label = _label_or_none(ax.get_ylabel())
    return {
        "type": kind,
        "title": _label_or_none(ax.get_title()),
        "x_label": x_label,
        "y_label": y_label,
        "x_unit": _unit(x_label),
        "y_unit": _unit(y_label),
    }


def _point_chart(ax, kind, series):
    chart = _base_2d(ax, kind)
    chart["x_scale"] = _scale(ax, "x")
    chart["y_scale"] = _scale(ax, "y")
    chart["x_ticks"], chart["x_tick_labels"] = _ticks(ax, "x")
    chart["y_ticks"], chart["y_tick_labels"] = _ticks(ax, "y")
    chart["elements"] = series
    return chart


def _artists(ax):
    def visible(artists):
        return [a for a in artists if a.get_visible()]

    return visible(ax.lines), visible(ax.collections), visible(ax.patches), visible(ax.images)


class _TooBig(Exception):
    pass


def _count(budget, n):
    budget[0] -= n
    if budget[0] < 0:
        raise _TooBig()


def axes_to_chart(ax, budget):
    """One Axes -> an E2B chart dict, or None if it is not a simple chart."""
    from matplotlib.collections import PathCollection
    from matplotlib.container import BarContainer
    from matplotlib.patches import Rectangle, Wedge

    lines, collections, patches, images = _artists(ax)
    if images or getattr(ax, "name", "rectilinear") != "rectilinear":
        return None

    records = [
        r for r in ax.__dict__.get("_cubicle_bxp", ())
        if any(m in ax.lines for m in r[1].get("medians", ()))
    ]
    if records:
        return _box_chart(ax, records, budget)

    if not lines and not collections and not patches:
        return None

    if lines and not collections and not patches:
        kind_x = _axis_kind(ax.xaxis)
        kind_y = _axis_kind(ax.yaxis)
        series = []
        for i, line in enumerate(lines):
            xs, ys = line.get_xdata(), line.get_ydata()
            _count(budget, len(xs))
            points = [
                [_point_value(x, kind_x), _point_value(y, kind_y)] for x, y in zip(xs, ys)
            ]
            series.append({"label": _series_label(line.get_label(), "Line", i),
                           "points": points})
        return _point_chart(ax, "line", series)

    if collections and not lines and not patches:
        if not all(isinstance(c, PathCollection) for c in collections):
            return None
        kind_x = _axis_kind(ax.xaxis)
        kind_y = _axis_kind(ax.yaxis)
        series = []
        for i, collection in enumerate(collections):
            offsets = collection.get_offsets()
            _count(budget, len(offsets))
            points = [
                [_offset_value(ax, "x", x, kind_x), _offset_value(ax, "y", y, kind_y)]
                for x, y in numpy.asarray(offsets, dtype=float).tolist()
            ]
            series.append({"label": _series_label(collection.get_label(), "Series", i),
                           "points": points})
        return _point_chart(ax, "scatter", series)

    if patches and not lines and not collections:
        if all(isinstance(p, Wedge) for p in patches):
            _count(budget, len(patches))
            return {
                "type": "pie",
                "title": _label_or_none(ax.get_title()),
                "elements": [
                    {
                        "label": p.get_label() if not p.get_label().startswith("_") else "Slice %d" % i,
                        "angle": round(abs(float(p.theta2) - float(p.theta1)), 4),
                        "radius": _number(p.r),
                    }
                    for i, p in enumerate(patches)
                ],
            }
        containers = [c for c in ax.containers if isinstance(c, BarContainer)]
        in_containers = {id(p) for c in containers for p in c.patches}
        if (containers and all(isinstance(p, Rectangle) for p in patches)
                and all(id(p) in in_containers for p in patches)):
            chart = _base_2d(ax, "bar")
            elements = []
            for g, container in enumerate(containers):
                group = _series_label(container.get_label(), "Group", g)
                horizontal = getattr(container, "orientation", "vertical") == "horizontal"
                _count(budget, len(container.patches))
                for rect in container.patches:
                    if horizontal:
                        center = rect.get_y() + rect.get_height() / 2.0
                        label = _bar_label(ax, "y", center)
                        value = rect.get_width()
                    else:
                        center = rect.get_x() + rect.get_width() / 2.0
                        label = _bar_label(ax, "x", center)
                        value = rect.get_height()
                    elements.append({"label": label, "group": group,
                                     "value": _number(value)})
            chart["elements"] = elements
            return chart
    return None


def _box_chart(ax, records, budget):
    chart = _base_2d(ax, "box_and_whisker")
    elements = []
    for stats, _artists_dict, vert, positions in records:
        _count(budget, len(stats))
        for i, s in enumerate(stats):
            label = s.get("label")
            if label is None:
                position = positions[i] if positions is not None and i < len(positions) else i + 1
                label = _tick_label_at(ax, "x" if vert else "y", float(position))
                if label is None:
                    label = str(i + 1)
            elements.append({
                "label": str(label),
                "min": _number(s.get("whislo")),
                "first_quartile": _number(s.get("q1")),
                "median": _number(s.get("med")),
                "third_quartile": _number(s.get("q3")),
                "max": _number(s.get("whishi")),
                "outliers": [_number(v) for v in numpy.asarray(s.get("fliers", [])).ravel()],
            })
    chart["elements"] = elements
    return chart


def figure_to_chart(fig):
    """A Figure -> E2B chart JSON (the e2b/chart MIME type), or None."""
    axes = [ax for ax in fig.get_axes() if ax.get_visible()]
    if not axes:
        return None
    budget = [CHART_MAX_POINTS]
    try:
        if len(axes) == 1:
            return axes_to_chart(axes[0], budget)
        charts = [c for c in (axes_to_chart(ax, budget) for ax in axes) if c is not None]
    except _TooBig:
        return None
    if not charts:
        return None
    suptitle = getattr(fig, "_suptitle", None)
    return {
        "type": "superchart",
        "title": _label_or_none(suptitle.get_text()) if suptitle is not None else None,
        "elements": charts,
    }


# --- the shell --------------------------------------------------------------------------

_KERNEL = None  # the Kernel serving in this process (None in the zygote)


class KernelShell(InteractiveShell):
    displayhook_class = Type(KernelDisplayHook)
    display_pub_class = Type(KernelDisplayPublisher)

    def enable_gui(self, gui=None):
        pass

    def _showtraceback(self, etype, evalue, stb):
        kernel = _KERNEL
        if kernel is None:
            return
        if isinstance(stb, str):
            text = stb
        else:
            if etype is KeyboardInterrupt:
                # Drop the kernel's own frames (the SIGINT handler, output capture): this
                # program runs as `python3 -c`, so its frames are in "<string>".
                stb = [entry for entry in stb
                       if not entry.lstrip().startswith("File <string>:")
                       and "skipping hidden" not in entry]
            text = "\n".join(stb)
        kernel.emit_error(getattr(etype, "__name__", str(etype)), str(evalue), text)

    def system(self, cmd):
        """`!cmd` and %pip: the command writes straight to fds 1/2 (the agent forwards
        them). SIGINT interrupts the command and ends the cell with KeyboardInterrupt."""
        cmd = self.var_expand(cmd, depth=1)
        kernel = _KERNEL
        if kernel is not None:
            kernel.output.flush()
        executable = os.environ.get("SHELL") or "/bin/sh"
        if not os.path.exists(executable):
            executable = "/bin/sh"
        proc = subprocess.Popen(cmd, shell=True, executable=executable)
        try:
            status = proc.wait()
        except KeyboardInterrupt:
            _stop_process(proc)
            self.user_ns["_exit_code"] = -signal.SIGINT
            raise
        if status > 128:
            status = -(status - 128)
        self.user_ns["_exit_code"] = status

    system_raw = system
    system_piped = system


def _stop_process(proc):
    for sig, wait in ((signal.SIGINT, 1.0), (signal.SIGTERM, 1.0), (signal.SIGKILL, None)):
        try:
            proc.send_signal(sig)
        except OSError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:
            continue


def make_shell():
    config = Config()
    config.HistoryManager.enabled = False  # no sqlite file, no history thread
    config.InteractiveShell.colors = "NoColor"  # as E2B's template
    config.InteractiveShell.xmode = "Context"
    config.PlainTextFormatter.max_seq_length = 0  # as E2B's template: no truncation
    config.InlineBackend.figure_formats = {"png"}
    shell = KernelShell.instance(config=config)
    formatters = shell.display_formatter.formatters
    formatters["application/json"] = KernelJSONFormatter(parent=shell.display_formatter)
    formatters["e2b/data"] = DataFormatter(parent=shell.display_formatter)
    formatters["e2b/chart"] = ChartFormatter(parent=shell.display_formatter)
    shell.enable_matplotlib("inline")
    return shell


def warm_up(shell):
    """Pays first-use costs once (in the zygote) instead of in every context: traceback
    formatting, PNG rendering of a figure and chart extraction. Runs no user code and
    leaves no state behind (the figure is not registered with pyplot)."""
    # A failing cell, silently: no history, no execution count, no displayhook; the
    # traceback goes nowhere (no kernel yet). This loads stack_data and parses IPython's
    # own frames once (~40 ms otherwise on each context's first error).
    for cell in ("1 / 0", "1 +"):
        shell.run_cell(cell, store_history=False, silent=True)
    for name in ("last_type", "last_value", "last_traceback"):
        if hasattr(sys, name):
            delattr(sys, name)
    fig = _Figure()
    _FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([1, 2, 3], [4, 5, 6], label="warm-up")
    ax.bar(["a", "b"], [1, 2])
    ax.set_title("warm-up")
    ax.set_xlabel("x (s)")
    shell.display_formatter.format(fig)
    figure_to_chart(fig)
    shell.display_formatter.format(pandas.DataFrame({"a": [1, 2]}))
    shell.display_formatter.format({"a": [1.5, None]})
    encode_line({"a": "b"})
    _timestamp()
    del fig, ax


# --- the kernel ---------------------------------------------------------------------------

IDLE, RUNNING = 0, 1


class Kernel:
    def __init__(self, shell):
        global _KERNEL
        self.shell = shell
        # Keep fds 0 (requests) and 3 (events) out of reach of user subprocesses: move
        # them to close-on-exec descriptors, and give fd 0 /dev/null. A background
        # process started by user code therefore never holds the event pipe open (the
        # agent sees EOF on fd 3 when the kernel dies) nor eats requests.
        self.request_fd = os.dup(REQUEST_FD)  # os.dup: non-inheritable (O_CLOEXEC)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, REQUEST_FD)
        os.close(devnull)
        self.event_fd = os.dup(EVENT_FD)
        os.close(EVENT_FD)
        self.channel = Channel(self.event_fd)
        self.output = Output(self.channel)
        self.state = IDLE
        self.exec_id = None
        self.errored = False
        self.before_first_execution = None
        self.pid = os.getpid()
        sys.stdin = open(os.devnull, "r", encoding="utf-8")
        sys.stdout = OutStream(self.output, "stdout", STDOUT_FD)
        sys.stderr = OutStream(self.output, "stderr", STDERR_FD)
        os.register_at_fork(
            before=self.output.before_fork,
            after_in_parent=self.output.after_fork_parent,
            after_in_child=self._after_fork_child,
        )
        _patch_spawns(self.output)
        signal.signal(signal.SIGINT, self._on_sigint)
        _KERNEL = self

    def _after_fork_child(self):
        global _KERNEL
        self.output.after_fork_child()
        _KERNEL = None
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _on_sigint(self, signum, frame):
        __tracebackhide__ = True  # noqa: F841
        if self.state != RUNNING:
            return  # idle: ignored
        if self.channel.critical > 0:
            self.channel.pending_interrupt = True
            return
        raise KeyboardInterrupt

    # results and errors of the running execution
    def emit_result(self, data, main):
        if self.exec_id is None:
            return
        self.output.flush()
        event = bundle_to_event(data, main)
        event["id"] = self.exec_id
        self.channel.emit(event)

    def emit_error(self, name, value, text):
        if self.exec_id is None or self.errored:
            return
        self.errored = True
        self.output.flush()
        self.channel.emit(
            {"id": self.exec_id, "type": "error", "name": name, "value": value,
             "traceback": text}
        )

    def ready(self):
        self.channel.emit({"type": "ready", "pid": os.getpid(), "language": LANGUAGE})

    def serve(self, after_ready=None):
        self.ready()
        if after_ready is not None:
            after_ready()  # before any request is read
        reader = open(self.request_fd, "rb", buffering=1 << 16, closefd=False)
        while True:
            try:
                line = reader.readline()
            except KeyboardInterrupt:
                continue
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request must be a JSON object")
            except ValueError as e:
                self.channel.emit({"type": "protocol_error", "id": None,
                                   "message": "bad request: %s" % e})
                continue
            op = request.get("op")
            if op == "execute":
                self.execute(request)
            else:
                self.channel.emit({"type": "protocol_error", "id": request.get("id"),
                                   "message": "unknown op %r" % (op,)})

    def execute(self, request):
        if self.before_first_execution is not None:
            hook, self.before_first_execution = self.before_first_execution, None
            hook()
        exec_id = request.get("id")
        code = request.get("code")
        code = code if isinstance(code, str) else ""
        env = request.get("env") or {}
        shell = self.shell
        saved_env = _apply_env(env)
        self.exec_id = exec_id
        self.errored = False
        self.channel.pending_interrupt = False
        self.output.begin(exec_id)
        count = shell.execution_count
        try:
            try:
                self.state = RUNNING
                shell.run_cell(code, store_history=True)
            finally:
                self.state = IDLE
        except KeyboardInterrupt:
            # Interrupted outside the user's code (e.g. while a figure was rendered).
            self.state = IDLE
            self._safe(lambda: self.emit_error("KeyboardInterrupt", "", "KeyboardInterrupt"))
        except BaseException as e:  # SystemExit from the shell machinery, etc.
            self.state = IDLE
            name, value, text = type(e).__name__, str(e), traceback.format_exc()
            self._safe(lambda: self.emit_error(name, value, text))
        if os.getpid() != self.pid:
            # A child forked by the user's code (os.fork() without exiting) came back
            # here: it must not serve requests meant for the kernel.
            os._exit(0)
        self.channel.pending_interrupt = False
        if shell.execution_count == count:
            shell.execution_count += 1  # empty cell: still counts, like Jupyter's kernel
        _restore_env(saved_env)
        self._safe(self.output.end)
        self.exec_id = None
        self.channel.emit({"id": exec_id, "type": "number_of_executions",
                           "execution_count": count})
        self.channel.emit({"id": exec_id, "type": "end_of_execution"})

    def _safe(self, fn):
        for _ in range(3):
            try:
                fn()
                return
            except KeyboardInterrupt:
                continue


def _apply_env(env):
    saved = {}
    if not isinstance(env, dict):
        return saved
    for key, value in env.items():
        key = str(key)
        if not key or "=" in key or "\0" in key:
            continue
        value = "" if value is None else str(value)
        if "\0" in value:
            continue
        if key not in saved:
            saved[key] = os.environ.get(key)
        os.environ[key] = value
    return saved


def _restore_env(saved):
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _patch_spawns(output):
    """Flushes Python-level output before a subprocess starts, so text printed before
    `subprocess.run(...)` or `os.system(...)` reaches the agent before the child's
    output (which goes straight to fds 1/2)."""
    original_execute_child = subprocess.Popen._execute_child

    def _execute_child(self, *args, **kwargs):
        try:
            output.flush()
        except Exception:
            pass
        return original_execute_child(self, *args, **kwargs)

    subprocess.Popen._execute_child = _execute_child
    original_system = os.system

    def system(command):
        try:
            output.flush()
        except Exception:
            pass
        return original_system(command)

    os.system = system


# --- zygote -------------------------------------------------------------------------------


def _thread_count():
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _close_fds_from(lowest):
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        os.closerange(lowest, 65536)
        return
    for fd in fds:
        if fd >= lowest:
            try:
                os.close(fd)
            except OSError:
                pass


def _reopen_files_from(lowest):
    """In a fork of a zygote: descriptors from `lowest` up are the zygote's. Files that
    Python objects of the zygote still use (matplotlib's cached fonts, IPython's
    devnull...) are reopened by path onto the same number, so that the object keeps
    working on a file description of this process's own (not shared with the zygote or
    other kernels, whose offsets would race; and, in a sandbox forked by a template
    zygote, a file of this sandbox's mounts). Anything else (sockets, pipes) is closed."""
    import fcntl
    import stat

    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return _close_fds_from(lowest)
    for fd in fds:
        if fd < lowest:
            continue
        try:
            st = os.fstat(fd)
            path = os.readlink("/proc/self/fd/%d" % fd)
            reopen = (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)) and path.startswith("/")
            if reopen:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_APPEND)
                inheritable = os.get_inheritable(fd)
                position = os.lseek(fd, 0, os.SEEK_CUR) if stat.S_ISREG(st.st_mode) else 0
                fresh = os.open(path, flags | os.O_CLOEXEC)
                try:
                    if position:
                        os.lseek(fresh, position, os.SEEK_SET)
                    os.dup2(fresh, fd, inheritable=inheritable)
                finally:
                    os.close(fresh)
            else:
                os.close(fd)
        except OSError:
            try:
                os.close(fd)
            except OSError:
                pass


def _find_blas_setter():
    """openblas_set_num_threads of the OpenBLAS numpy uses, if any, looked up once in
    the zygote (so forked kernels only call it)."""
    if "OPENBLAS_NUM_THREADS" not in _LIMITED_VARS:
        return None  # the user chose a limit: keep it
    try:
        import ctypes

        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "blas" in line and ".so" in line}
        for path in sorted(paths):
            if not path.startswith("/"):
                continue
            try:
                lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 4) | os.RTLD_LOCAL)
            except OSError:
                continue
            setter = getattr(lib, "openblas_set_num_threads", None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                setter.restype = None
                return setter
    except Exception:
        pass
    return None


def _restore_blas_threads(setter):
    """Forked kernels inherit OpenBLAS initialised with one thread (see the top of this
    file); give them the default (one per usable CPU)."""
    if setter is None:
        return
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    if cpus > 1:
        try:
            setter(cpus)
        except Exception:
            pass


class Zygote:
    def __init__(self, shell):
        self.shell = shell
        self.blas_setter = _find_blas_setter()
        self.sock = socket.socket(fileno=ZYGOTE_SOCKET_FD)
        self.reader = open(REQUEST_FD, "rb", buffering=1 << 16, closefd=False)

    def emit(self, obj):
        write_all(EVENT_FD, encode_line(obj))

    def serve(self):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        gc.collect()
        gc.freeze()  # imported objects are never scanned again: pages stay shared
        if _thread_count() != 1:
            os.write(STDERR_FD, b"cubicle zygote: warning: more than one thread at fork\n")
        self.emit({"type": "ready", "pid": os.getpid(), "language": LANGUAGE})
        while True:
            line = self.reader.readline()
            if not line:
                return
            line = line.strip()
            if not line:
                continue
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request must be a JSON object")
            except ValueError as e:
                self.emit({"type": "protocol_error", "id": None,
                           "message": "bad request: %s" % e})
                continue
            if request.get("op") == "fork":
                self.fork(request)
            else:
                self.emit({"type": "protocol_error", "id": request.get("id"),
                           "message": "the zygote only serves fork requests"})

    def _receive_fds(self):
        """The fds of the next kernel: one message on fd 4 (any data, e.g. one byte)
        carrying exactly four descriptors as SCM_RIGHTS."""
        data, fds, flags, _ = socket.recv_fds(
            self.sock, 4096, 4, getattr(socket, "MSG_CMSG_CLOEXEC", 0)
        )
        if not data and not fds:
            raise EOFError("the control socket was closed")
        problem = None
        if flags & getattr(socket, "MSG_CTRUNC", 0):
            problem = "file descriptors were truncated"
        elif len(fds) != 4:
            problem = "expected 4 file descriptors, got %d" % len(fds)
        if problem:
            for fd in fds:
                os.close(fd)
            raise ValueError(problem)
        return fds

    def fork(self, request):
        request_id = request.get("id")
        try:
            fds = self._receive_fds()
        except EOFError:
            sys.exit(0)
        except (OSError, ValueError) as e:
            self.emit({"type": "fork_failed", "id": request_id, "message": str(e)})
            return
        try:
            pid = self._spawn(fds, request)
        except OSError as e:
            self.emit({"type": "fork_failed", "id": request_id, "message": str(e)})
            return
        finally:
            for fd in fds:
                os.close(fd)
        if pid is None:
            self.emit({"type": "fork_failed", "id": request_id,
                       "message": "the kernel process could not be started"})
        else:
            self.emit({"type": "forked", "id": request_id, "pid": pid})

    def _spawn(self, fds, request):
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            # intermediate process: fork the kernel, report its pid, exit at once so the
            # kernel is re-parented to the agent (pid 1 of the sandbox).
            code = 0
            try:
                os.close(r)
                kernel_pid = os.fork()
                if kernel_pid == 0:
                    os.close(w)
                    _become_kernel(self, fds, request)  # never returns
                os.write(w, str(kernel_pid).encode("ascii"))
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        data = b""
        try:
            while True:
                chunk = os.read(r, 64)
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(r)
            while True:
                try:
                    os.waitpid(child, 0)
                    break
                except ChildProcessError:
                    break
                except InterruptedError:
                    continue
        try:
            return int(data)
        except ValueError:
            return None


def _become_kernel(zygote, fds, request):
    status = 0
    try:
        zygote.sock.detach()  # the socket object must not close a reused fd 4 later
        for target, fd in enumerate(fds):
            os.dup2(fd, target)  # inheritable copies on 0, 1, 2, 3
        os.close(ZYGOTE_SOCKET_FD)
        _reopen_files_from(ZYGOTE_SOCKET_FD + 1)
        os.setsid()  # own session and process group (the agent can signal the group)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        cwd = request.get("cwd")
        if cwd:
            try:
                os.chdir(cwd)
            except OSError as e:
                os.write(STDERR_FD, ("cubicle kernel: cannot enter %s: %s\n" % (cwd, e))
                         .encode("utf-8", "replace"))
        env = request.get("env")
        if isinstance(env, dict):
            _apply_env(env)
        kernel = Kernel(zygote.shell)
        # OpenBLAS threads spin for a while when created: start them with the first
        # execution rather than with every fork (a burst of forks would compete for CPU).
        kernel.before_first_execution = lambda: _restore_blas_threads(zygote.blas_setter)
        # Forks must not share the legacy global RandomState (`random` reseeds itself).
        kernel.serve(numpy.random.seed)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        try:
            os.write(STDERR_FD, traceback.format_exc().encode("utf-8", "replace"))
        except OSError:
            pass
        status = 1
    try:
        atexit._run_exitfuncs()
    except BaseException:
        pass
    os._exit(status)


# --- template zygote ----------------------------------------------------------------------
#
# Outside any sandbox: in a user namespace of its own (as the kernel user, with the
# capabilities to write id maps), the template at "/", the host's tree at /run/host
# (cubicle-agent zygote set that up). For each `spawn` request from the runtime (fd 3,
# SOCK_SEQPACKET: one JSON object per message, the sandbox's sync socket attached as
# SCM_RIGHTS) it clones
#
#   P  pid 1 of the new sandbox: fresh user, mount, pid, net, uts and ipc namespaces, a
#      sibling of the zygote (CLONE_PARENT: the runtime's child, as if the runtime had
#      cloned it). We write its id maps; it waits for the runtime's go-ahead on the sync
#      socket (fd 3, peeked, not read), then forks
#   Z  the sandbox's Python zygote and
#   K  its default Python kernel,
#      and executes `cubicle-agent init`, which builds the sandbox and becomes its agent,
#      keeping fds 4 and 5: the sockets on which Z and K wait for their `setup` (their
#      fds, user, environment and the sandbox's seccomp filter). Z and K share this
#      process's memory copy-on-write.
#
# P is cloned with a raw clone(2) (glibc's fork cannot pass namespace flags): it runs a
# few lines of Python and executes, and everything it forks is forked by glibc.

CONTROL_FD = 3
SANDBOX_SYNC_FD = 3
SANDBOX_ZYGOTE_FD = 4
SANDBOX_KERNEL_FD = 5
_CLONE_NEWNS = 0x00020000
_CLONE_PARENT = 0x00008000
_CLONE_NEWCGROUP = 0x02000000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_SANDBOX_NAMESPACES = (_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET
                       | _CLONE_NEWUTS | _CLONE_NEWIPC)
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_SECCOMP_SET_MODE_FILTER = 1
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _check(ctypes, ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def _machine():
    import platform

    return platform.machine()


def _clone(flags):
    """clone(2) without a new stack: returns like fork. Python's own bookkeeping runs as
    for os.fork; C libraries' fork handlers do not (the zygote has no threads, and the
    child only executes)."""
    ctypes, _ = _libc()
    nr = _SYS_CLONE.get(_machine())
    if nr is None:
        raise OSError("no clone syscall number for %s" % _machine())
    # PyDLL: the GIL stays held across the call, so the child resumes holding it.
    libc = ctypes.PyDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    pid = libc.syscall(ctypes.c_long(nr), ctypes.c_ulong(flags | signal.SIGCHLD),
                       ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_void_p(0),
                       ctypes.c_void_p(0))
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, "clone: %s" % os.strerror(err))
    return pid


class TemplateZygote:
    def __init__(self, shell):
        self.shell = shell
        self.blas_setter = _find_blas_setter()
        self.sock = socket.socket(fileno=CONTROL_FD)

    def send(self, obj):
        self.sock.send(json.dumps(obj).encode("utf-8"))

    def serve(self):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        gc.collect()
        gc.freeze()
        if _thread_count() != 1:
            os.write(STDERR_FD, b"cubicle template zygote: warning: more than one thread\n")
        self.send({"type": "ready", "pid": os.getpid()})
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(
                    self.sock, 1 << 16, 32, getattr(socket, "MSG_CMSG_CLOEXEC", 0))
            except InterruptedError:
                continue
            if not data:
                return  # the runtime is gone
            request_id = None
            try:
                request = json.loads(data)
                request_id = request.get("id")
                if request.get("op") != "spawn":
                    raise ValueError("unknown op %r" % request.get("op"))
                if not fds:
                    raise ValueError("no sync socket")
                pid = self.spawn(request, fds[0], fds[1:])
                self.send({"type": "spawned", "id": request_id, "pid": pid})
            except SpawnFailed as e:
                # The child exists (and exits at once): the runtime, its parent, reaps it.
                self.send({"type": "spawn_failed", "id": request_id, "pid": e.pid,
                           "message": e.message})
            except Exception as e:  # noqa: BLE001 - reported, the zygote keeps serving
                self.send({"type": "spawn_failed", "id": request_id, "message": str(e)})
            finally:
                for fd in fds:
                    os.close(fd)

    def spawn(self, request, sync_fd, join_fds):
        """Clones pid 1 of a new sandbox (see above); `join_fds` are the sandbox's cgroup
        `tasks` files, opened by the runtime: it joins them itself, as a task moving
        itself skips the kernel's global threadgroup lock."""
        mapped_r, mapped_w = os.pipe()
        pid = _clone(_SANDBOX_NAMESPACES | _CLONE_PARENT)
        if pid == 0:
            code = 125  # as the runtime's own clone: "join the sandbox's cgroup"
            try:
                os.close(mapped_w)
                for fd in join_fds:
                    os.write(fd, b"0")
                    os.close(fd)
                code = 121  # "become root in the namespace"
                if os.read(mapped_r, 1) == b"g":
                    os.close(mapped_r)
                    os.setgroups([])
                    os.setresgid(0, 0, 0)
                    os.setresuid(0, 0, 0)
                    _sandbox_init(self, request, sync_fd)  # never returns
            finally:
                os._exit(code)
        os.close(mapped_r)
        try:
            id_map = request.get("id_map", "0 0 65536")
            for name in ("uid_map", "gid_map"):
                fd = os.open("/proc/%d/%s" % (pid, name), os.O_WRONLY)
                try:
                    os.write(fd, id_map.encode("ascii"))
                finally:
                    os.close(fd)
            os.write(mapped_w, b"g")
        except OSError as e:
            raise SpawnFailed(pid, "write the id maps: %s" % e) from None
        finally:
            # Without "g" the child exits at once.
            os.close(mapped_w)
        return pid


class SpawnFailed(Exception):
    def __init__(self, pid, message):
        super().__init__(message)
        self.pid = pid
        self.message = message


def _sandbox_init(zygote, request, sync_fd):
    """P: pid 1 of the sandbox until it executes `cubicle-agent init`."""
    import fcntl

    code = 120  # as the runtime's own clone: "no go-ahead"
    try:
        sync = socket.socket(fileno=sync_fd)  # ours alone: the parked children close it
        while True:
            try:
                if not sync.recv(1, socket.MSG_PEEK):
                    os._exit(code)
                break
            except InterruptedError:
                continue
        # A session of our own (a pid namespace's session must be led from inside it).
        os.setsid()
        parked = []
        for role in ("zygote", "kernel"):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            if os.fork() == 0:
                ours.close()
                sync.close()
                for other in parked:
                    other.close()
                _parked(zygote, theirs.detach(), role)  # never returns
            theirs.close()
            parked.append(ours)
        code = 123
        # Via high numbers: any of these may sit on 3, 4 or 5 already.
        highs = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for s in [sync] + parked]
        for s in [sync] + parked:
            s.close()
        zygote.sock.detach()
        for target, fd in zip((SANDBOX_SYNC_FD, SANDBOX_ZYGOTE_FD, SANDBOX_KERNEL_FD), highs):
            os.dup2(fd, target)  # inheritable
        _close_fds_from(SANDBOX_KERNEL_FD + 1)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for sig in (signal.SIGPIPE, signal.SIGINT, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        code = 124
        argv = request["init"]
        os.execve(argv[0], [request.get("argv0", argv[0])] + argv[1:], request.get("env", {}))
    except BaseException:  # noqa: BLE001 - the runtime learns the step from the code
        pass
    os._exit(code)


def _parked(zygote, sock_fd, role):
    """Z or K: waits for the agent's `setup`, then serves as the sandbox's zygote or as
    its default kernel."""
    status = 1
    try:
        # The template zygote's stdio is a host log file and fd 3 its control socket:
        # nothing of that may stay open (its other files are reopened at setup).
        zygote.sock.detach()
        for fd in (0, 1, 2, CONTROL_FD):
            if fd != sock_fd:
                try:
                    os.close(fd)
                except OSError:
                    pass
        sock = socket.socket(fileno=sock_fd)
        count = 5 if role == "zygote" else 4
        data, fds, _, _ = socket.recv_fds(
            sock, 1 << 20, count, getattr(socket, "MSG_CMSG_CLOEXEC", 0))
        sock.close()
        if not data:
            os._exit(0)  # the sandbox did not want us (e.g. its agent failed)
        _apply_setup(json.loads(data), fds)
        status = 0
        if role == "zygote":
            z = Zygote(zygote.shell)
            z.blas_setter = zygote.blas_setter
            z.serve()
        else:
            os.setsid()  # own process group (the agent can signal the group)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            kernel = Kernel(zygote.shell)
            setter = zygote.blas_setter
            kernel.before_first_execution = lambda: _restore_blas_threads(setter)
            kernel.serve(numpy.random.seed)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else status)
    except BaseException:  # noqa: BLE001
        try:
            os.write(STDERR_FD, traceback.format_exc().encode("utf-8", "replace"))
        except OSError:
            pass
        status = 1
    if role == "kernel":
        try:
            atexit._run_exitfuncs()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(status)


def _apply_setup(setup, fds):
    """Makes this process what the agent would have started: `fds` on 0, 1, ..., the
    sandbox's cgroup namespace, rlimits, environment and working directory, the sandbox's
    capability bounding set and seccomp filter, then the kernel user's credentials."""
    import fcntl
    import resource

    if len(fds) not in (4, 5):
        raise ValueError("setup needs 4 or 5 fds, got %d" % len(fds))
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]
    for fd in fds:
        os.close(fd)
    for target, fd in enumerate(high):
        os.dup2(fd, target)  # inheritable
        os.close(fd)
    _reopen_files_from(len(fds))
    ctypes, libc = _libc()
    cgroup_ns = os.open("/proc/1/ns/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(ctypes, libc.setns(cgroup_ns, _CLONE_NEWCGROUP), "join the cgroup namespace")
    finally:
        os.close(cgroup_ns)
    nofile = setup.get("nofile")
    if nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(nofile[0]), int(nofile[1])))
    if setup.get("oom_score_adj") is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(int(setup["oom_score_adj"])))
    env = setup.get("env") or {}
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    os.chdir(setup.get("cwd") or "/")
    keep = set(setup.get("keep_caps") or [])
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        if cap not in keep:
            _check(ctypes, libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), "drop capability %d" % cap)
    program = base64.b64decode(setup.get("seccomp") or "")
    if program:
        _install_seccomp(ctypes, libc, program)
    os.setgroups([int(g) for g in setup.get("groups") or []])
    os.setresgid(int(setup["gid"]), int(setup["gid"]), int(setup["gid"]))
    os.setresuid(int(setup["uid"]), int(setup["uid"]), int(setup["uid"]))
    # Changing uid made us non-dumpable; the agent starts kernels dumpable.
    libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)


def _install_seccomp(ctypes, libc, program):
    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte),
                    ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    if len(program) % 8:
        raise ValueError("a seccomp program is a multiple of 8 bytes")
    count = len(program) // 8
    filters = (SockFilter * count).from_buffer_copy(program)
    fprog = SockFprog(count, ctypes.cast(filters, ctypes.POINTER(SockFilter)))
    nr = _SYS_SECCOMP.get(_machine())
    if nr is None:
        raise OSError("no seccomp syscall number for %s" % _machine())
    ret = libc.syscall(nr, _SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(fprog))
    _check(ctypes, 0 if ret == 0 else -1, "install the seccomp filter")


def main():
    gc.disable()
    shell = make_shell()
    warm_up(shell)
    gc.enable()
    if _TEMPLATE_ZYGOTE:
        TemplateZygote(shell).serve()
        return
    if _ZYGOTE:
        Zygote(shell).serve()
        return
    kernel = Kernel(shell)
    kernel.serve()


if __name__ == "__main__":
    main()
