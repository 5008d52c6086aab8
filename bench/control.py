#!/usr/bin/env python3
"""Control under backend latency (issue 14, part 4): what reaches the controller when the model is slow.

Real processes over real DDS (localhost only), as the demo runs them: ``rt2-bringup`` (policy and
safety node) using the ``openpi`` backend against the openpi null server of
``test/servers/openpi_policy_server.py`` (websocket + msgpack, openpi's wire format). The server
answers each observation with a (horizon, 7) chunk after the delay the prompt names (``sleep:<s>``),
so the backend latency is injected by the instruction and changes per episode without a restart; each
call's delay is drawn uniformly within ``--jitter`` (default +-10 %) of it.
Two backends: one action per call (horizon 1, the RT-2 shape) and chunked (horizon 10). Each with
and without pipelining: ``policy.refill_threshold`` 0 (the next request goes out when the queue is
empty) or 1 / 5 (the next request goes out while the last action / half the chunk is still queued;
set live with ``ros2 param set``). The probe node plays the camera (224x224 at ``--camera-hz``) and
the arm driver, and records ``arm_action`` and the twists on ``servo_node/delta_twist_cmds``.

Reported per setting (p50 over rounds; rounds interleave every setting): twist rate at the
controller, released actions/s (``arm_action``), fresh replies/s (distinct camera frames answered),
action age (camera stamp -> ``arm_action`` received by the probe; the safety node executes it on
arrival) p50/p95/p99, and stall (time without any released action beyond one execute period, per
second). Targets (issue 14): at 300 ms twists >= 30 Hz throughout; chunked >= 10 fresh actions/s
and zero stall; one-action-per-call age <= latency + one camera period + 10 ms.

    .venv/bin/python bench/control.py                  # ~3 minutes, writes bench/results/control.md + PNG
    .venv/bin/python bench/control.py --rounds 3 --window 8
    .venv/bin/python bench/control.py --latencies 0 --horizons 1 --window 2 --rounds 1 --out /tmp/c.md  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.transport import load, machine  # noqa: E402 - one machine description for every bench

SERVER = REPO / "test" / "servers" / "openpi_policy_server.py"
COMMAND_RATE_HZ = 30.0  # safety.command_rate_hz (default)
EXECUTE_RATE_HZ = 10.0  # policy.execute_rate_hz (default)
TARGET_LATENCY_MS = 300


def pct(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def rate(times: list[float], window_s: float) -> float:
    """Events per second between the first and the last event (0 or 1 event: per window)."""
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 else len(times) / window_s


def window_metrics(twist_t: list[float], actions: list[tuple[float, float, int, float]], window_s: float,
                   execute_period_s: float) -> dict:
    """Rates, ages and stall from one window: twist receipt times, (receipt time, camera stamp, seq, policy
    node's publish stamp) of actions."""
    ages = [(t - stamp) * 1e3 for t, stamp, _, _ in actions]
    times = sorted(t for t, _, _, _ in actions)
    # Release intervals by the policy node's own stamps (no DDS delivery jitter).
    intervals = np.diff(sorted(pub for _, _, _, pub in actions)) * 1e3
    gaps = np.diff(times) if len(times) > 1 else np.array([window_s])
    stall = float(np.clip(gaps - 1.5 * execute_period_s, 0.0, None).sum()) if len(times) > 1 else window_s
    return {"twist_hz": rate(twist_t, window_s), "actions_hz": rate(times, window_s),
            "fresh_hz": len({seq for _, _, seq, _ in actions}) / window_s,
            "interval_ms": intervals.tolist(),
            "age_ms": ages, "stall_ms_per_s": stall * 1e3 / window_s,
            "max_twist_gap_ms": float(np.diff(sorted(twist_t)).max() * 1e3) if len(twist_t) > 1 else float("nan")}


def start_server(horizon: int, log_dir: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(SERVER), "--log", str(log_dir / f"openpi_h{horizon}.jsonl"),
                             "--horizon", str(horizon), "--action-scale", str(0.5 / max(horizon, 1))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise SystemExit(f"openpi null server did not start: {line!r}")
    return proc, int(line.split()[1])


def overlay(port: int, horizon: int) -> dict:
    return {"rt2_policy": {"ros__parameters": {
        "cameras": {"names": ["camera"]},
        "backend": {"type": "openpi", "timeout_s": 2.0,
                    "openpi": {"url": f"ws://127.0.0.1:{port}", "api_key_env": "",
                               "image_keys": ["observation/image"], "image_cameras": ["camera"]}},
        "policy": {"execute_rate_hz": EXECUTE_RATE_HZ, "max_reply_age_s": 2.5, "max_action_age_s": 3.0,
                   "max_frame_age_s": 0.5}}},
        "rt2_safety": {"ros__parameters": {"safety": {"max_action_age_s": 3.5}}}}


def run(args) -> tuple[list[dict], str, str]:
    import yaml
    from geometry_msgs.msg import TwistStamped
    from std_msgs.msg import String

    from rt2_ros.nodes.common import ACTION_QOS, COMMAND_QOS, EVENT_QOS, LATCHED_QOS
    from rt2_ros_interfaces.msg import ArmAction, SafetyStatus
    from test.ros_helpers import PANDA_JOINTS, Probe, isolate_ros_domain, start_bringup, stop

    # Domain 101: isolate_ros_domain picks 1..100 from a test's pid, so a test run alongside never meets this one.
    os.environ.setdefault("RT2_TEST_ROS_DOMAIN", "101")
    isolate_ros_domain()
    tmp = Path(tempfile.mkdtemp(prefix="rt2_bench_control_"))
    probe = Probe("rt2_bench_control_probe")
    probe.record(SafetyStatus, "/rt2_safety/status", LATCHED_QOS, "status")
    probe.record(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS, "twist")
    probe.record(ArmAction, "/arm_action", ACTION_QOS, "action")
    frame = np.full((224, 224, 3), 128, dtype=np.uint8)
    probe.publish_fake_sensors(period_s=1.0 / args.camera_hz, joints=PANDA_JOINTS, cameras={"/camera/image": frame})
    probe.instruction = probe.publisher(String, "/instruction", EVENT_QOS)
    wall_minus_mono = time.time() - time.monotonic()
    rows: list[dict] = []
    load_before = load()
    try:
        for horizon in args.horizons:
            server, port = start_server(horizon, tmp)
            params = tmp / f"overlay_h{horizon}.yaml"
            params.write_text(yaml.safe_dump(overlay(port, horizon)))
            log = tmp / f"bringup_h{horizon}.log"
            baselines, t0 = probe.match_baselines("both", camera_topics=["/camera/image"]), time.monotonic()
            proc = start_bringup(REPO / "config" / "rt2.yaml", "--params", str(params), log=log)
            try:
                probe.wait_started(proc, "both", baselines, t0, log, timeout=40.0)
                episode = 0
                refills = {False: 0, True: 1 if horizon == 1 else horizon // 2}
                for rnd in range(args.rounds):
                    for latency_ms in args.latencies:
                        for pipelined in (False, True):
                            probe.set_parameters("rt2_policy", {"policy.refill_threshold": refills[pipelined]})
                            # Trailing zeros make each episode's instruction new without changing the delay.
                            episode += 1
                            probe.take_episode(lambda ms=latency_ms, k=episode: probe.instruction.publish(
                                String(data=f"sleep:{ms / 1000:.3f}~{args.jitter * ms / 1000:.4f}" + "0" * (k % 8))))
                            settle = args.settle + latency_ms / 1000.0
                            time.sleep(settle)
                            t_a = time.monotonic()
                            time.sleep(args.window)
                            t_b = time.monotonic()
                            twist_t = [t for t, _ in probe.messages["twist"] if t_a <= t < t_b]
                            acts = [(t + wall_minus_mono, m.observation_stamp.sec + m.observation_stamp.nanosec * 1e-9,
                                     m.observation_seq, m.header.stamp.sec + m.header.stamp.nanosec * 1e-9)
                                    for t, m in probe.messages["action"] if t_a <= t < t_b]
                            m = window_metrics(twist_t, acts, t_b - t_a, 1.0 / EXECUTE_RATE_HZ)
                            rows.append({"horizon": horizon, "latency_ms": latency_ms, "pipelined": pipelined,
                                         "round": rnd, **m})
                            print(f"h{horizon} {latency_ms} ms pipelined={pipelined} round {rnd}: "
                                  f"twist {m['twist_hz']:.1f} Hz, actions {m['actions_hz']:.1f}/s, "
                                  f"fresh {m['fresh_hz']:.1f}/s, stall {m['stall_ms_per_s']:.0f} ms/s", flush=True)
            finally:
                code = stop(proc)
                server.kill()
                server.wait()
                if code != 0:
                    print(f"rt2-bringup exited with {code}; log {log}", file=sys.stderr)
    finally:
        probe.close()
    return rows, load_before, load()


def summarise(rows: list[dict], camera_hz: float) -> tuple[str, dict]:
    """Markdown table (p50 over rounds of the rates, percentiles over all actions' ages) and target checks."""
    head = ("| backend | latency ms | pipelined | twist Hz | min twist Hz | max twist gap ms | actions/s | "
            "fresh replies/s | release interval p50 ms | age p50 ms | age p95 ms | age p99 ms | stall ms/s |\n|"
            + "---|" * 13)
    lines, summary = [head], {}
    keys = sorted({(r["horizon"], r["latency_ms"], r["pipelined"]) for r in rows})
    for h, lat, pipe in keys:
        rs = [r for r in rows if (r["horizon"], r["latency_ms"], r["pipelined"]) == (h, lat, pipe)]
        ages = [a for r in rs for a in r["age_ms"]]
        intervals = [i for r in rs for i in r["interval_ms"]]
        s = {"twist_hz": float(np.median([r["twist_hz"] for r in rs])),
             "min_twist_hz": min(r["twist_hz"] for r in rs),
             "max_twist_gap_ms": max(r["max_twist_gap_ms"] for r in rs),
             "actions_hz": float(np.median([r["actions_hz"] for r in rs])),
             "fresh_hz": float(np.median([r["fresh_hz"] for r in rs])),
             "interval_p50": pct(intervals, 50),
             "age_p50": pct(ages, 50), "age_p95": pct(ages, 95), "age_p99": pct(ages, 99),
             "stall_ms_per_s": float(np.median([r["stall_ms_per_s"] for r in rs])), "rounds": len(rs)}
        summary[(h, lat, pipe)] = s
        name = "one action/call (h1)" if h == 1 else f"chunked (h{h})"
        lines.append(f"| {name} | {lat} | {'yes' if pipe else 'no'} | {s['twist_hz']:.1f} | {s['min_twist_hz']:.1f} | "
                     f"{s['max_twist_gap_ms']:.0f} | {s['actions_hz']:.1f} | {s['fresh_hz']:.2f} | "
                     f"{s['interval_p50']:.1f} | "
                     f"{s['age_p50']:.0f} | {s['age_p95']:.0f} | {s['age_p99']:.0f} | {s['stall_ms_per_s']:.0f} |")
    checks = []
    period_ms = 1000.0 / camera_hz
    for (h, lat, pipe), s in summary.items():
        if lat != TARGET_LATENCY_MS:
            continue
        tag = f"{'h1' if h == 1 else f'h{h}'} {lat} ms {'pipelined' if pipe else 'not pipelined'}"
        checks.append((f"{tag}: twists >= 30 Hz in every window", s["min_twist_hz"] >= 0.97 * COMMAND_RATE_HZ,
                       f"min {s['min_twist_hz']:.1f} Hz"))
        if h > 1:
            checks.append((f"{tag}: >= 10 actions/s", s["actions_hz"] >= 9.9, f"{s['actions_hz']:.1f}/s"))
            checks.append((f"{tag}: zero stall between chunks", s["stall_ms_per_s"] == 0.0,
                           f"{s['stall_ms_per_s']:.0f} ms/s"))
        else:
            bound = lat + period_ms + 10.0
            checks.append((f"{tag}: age p50 <= latency + camera period + 10 ms ({bound:.0f} ms)",
                           s["age_p50"] <= bound, f"p50 {s['age_p50']:.0f} ms, p95 {s['age_p95']:.0f} ms"))
    text = "\n".join(lines)
    if checks:
        text += "\n\n| target | met | measured |\n|---|---|---|\n" + "\n".join(
            f"| {c} | {'yes' if ok else '**no**'} | {v} |" for c, ok, v in checks)
    return text, summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for (h, pipe) in sorted({(h, p) for h, _, p in summary}):
        lats = sorted(lat for hh, lat, pp in summary if (hh, pp) == (h, pipe))
        label = f"h{h} {'pipelined' if pipe else 'serial'}"
        for ax, key in zip(axes, ("twist_hz", "actions_hz", "age_p50"), strict=True):
            ax.plot(lats, [summary[(h, lat, pipe)][key] for lat in lats], marker="o", label=label)
    for ax, title in zip(axes, ("twists at the controller (Hz)", "actions released (1/s)", "action age p50 (ms)"),
                         strict=True):
        ax.set_title(title)
        ax.set_xlabel("backend latency (ms)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# -- closed-loop demo rate (issue 14, part 5) --------------------------------------------------------------
DEMO_CAMERAS = {  # params overlay per setting: the sim renders what the policy node consumes
    1: {"rt2_sim": {"ros__parameters": {"sim_node": {"wrist_camera": False}}},
        "rt2_policy": {"ros__parameters": {"cameras": {"names": ["camera"]}}}},
    2: {"rt2_sim": {"ros__parameters": {"sim_node": {"wrist_camera": True}}},
        "rt2_policy": {"ros__parameters": {"cameras": {"names": ["camera", "wrist"],
                                                       "wrist": {"topic": "wrist_camera/image"}}}}},
}


def demo_rate(cameras: list[int], episodes: int, timeout_s: float) -> tuple[str, list[dict]]:
    """rt2-demo (simulator rendering, embedded policy, nodes over DDS), one episode per run and setting:
    steps (released actions), action rate by the actions' stamps, wall time and success from summary.json."""
    import yaml

    work = Path(tempfile.mkdtemp(prefix="rt2_bench_demo_"))
    rows = []
    for ep in range(episodes):
        for n in cameras:
            params = work / f"cameras{n}.yaml"
            params.write_text(yaml.safe_dump(DEMO_CAMERAS[n]))
            out = work / f"cam{n}_ep{ep}"
            env = dict(os.environ, PYTHONPATH=str(REPO))
            t0 = time.monotonic()
            run = subprocess.run([sys.executable, "-m", "rt2_ros.demo", "--params", str(params), "--no-record",
                                  "--out", str(out), "--scene-seed", str(ep), "--ros-domain", "101",
                                  "--timeout", str(timeout_s)],
                                 capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout_s + 60)
            wall = time.monotonic() - t0
            found = sorted(out.glob("*/summary.json"))
            if not found:
                raise SystemExit(f"rt2-demo wrote no summary.json (exit {run.returncode}):\n{run.stdout[-1500:]}"
                                 f"{run.stderr[-1500:]}")
            summary = json.loads(found[-1].read_text())
            rows.append({"cameras": n, "episode": ep, "success": bool(summary["success"]), "steps": summary["steps"],
                         "rate_hz": summary["control_rate_hz"], "episode_s": summary["wall_time_s"],
                         "process_s": wall, "age_p50_ms": summary["action_age_ms"].get("p50", float("nan"))})
            print(f"demo {n} camera(s) episode {ep}: {rows[-1]}", flush=True)
    lines = ["| cameras | episodes | success | steps (p50) | actions/s (p50) | action age p50 ms | "
             "episode s (p50) | rt2-demo process s (p50) |", "|" + "---|" * 8]
    for n in cameras:
        rs = [r for r in rows if r["cameras"] == n]
        med = {k: float(np.median([r[k] for r in rs])) for k in ("steps", "rate_hz", "age_p50_ms", "episode_s",
                                                                   "process_s")}
        lines.append(f"| {n} | {len(rs)} | {sum(r['success'] for r in rs)}/{len(rs)} | {med['steps']:.0f} | "
                     f"{med['rate_hz']:.2f} | {med['age_p50_ms']:.0f} | {med['episode_s']:.1f} | "
                     f"{med['process_s']:.1f} |")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--latencies", type=int, nargs="+", default=[0, 100, 300, 1000], help="injected backend ms")
    ap.add_argument("--horizons", type=int, nargs="+", default=[1, 10], help="actions per reply")
    ap.add_argument("--window", type=float, default=2.5, help="measured seconds per setting and round")
    ap.add_argument("--settle", type=float, default=0.5, help="seconds after an episode starts before measuring")
    ap.add_argument("--camera-hz", type=float, default=20.0)
    ap.add_argument("--jitter", type=float, default=0.1, help="per-call latency jitter: uniform +- this fraction")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "control.md")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--parts", nargs="+", choices=("latency", "demo"), default=["latency", "demo"])
    ap.add_argument("--demo-cameras", type=int, nargs="+", choices=sorted(DEMO_CAMERAS), default=[1, 2])
    ap.add_argument("--demo-episodes", type=int, default=1, help="rt2-demo episodes per camera setting")
    ap.add_argument("--demo-timeout", type=float, default=90.0, help="s per rt2-demo episode")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.window <= 0 or any(h < 1 for h in args.horizons):
        ap.error("--rounds and --horizons must be >= 1, --window > 0")
    if "latency" in args.parts:
        t0 = time.monotonic()
        rows, load_before, load_after = run(args)
        table, summary = summarise(rows, args.camera_hz)
        report = (f"# Control under backend latency (bench/control.py)\n\nMachine: {machine()}\n\n"
                  f"Load before: `{load_before}`  \nLoad after: `{load_after}`\n\n"
                  f"Camera 224x224 at {args.camera_hz:g} Hz, policy.execute_rate_hz {EXECUTE_RATE_HZ:g}, "
                  f"safety.command_rate_hz {COMMAND_RATE_HZ:g}; openpi null server (latency set per episode, "
                  f"each call uniform within +-{args.jitter:.0%} of it); "
                  f"{args.rounds} interleaved rounds x {args.window:g} s per setting; "
                  f"run took {time.monotonic() - t0:.0f} s.\n\n{table}\n")
        print(report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        if args.json:
            args.json.write_text(json.dumps(rows))
        if not args.no_plot:
            plot(summary, args.out.with_suffix(".png"))
    if "demo" in args.parts:
        t0, load_before = time.monotonic(), load()
        table, rows = demo_rate(args.demo_cameras, args.demo_episodes, args.demo_timeout)
        report = (f"# Closed-loop demo rate (bench/control.py --parts demo)\n\nMachine: {machine()}\n\n"
                  f"Load before: `{load_before}`  \nLoad after: `{load()}`\n\n"
                  f"rt2-demo (simulator with rendering, embedded policy, nodes over DDS, no recording), "
                  f"scene seeds 0..{args.demo_episodes - 1}; run took {time.monotonic() - t0:.0f} s.\n\n{table}\n")
        print(report)
        out = args.out.with_name("demo_rate.md")
        out.write_text(report)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
