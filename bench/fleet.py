"""Many robots against one policy server: rt2-serve (one model behind a lock) vs rt2-fleet-serve (Ray Serve).

Each simulated robot is a light client process (rt2_ros's ``grpc`` backend, no ROS) that asks for an
action at up to 10 Hz: a call, then the next one at the next 100 ms tick (at once if the call took
longer), for ``--seconds``. The hosted model is the ``simulated_model`` backend, whose forward pass
costs ``a + b * batch`` seconds. Prints a Markdown table and writes bench/results/fleet.md and
bench/results/fleet.png.

    .venv/bin/python bench/fleet.py                      # a = 50 ms, b = 5 ms, N = 1..32
    .venv/bin/python bench/fleet.py --robots 1 4 16 --seconds 5 --servers ray
    .venv/bin/python bench/fleet.py --model local --robots 1 4 16 --seconds 5   # tiny LLaVA, fleet_local.*

Both servers run with --workers and --max-calls-per-client above the robot count (all robots share
127.0.0.1 here), so neither refuses calls by configuration.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RATE_HZ = 10.0
CALL_TIMEOUT_S = 1.0


def robot(target: str, seconds: float, start_at: float, seed: int, out: mp.Queue) -> None:
    """One robot: calls at up to RATE_HZ until start_at + seconds; puts (latencies_s, failures)."""
    from rt2_ros.actions import Observation
    from rt2_ros.backends import BackendError, create_backend
    from rt2_ros.tokens import ActionTokenizer

    tokenizer = ActionTokenizer.from_profile("rt2")
    client = create_backend("grpc", {"target": target, "connect_timeout_s": 10.0}, tokenizer)
    image = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    latencies, failures, seq = [], 0, 0
    time.sleep(max(0.0, start_at - time.time()))
    t_next = time.monotonic()
    t_end = t_next + seconds
    while time.monotonic() < t_end:
        seq += 1
        t0 = time.monotonic()
        try:
            reply = client.infer(Observation(image, "pick up the red block", seq=seq, stamp=time.time()),
                                 CALL_TIMEOUT_S)
            tokenizer.decode_reply(reply)
            latencies.append(time.monotonic() - t0)
        except (BackendError, ValueError):
            failures += 1
        t_next = max(t_next + 1.0 / RATE_HZ, time.monotonic())
        time.sleep(max(0.0, t_next - time.monotonic()))
    client.close()
    out.put((latencies, failures))


def start_server(kind: str, backend: str, params: Path, fleet_config: Path,
                 workers: int) -> tuple[subprocess.Popen, str]:
    common = ["--backend", backend, "--params", str(params), "--port", "0", "--workers", str(workers),
              "--max-calls-per-client", str(workers), "--log-level", "WARNING"]
    module = ["-m", "rt2_ros.serve"] if kind == "lock" else \
        ["-m", "rt2_ros.fleet", "--fleet-config", str(fleet_config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, *module, *common], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120.0
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", line)
        if match:
            return proc, f"127.0.0.1:{match.group(1)}"
    proc.kill()
    raise RuntimeError(f"{kind} server did not start (exit {proc.poll()})")


def run(target: str, n: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0 + 0.15 * n  # every process imported and connected before the clock starts
    procs = [ctx.Process(target=robot, args=(target, seconds, start_at, i, out)) for i in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=start_at - time.time() + seconds + 60) for _ in procs]
    for p in procs:
        p.join(10)
    lat = np.array([x for r, _ in results for x in r])
    failures = sum(f for _, f in results)
    per_robot = [len(r) / seconds for r, _ in results]
    return {"robots": n, "hz_min": min(per_robot), "hz_mean": float(np.mean(per_robot)), "total": len(lat) / seconds,
            "p50_ms": 1000 * float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p99_ms": 1000 * float(np.percentile(lat, 99)) if lat.size else float("nan"), "failed": failures}


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor())
    return (f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--robots", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--servers", nargs="+", default=["lock", "ray"], choices=["lock", "ray"])
    ap.add_argument("--seconds", type=float, default=6.0, help="measured time per point")
    ap.add_argument("--a-ms", type=float, default=50.0, help="forward pass fixed cost")
    ap.add_argument("--b-ms", type=float, default=5.0, help="forward pass cost per observation in the batch")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas (fleet.num_replicas)")
    ap.add_argument("--model", choices=["simulated", "local"], default="simulated",
                    help="simulated: simulated_model (a + b x batch); local: the local backend on a tiny random-weight "
                         "LLaVA built here like the tests' (test/tiny_models.py), real batched constrained generate; "
                         "results go to bench/results/fleet_local.*")
    args = ap.parse_args()
    workers = 2 * max(args.robots)
    load_before = os.getloadavg()  # the run is CPU-bound on a small machine: other load changes the figures
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        params, fleet_config = Path(tmp, "params.yaml"), Path(tmp, "fleet.yaml")
        if args.model == "local":
            sys.path.insert(0, str(ROOT))
            from test.tiny_models import build_tiny_llava

            model_dir = build_tiny_llava(Path(tmp, "tiny_llava"))
            backend = "local"
            params.write_text("server:\n  ros__parameters:\n    backend:\n      type: local\n"
                              f"      local: {{model_path: '{model_dir}', device: cpu}}\n"
                              "    tokenizer: {profile: rt2}\n")
        else:
            backend = "simulated_model"
            params.write_text("server:\n  ros__parameters:\n    backend:\n      type: simulated_model\n"
                              f"      simulated_model: {{base_s: {args.a_ms / 1000}, per_item_s: {args.b_ms / 1000}}}\n"
                              "    tokenizer: {profile: rt2}\n")
        fleet_config.write_text(f"fleet:\n  max_batch_size: {args.max_batch}\n"
                                f"  batch_wait_timeout_s: {args.batch_wait_ms / 1000}\n"
                                f"  num_replicas: {args.replicas}\n"
                                f"  replica: {{num_cpus: {1.0 / args.replicas:g}}}\n")
        for kind in args.servers:
            proc, target = start_server(kind, backend, params, fleet_config, workers)
            try:
                for n in args.robots:
                    row = run(target, n, args.seconds)
                    rows.setdefault(kind, []).append(row)
                    print(f"{kind:4s} N={n:2d}: {row['hz_mean']:.1f} Hz/robot (min {row['hz_min']:.1f}), "
                          f"{row['total']:.1f} actions/s, p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
                          f"{row['failed']} failed", flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    names = {"lock": "rt2-serve (lock)", "ray": "rt2-fleet-serve (Ray Serve)"}
    model = (f"Model-cost simulator t = {args.a_ms:g} ms + {args.b_ms:g} ms x batch" if args.model == "simulated"
             else "Tiny random-weight LLaVA (test/tiny_models.py), local backend on CPU, batched constrained generate")
    stem = "fleet" if args.model == "simulated" else "fleet_local"
    lines = [f"{model}; robots ask at up to "
             f"{RATE_HZ:g} Hz, {args.seconds:g} s per point, call timeout {CALL_TIMEOUT_S:g} s; Ray: max batch "
             f"{args.max_batch}, batch wait {args.batch_wait_ms:g} ms, {args.replicas} replica(s). "
             f"Machine: {machine()}; load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in load_before)} "
             f"before, {'/'.join(f'{x:.1f}' for x in os.getloadavg())} after.", "",
             "| server | robots | Hz per robot (mean / min) | actions/s total | p50 ms | p99 ms | failed calls |",
             "|---|---|---|---|---|---|---|"]
    for kind, kind_rows in rows.items():
        for r in kind_rows:
            lines.append(f"| {names[kind]} | {r['robots']} | {r['hz_mean']:.1f} / {r['hz_min']:.1f} | {r['total']:.1f} "
                         f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['failed']} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text("# bench/fleet.py\n\n" + table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, kind_rows in rows.items():
        n = [r["robots"] for r in kind_rows]
        ax1.plot(n, [r["hz_mean"] for r in kind_rows], "o-", label=names[kind])
        ax2.plot(n, [r["p99_ms"] for r in kind_rows], "o-", label=names[kind])
    for ax, label in ((ax1, "actions per second per robot"), (ax2, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("robots")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend()
    fig.suptitle((f"a = {args.a_ms:g} ms, b = {args.b_ms:g} ms per item" if args.model == "simulated" else
                  "tiny local LLaVA") + f"; {os.cpu_count()} CPUs")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
