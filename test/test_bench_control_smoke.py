"""Smoke test of bench/control.py: the smallest setting (one action per call, 0 ms, one round) runs the real
nodes over DDS against the openpi null server and writes a well-formed Markdown table (a benchmark is a
script, not a timed test: only that each number was measured and is plausible, no target bound)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(30)
def test_control_bench_writes_a_table(tmp_path: Path) -> None:
    # A pid-picked domain (as isolate_ros_domain): never bench/control.py's default 101, which a full run may hold.
    env = dict(os.environ, RT2_TEST_ROS_DOMAIN=os.environ.get("RT2_TEST_ROS_DOMAIN", str(1 + os.getpid() % 100)))
    out = tmp_path / "control.md"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "control.py"), "--latencies", "0", "--horizons", "1",
                          "--rounds", "1", "--window", "1.5", "--settle", "0.5", "--parts", "latency", "--no-plot",
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=25, cwd=REPO, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = out.read_text()
    assert report in run.stdout  # the table printed is the table written
    assert "Machine: " in report and "Load before: " in report and "Load after: " in report
    rows = [line for line in report.splitlines() if line.startswith("| one action/call")]
    assert [r.split("|")[3].strip() for r in rows] == ["no", "yes"], rows  # both pipelining settings
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert len(cells) == 13, cells
        twist_hz, actions_hz = float(cells[3]), float(cells[6])
        age_p50, age_p95, age_p99 = (float(c) for c in cells[9:12])
        assert twist_hz > 10.0 and actions_hz > 1.0, cells  # the stream ran and actions were released
        assert 0 < age_p50 <= age_p95 <= age_p99, cells
