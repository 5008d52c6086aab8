"""The suite's own guards (test/conftest.py): a test stuck where pytest-timeout cannot reach it ends the run
with every thread's stack, and a failure is printed when it happens, not only in the final summary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

STUCK = '''
import ctypes, signal, pytest

def test_a_failure_is_shown_at_once():
    assert 1 == 2, "shown at once"

@pytest.mark.timeout(1)
def test_stuck_in_c_where_the_timeout_signal_cannot_reach():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as a C call that never returns to Python
    ctypes.PyDLL(None).sleep(120)

def test_never_reached():
    pass
'''


def test_a_stuck_test_ends_the_run_with_its_stack(tmp_path):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_stuck.py").write_text(STUCK)
    (tmp_path / "pytest.ini").write_text("[pytest]\ntimeout = 300\n")
    env = dict(os.environ, RT2_TEST_HARD_LIMIT_MARGIN_S="2")
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert run.returncode == 1, (run.returncode, run.stdout, run.stderr)
    assert elapsed < 30, elapsed  # 1 s timeout + 2 s margin, not the 120 s sleep
    assert "--- FAILED (call) test_stuck.py::test_a_failure_is_shown_at_once" in run.stderr
    assert "shown at once" in run.stderr
    assert "Timeout (0:00:03)!" in run.stderr
    assert 'test_stuck.py", line 10 in test_stuck_in_c_where_the_timeout_signal_cannot_reach' in run.stderr
