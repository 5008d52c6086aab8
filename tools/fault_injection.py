#!/usr/bin/env python3
"""The longer fault-injection run: the fault tests of `make test`, several rounds, one table.

Runs the DDS fault tests (test/test_faults_dds.py, test/test_safety_freshness_dds.py,
test/test_episode_dds.py) and the socket-level budget tests (test/test_backend_budgets.py)
``--rounds`` times, collects every bound they measure (the ``[measured] name: N ms`` lines and the
safety freshness file) and prints a Markdown table of p50 / max per measurement with the failures
per round, and writes it (with the machine) to ``--out``. A script, not a test: it takes minutes.

    .venv/bin/python tools/fault_injection.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TESTS = ("test/test_faults_dds.py", "test/test_safety_freshness_dds.py", "test/test_episode_dds.py",
         "test/test_backend_budgets.py")
FILES = ("/tmp/rt2_episode_measurements.txt", "/tmp/rt2_safety_freshness_measurements.txt")
LINE = re.compile(r"^(?:\[measured\] )?(?P<name>[^#][^:]*): (?P<value>[0-9.]+) ms")


def one_round(domain: int) -> tuple[dict[str, float], int, float]:
    for f in FILES:
        Path(f).unlink(missing_ok=True)
    env = dict(os.environ, RT2_TEST_ROS_DOMAIN=str(domain))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *TESTS],
                          cwd=REPO, env=env, capture_output=True, text=True)
    text = proc.stdout + "".join(Path(f).read_text() for f in FILES if Path(f).exists())
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = LINE.match(line.strip())
        if m:
            found[m["name"].strip()] = max(found.get(m["name"].strip(), 0.0), float(m["value"]))
    summary = [ln for ln in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed).* in [0-9.]+s", ln)]
    failed = int(m[1]) if summary and (m := re.search(r"(\d+) failed", summary[-1])) else 0
    if proc.returncode not in (0, 1) or not summary:
        failed = max(failed, 1)  # pytest could not run (collection error, interrupted)
    return found, failed, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "faults.md"))
    p.add_argument("--domain", type=int, default=73, help="ROS_DOMAIN_ID of the test processes")
    args = p.parse_args(argv)
    values: dict[str, list[float]] = defaultdict(list)
    failures, durations = [], []
    for r in range(args.rounds):
        found, failed, took = one_round(args.domain)
        for k, v in found.items():
            values[k].append(v)
        failures.append(failed)
        durations.append(took)
        print(f"round {r + 1}/{args.rounds}: {len(found)} measurements, {failed} failed tests, {took:.0f} s",
              flush=True)
    lines = ["# rt2_ros fault injection: measured bounds", "",
             f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}; "
             f"{args.rounds} rounds of {', '.join(TESTS)}; failed tests per round: {failures}; "
             f"{np.mean(durations):.0f} s per round.", "",
             "| measurement | rounds | p50 [ms] | max [ms] |", "|---|---|---|---|"]
    for name in sorted(values):
        v = np.asarray(values[name])
        lines.append(f"| {name} | {len(v)} | {np.percentile(v, 50):.1f} | {v.max():.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    print(f"wrote {args.out}")
    return 1 if any(failures) else 0


if __name__ == "__main__":
    raise SystemExit(main())
