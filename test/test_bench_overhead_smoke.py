"""Smoke test of bench/overhead.py: the in-process setting runs the real nodes over DDS with the shipped
config files and writes a well-formed table (a benchmark is a script, not a timed test: only that each
number was measured and is plausible, no target bound)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(40)
def test_overhead_bench_writes_a_table(tmp_path: Path) -> None:
    # A pid-picked domain (as isolate_ros_domain): never bench/overhead.py's default 102, which a full run may hold.
    env = dict(os.environ, RT2_TEST_ROS_DOMAIN=os.environ.get("RT2_TEST_ROS_DOMAIN", str(1 + os.getpid() % 100)))
    out = tmp_path / "overhead.md"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "overhead.py"), "--settings", "in-process",
                          "--window", "2", "--settle", "0.5", "--bare-calls", "5", "--out", str(out)],
                         capture_output=True, text=True, timeout=35, cwd=REPO, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = out.read_text()
    assert report in run.stdout  # the table printed is the table written
    assert "Machine: " in report and "Load before: " in report and "Load after: " in report
    rows = [line for line in report.splitlines() if line.startswith("| in-process")]
    assert len(rows) == 1, report
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert len(cells) == 7, cells
    assert int(cells[1]) >= 8, cells  # 2 s at 8 Hz: every frame answered, give or take the window's edges
    p50, p95, p99 = (float(v) for v in cells[2].split("/"))
    assert 0 < p50 <= p95 <= p99 < 100, cells  # stamped by two processes' clocks: positive, and not stuck
    twist_p50, twist_p99 = (float(v) for v in cells[6].split("/"))
    assert 0 <= twist_p50 <= twist_p99, cells  # every action changes the twist (alternating +x / -x answers)
    assert "In-process at 224x224: p50" in report and ("**met**" in report or "**not met**" in report)
