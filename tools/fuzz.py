#!/usr/bin/env python3
"""The long fuzzing run: every parser of outside bytes under atheris/libFuzzer, one table.

Runs each target of ``test/fuzz_targets.py`` (token text and ids, continuous chunks, the
constrained-decoding grammars, gRPC replies and observations, openpi msgpack frames, OpenVLA
json-numpy bodies, OpenAI chat completions, params YAML, MCAP recordings, camera frames, outside
text) for ``--seconds-per-target`` in its own process, ``--jobs`` at a time, and
prints a Markdown table (inputs tried, libFuzzer coverage counters, result) with the machine, and
writes it to ``--out``. A crash, hang (> 10 s per input) or memory blow-up keeps its reproducer in
``--workdir`` and makes the exit status 1. ``make test`` runs the same targets for 3 s each
(test/test_fuzz.py); this is the long version:

    .venv/bin/python tools/fuzz.py --seconds-per-target 300
    .venv/bin/python tools/fuzz.py --seconds-per-target 60 --targets grpc_reply,openpi_reply

libFuzzer stops a target at its first crash, so "crashes" is 0 or 1 per run; fix it and run again.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from test.fuzz_targets import TARGETS, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds-per-target", "--seconds", dest="seconds", type=float, default=300.0,
                   help="fuzzing time per target (default 300)")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {', '.join(TARGETS)}")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)), help="targets fuzzed at once")
    p.add_argument("--workdir", type=Path, help="corpora and reproducers (default: a new temporary directory)")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/fuzz.md", help="Markdown report")
    args = p.parse_args(argv)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        p.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rt2-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"fuzzing {len(names)} targets for {args.seconds:.0f} s each, {args.jobs} at a time (work dir {work})",
          flush=True)
    with futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda t: run(t, args.seconds, work), names))
    rows = ["| target | function fuzzed | inputs tried | coverage (cov / ft) | crashes | seconds | result |",
            "|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        verdict = "no crash, no hang" if r.ok else f"**FAILED** (exit {r.returncode}; reproducer `{r.crash}`)"
        rows.append(f"| `{r.target}` | {TARGETS[r.target].parses} | {r.inputs:,} | {r.coverage} / {r.features} | "
                    f"{int(not r.ok)} | {r.seconds:.0f} | {verdict} |")
    machine = (f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, {platform.platform()}, "
               f"Python {platform.python_version()}")
    report = "\n".join([
        "# Fuzzing: every parser of outside bytes", "",
        f"`tools/fuzz.py --seconds-per-target {args.seconds:.0f}` ({args.jobs} targets at a time, "
        f"{time.monotonic() - t0:.0f} s in all), {time.strftime('%Y-%m-%d')}. Machine: {machine}.", "",
        "Invariants checked on every input: only the parser's typed errors escape; no hang (10 s per input); "
        "memory below 3 GB; no action from invalid input (every action that comes out is finite and within the "
        "tokenizer's ranges; a constrained-decoding grammar accepts only answers the tokenizer accepts; a decoded "
        "image is uint8 HxWx3 of the declared size). `cov` / `ft` are libFuzzer's edge and feature counters over "
        "the instrumented rt2_ros modules (third-party code such as OpenCV, protobuf and numpy is not counted). "
        "libFuzzer stops a target at its first crash, so crashes is 0 or 1 per run.", "", *rows, ""])
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"wrote {args.out}")
    failed = [r for r in results if not r.ok]
    for r in failed:
        tail = r.output[r.output.find("Traceback"):][:3000] if "Traceback" in r.output else r.output[-3000:]
        print(f"--- {r.target} ---\n{tail}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
