"""A per-test time limit for `make gpu-check`'s pytest runs, without pytest-timeout.

Loaded with `-p benchmarks.gpu_pytest_timeout`; the limit is GPU_CHECK_TEST_TIMEOUT_S
seconds (default 20). SIGALRM raises in the test when it overruns, so that test fails
with "per-test time limit" and the run goes on to the next one. A test stuck inside one
long C call (a kernel that never returns) is only interrupted when the call returns to
Python: the step's own subprocess timeout in gpu_check.py is the backstop for that, and
faulthandler dumps every thread's stack just before it, so the log says where it hung.
POSIX only (signal.setitimer); elsewhere the plugin does nothing.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys

import pytest

LIMIT_S = float(os.environ.get("GPU_CHECK_TEST_TIMEOUT_S", "20"))


class TestTimeLimit(Exception):
    """Raised inside a test that ran past GPU_CHECK_TEST_TIMEOUT_S."""


def _on_alarm(signum, frame):
    raise TestTimeLimit(f"per-test time limit of {LIMIT_S:g} s (GPU_CHECK_TEST_TIMEOUT_S) spent")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if not hasattr(signal, "setitimer") or LIMIT_S <= 0:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
    # the stacks of a test stuck where the alarm cannot reach (written to stderr)
    faulthandler.dump_traceback_later(LIMIT_S + 10, exit=False, file=sys.stderr)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
