"""Suite-wide guards that keep a CI run bounded and readable.

- Each failure is written out the moment it happens (the test id and the end of its report), not only in the
  summary at the end: a run that is cut off later still shows why its tests failed.
- pytest-timeout's bound (``timeout`` in pyproject.toml) interrupts Python code, but a test stuck inside a C
  call that holds the GIL (seen: Fast DDS inside ``destroy_node`` behind a killed reader) never sees it. A
  faulthandler timer runs outside the GIL: past ``HARD_LIMIT_MARGIN_S`` more it prints every thread's stack
  and ends the run with exit 1, instead of the run hanging until the CI's own limit.
"""

from __future__ import annotations

import faulthandler
import os

import pytest

HARD_LIMIT_MARGIN_S = float(os.environ.get("RT2_TEST_HARD_LIMIT_MARGIN_S", "120"))  # env: the guard's own test
REPORT_TAIL_LINES = 25


def _timeout_s(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(item.config.getini("timeout") or 300)


_terminal = None  # the run's real stderr: during a test, fd 2 is pytest's capture file


def pytest_configure(config):
    global _terminal
    capturing = getattr(config.pluginmanager.getplugin("capturemanager"), "_global_capturing", None)
    saved_fd = getattr(getattr(capturing, "err", None), "targetfd_save", None)
    _terminal = os.fdopen(os.dup(2 if saved_fd is None else saved_fd), "w", buffering=1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    faulthandler.dump_traceback_later(_timeout_s(item) + HARD_LIMIT_MARGIN_S, exit=True, file=_terminal)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_runtest_logreport(report):
    if report.failed:
        tail = "\n".join(report.longreprtext.splitlines()[-REPORT_TAIL_LINES:])
        _terminal.write(f"\n--- FAILED ({report.when}) {report.nodeid}\n{tail}\n---\n")
