#!/usr/bin/env python3
"""The longer fault-injection run: the fault tests of `make test`, several rounds, one table.

Each round runs the DDS fault suite (test/test_faults_dds.py: gRPC server killed, backend servers
that stall / drip / answer garbage or endless replies for openvla_http, grpc and openpi, camera
stop and resolution change, instruction change, e-stop, terminate) and, unless ``--faults-only``,
the other fault tests of the suite (test/test_safety_freshness_dds.py: ee_pose loss, stale actions,
bursts; test/test_episode_dds.py: node restarts, cancel, e-stop service; test/test_backend_budgets.py:
every backend x socket fault against its budget) as real processes over real DDS and loopback
sockets. It collects every bound they measure — test_faults_dds.py hands over its rows with the
bound each asserts (``$RT2_FAULTS_JSON``), the others print ``[measured] name: N ms`` lines and the
budget table — and prints a Markdown table of p50 / max over the rounds (each round's worst value),
with the failed tests per round and the machine, and writes it to ``--out``.
A script, not a test: it takes about 1.5 minutes a round with ``--faults-only``, 3 without.

    .venv/bin/python tools/fault_injection.py --rounds 5
    .venv/bin/python tools/fault_injection.py --rounds 10 --faults-only -k "estop or camera"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FAULT_SUITE = "test/test_faults_dds.py"
RELATED = ("test/test_safety_freshness_dds.py", "test/test_episode_dds.py", "test/test_backend_budgets.py")
MEASURED = re.compile(r"^\[measured\] (?P<name>[^:]+): (?P<value>[0-9.]+) ms")
BUDGET_HEADER = re.compile(r"^Worst infer\(\) duration in s .*allowed (?P<allowed>[0-9.]+)")
SUMMARY = re.compile(r"\d+ (passed|failed|xfailed|error).* in [0-9.]+s")

Key = tuple[str, str, str]  # (source, fault, measurement)


def parse_round(stdout: str, rows: list[dict]) -> dict[Key, tuple[float, float | None]]:
    """This round's worst value (ms) per measurement, with its bound (ms, or None)."""
    found: dict[Key, tuple[float, float | None]] = {}

    def put(key: Key, value: float, limit: float | None) -> None:
        if key not in found or value > found[key][0]:
            found[key] = (value, limit)

    for r in rows:  # test_faults_dds.py, with the bound each test asserts
        put(("faults_dds", r["fault"], r["what"]), r["measured_ms"], r["bound_ms"])
    faults = {r["fault"] for r in rows}
    budget_allowed: float | None = None
    budget_faults: list[str] = []
    for line in stdout.splitlines():
        line = line.strip()
        m = MEASURED.match(line)
        if m and m["name"].strip() not in faults:  # the other DDS tests: name: N ms (their own note)
            put(("freshness/episode", m["name"].strip(), "latency"), float(m["value"]), None)
            continue
        m = BUDGET_HEADER.match(line)
        if m:  # test_backend_budgets.py: backend x fault table of the worst infer() in s
            budget_allowed = float(m["allowed"]) * 1e3
            continue
        if budget_allowed is not None and line.startswith("| backend |"):
            budget_faults = [c.strip() for c in line.strip("|").split("|")[1:]]
            continue
        if budget_faults and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for fault, cell in zip(budget_faults, cells[1:], strict=False):
                v = re.match(r"([0-9.]+)", cell)
                if v:
                    put(("budgets (socket)", f"{cells[0]} {fault}", "worst infer()"), float(v[1]) * 1e3,
                        budget_allowed)
    return found


def one_round(tests: list[str], domain: int, select: str | None) -> tuple[dict, list[str], float]:
    with tempfile.TemporaryDirectory(prefix="rt2_faults_") as tmp:
        handoff = Path(tmp) / "faults.json"
        env = dict(os.environ, RT2_TEST_ROS_DOMAIN=str(domain), RT2_FAULTS_JSON=str(handoff))
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-rfE", "-p", "no:cacheprovider", "--basetemp",
               str(Path(tmp) / "pytest"), *tests]
        if select:
            cmd += ["-k", select]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        took = time.monotonic() - t0
        rows = json.loads(handoff.read_text()) if handoff.exists() else []
    found = parse_round(proc.stdout, rows)
    failed = sorted({m[1] for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)})
    if proc.returncode not in (0, 1) or not any(SUMMARY.search(ln) for ln in proc.stdout.splitlines()):
        failed.append(f"pytest exit {proc.returncode}: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    return found, failed, took


def table(values: dict[Key, list[float]], bounds: dict[Key, float | None], rounds: int) -> list[str]:
    lines = ["| source | fault | measurement | bound [ms] | rounds | p50 [ms] | max [ms] | within bound |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(values, key=lambda k: (k[0] != "faults_dds", k)):
        v = np.asarray(values[key])
        limit = bounds.get(key)
        ok = "-" if limit is None else ("yes" if v.max() <= limit else "NO")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {'-' if limit is None else f'{limit:.0f}'} | "
                     f"{len(v)}/{rounds} | {np.percentile(v, 50):.1f} | {v.max():.1f} | {ok} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="times each fault runs (default 5)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "faults.md"),
                   help="Markdown file for the table (default bench/results/faults.md)")
    p.add_argument("--domain", type=int, default=73, help="ROS_DOMAIN_ID of the test processes (default 73)")
    p.add_argument("--faults-only", action="store_true", help=f"run {FAULT_SUITE} only")
    p.add_argument("-k", dest="select", default=None, help="pytest -k expression to run a subset")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    tests = [FAULT_SUITE] if args.faults_only else [FAULT_SUITE, *RELATED]
    values: dict[Key, list[float]] = defaultdict(list)
    bounds: dict[Key, float | None] = {}
    failures: list[list[str]] = []
    durations: list[float] = []
    for r in range(args.rounds):
        found, failed, took = one_round(tests, args.domain, args.select)
        for key, (value, limit) in found.items():
            values[key].append(value)
            bounds[key] = limit
        failures.append(failed)
        durations.append(took)
        print(f"round {r + 1}/{args.rounds}: {len(found)} measurements, {len(failed)} failed tests, {took:.0f} s"
              + (f": {', '.join(failed)}" if failed else ""), flush=True)
    lines = ["# rt2_ros fault injection: measured bounds", "",
             f"Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, {platform.platform()}, "
             f"Python {platform.python_version()}.",
             f"Run: `tools/fault_injection.py --rounds {args.rounds}"
             + (" --faults-only" if args.faults_only else "") + (f" -k '{args.select}'" if args.select else "")
             + f"`: {', '.join(tests)}; {np.mean(durations):.0f} s per round; "
             f"failed tests per round: {[len(f) for f in failures]}.", "",
             "Each value is a round's worst; p50 and max are over the rounds. Bounds are those the tests assert "
             "(faults_dds: see the test for what each is made of; budgets: backend.timeout_s + CALL_MARGIN_S); "
             "'-' = the test asserts its own bound, stated in its [measured] note.", "",
             *table(values, bounds, args.rounds)]
    failed_any = sorted({f for round_failed in failures for f in round_failed})
    if failed_any:
        lines += ["", "Failed tests: " + "; ".join(failed_any)]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 1 if failed_any else 0


if __name__ == "__main__":
    raise SystemExit(main())
