"""Server processes that tests and benches start: wait (bounded) for the line that says it is ready, stop."""

from __future__ import annotations

import re
import selectors
import subprocess
import time
from pathlib import Path


def wait_for_line(proc: subprocess.Popen, pattern: re.Pattern, name: str, stderr: Path,
                  timeout_s: float) -> re.Match:
    """The match of the first stdout line of ``proc`` that ``pattern`` finds, within ``timeout_s``.

    On timeout or EOF (the process died) it is killed and RuntimeError names ``name`` with the tail of
    its ``stderr`` file."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(timeout=remaining):
                continue
            line = proc.stdout.readline()
            if match := pattern.search(line):
                return match
            if not line:  # EOF: the process died
                break
    finally:
        selector.close()
    proc.kill()
    proc.wait(timeout=5)
    raise RuntimeError(f"{name} did not start: {stderr.read_text()[-2000:]}")


def terminate(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 5 s; waits for the exit."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
