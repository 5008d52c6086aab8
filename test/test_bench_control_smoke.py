"""Smoke tests of the benches that run the real nodes over DDS: bench/control.py (the smallest setting: one
action per call, 0 ms, one round, against the openpi null server) and bench/overhead.py (the in-process
setting with the shipped config files). Each writes a well-formed Markdown table (a benchmark is a script,
not a timed test: only that each number was measured and is plausible, no target bound)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, args: list[str], out: Path, timeout: float) -> str:
    """Run bench/<script> with ``args`` and ``--out out``; the report it wrote (checked to be what it printed)."""
    # A pid-picked domain (as isolate_ros_domain): never a bench's default (101, 102), which a full run may hold.
    env = dict(os.environ, RT2_TEST_ROS_DOMAIN=os.environ.get("RT2_TEST_ROS_DOMAIN", str(1 + os.getpid() % 100)))
    run = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--out", str(out)],
                         capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = out.read_text()
    assert report in run.stdout  # the table printed is the table written
    assert "Machine: " in report and "Load before: " in report and "Load after: " in report
    return report


@pytest.mark.timeout(30)
def test_control_bench_writes_a_table(tmp_path: Path) -> None:
    report = run_bench("control.py", ["--latencies", "0", "--horizons", "1", "--rounds", "1", "--window", "1.5",
                                      "--settle", "0.5", "--parts", "latency", "--no-plot"],
                       tmp_path / "control.md", timeout=25)
    rows = [line for line in report.splitlines() if line.startswith("| one action/call")]
    assert [r.split("|")[3].strip() for r in rows] == ["no", "yes"], rows  # both pipelining settings
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert len(cells) == 13, cells
        twist_hz, actions_hz = float(cells[3]), float(cells[6])
        age_p50, age_p95, age_p99 = (float(c) for c in cells[9:12])
        assert twist_hz > 10.0 and actions_hz > 1.0, cells  # the stream ran and actions were released
        assert 0 < age_p50 <= age_p95 <= age_p99, cells


@pytest.mark.timeout(40)
def test_overhead_bench_writes_a_table(tmp_path: Path) -> None:
    report = run_bench("overhead.py", ["--settings", "in-process", "--window", "2", "--settle", "0.5",
                                       "--bare-calls", "5"], tmp_path / "overhead.md", timeout=35)
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
