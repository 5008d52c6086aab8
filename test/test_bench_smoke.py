"""Smoke test of bench/transport.py: the smallest run starts every null server, makes calls with every
client and writes a well-formed Markdown report (a benchmark is a script, not a timed test: no number is
checked against a bound here, only that each one was measured)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(60)
def test_transport_bench_writes_a_table(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(REPO / "bench" / "transport.py"), "--rounds", "1", "--calls", "3",
                          "--warmup", "1", "--codec-repeats", "1", "--no-plots", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=50, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    report = (tmp_path / "transport.md").read_text()
    assert report in run.stdout  # the table printed is the table written
    assert "Machine: " in report and "Load before: " in report and "Load after: " in report

    latency = report.split("## Call latency", 1)[1].split("##", 1)[0]
    rows = [line for line in latency.splitlines() if line.startswith("| ") and not line.startswith("| client")]
    clients = {row.split("|")[1].strip(): row for row in rows}
    for name in ("grpc unary raw", "grpc unary jpeg", "grpc unary png", "grpc streaming raw", "grpc streaming jpeg",
                 "grpc streaming png", "openpi", "openvla_http", "openai (JPEG)",
                 "openpi-client WebsocketClientPolicy", "OpenVLA README client (requests + json-numpy)"):
        assert name in clients, f"no latency row for {name}"
        cells = [c.strip() for c in clients[name].split("|")[1:-1]]
        assert cells[3] == "3", cells  # calls measured
        p50, p95, p99 = (float(c) for c in cells[4:7])
        assert 0 < p50 <= p95 <= p99, cells

    codec = report.split("## Bytes and codec cost", 1)[1].split("##", 1)[0]
    codec_rows = [line for line in codec.splitlines() if re.match(r"\| \d+x\d+ \|", line)]
    assert len(codec_rows) == 2 * 2 * 6 + 2  # sizes x cameras x transports, + OpenVLA's one-camera rows
    raw_224 = next(r for r in codec_rows if r.startswith("| 224x224 | 1 | rt2_ros grpc raw"))
    assert int(raw_224.split("|")[4].strip().replace(",", "")) > 224 * 224 * 3  # the pixels are all there

    targets = report.split("## Targets", 1)[1]
    assert len(re.findall(r"\*\*(met|not met)\*\*", targets)) == 3
