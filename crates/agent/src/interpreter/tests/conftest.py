"""Fixtures: kernels launched through real pipes, exactly as cubicle-agent launches them
(see kernel_harness.py). Run with:

    .cache/venv/bin/python -m pytest crates/agent/src/interpreter/tests -q

The kernels themselves run on /usr/bin/python3 (with numpy, pandas, matplotlib, IPython)
and node: the host's, or with KERNEL_TEST_ROOT those of another root file system, as
scripts/kernel-tests runs them in the code-interpreter template. The tests only need
pytest (and the e2b_code_interpreter SDK for the checks that feed kernel output to the
SDK's own parser)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_harness as harness  # noqa: E402


def pytest_terminal_summary(terminalreporter):
    if harness.METRICS:
        terminalreporter.section("kernel measurements")
        for name, value in harness.METRICS:
            terminalreporter.write_line("%s: %s" % (name, value))


@pytest.fixture(scope="session", autouse=True)
def kernel_home(tmp_path_factory):
    """A HOME for the kernels (IPython and matplotlib write there)."""
    home = tmp_path_factory.mktemp("home")
    os.environ["KERNEL_TEST_HOME"] = str(home)
    harness.become_subreaper()
    yield home


def _need(program):
    """The kernels' interpreters must be there: a missing one fails (never skips)."""
    problem = harness.missing(program)
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="module")
def py():
    """One Python kernel (no zygote) shared by a module's tests."""
    _need(harness.PYTHON)
    kernel = harness.start_kernel(harness.python_argv(), language="python")
    yield kernel
    harness.stop(kernel)


@pytest.fixture
def fresh_py():
    _need(harness.PYTHON)
    kernel = harness.start_kernel(harness.python_argv(), language="python")
    yield kernel
    harness.stop(kernel)


@pytest.fixture(scope="module")
def js():
    _need(harness.NODE)
    kernel = harness.start_kernel(harness.node_argv(), language="javascript")
    yield kernel
    harness.stop(kernel)


@pytest.fixture(scope="module")
def bash(tmp_path_factory):
    _need("bash")
    cwd = tmp_path_factory.mktemp("bashcwd")
    kernel = harness.start_kernel(harness.bash_argv(), cwd=str(cwd), language="bash")
    kernel.start_cwd = str(cwd)
    yield kernel
    harness.stop(kernel)


@pytest.fixture(scope="module")
def zygote():
    _need(harness.PYTHON)
    z = harness.Zygote()
    yield z
    z.close()
