"""``rt2-demo``: a closed-loop episode on the simulated Panda, over real ROS 2, with a report.

What runs: ``rt2-bringup`` (policy + safety nodes) in a child process, and in this process the
simulator node plus a monitor node. They talk over DDS like on a robot: camera and ee_pose from
the simulator, arm actions from the policy, MoveIt Servo twists and the gripper command from
the safety node. The demo sends the instruction, prints progress, stops on the terminate token
(or a timeout) and writes an episode folder: ``camera.gif``, ``path.png`` (commanded vs
executed end-effector path in the workspace box), ``summary.json`` and ``episode.mcap``.

Safety of the demo itself: it runs on its own ROS domain with discovery restricted to this
machine (``--ros-domain``, default 87), so a simulated episode can never command a real arm
that shares the network.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_INSTRUCTION = "pick up the red cube and put it in the tray"


@dataclass
class EpisodeLog:
    """What the monitor collects during one episode (monotonic times)."""

    t0: float = 0.0
    statuses: list = field(default_factory=list)  # (t, SafetyStatus)
    tokens: list = field(default_factory=list)  # (t, ActionTokens)
    actions: list = field(default_factory=list)  # (t, ArmAction)
    targets: list = field(default_factory=list)  # (t, xyz) commanded target pose
    executed: list = field(default_factory=list)  # (t, xyz) measured ee pose
    frames: list = field(default_factory=list)  # (t, annotated RGB image)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rt2-demo", description="Run one simulated rt2_ros episode and report it.")
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help=f"default: {DEFAULT_INSTRUCTION!r}")
    p.add_argument("--params", "--backend-params", dest="params", action="append", default=[],
                   help="ROS 2 params YAML; repeat to layer files (default: the installed config/rt2.yaml), "
                        "e.g. --params config/rt2.yaml --params config/backends/grpc.yaml")
    p.add_argument("--backend", default="", help="override backend.type (e.g. grpc with rt2-serve running)")
    p.add_argument("--timeout", type=float, default=150.0, help="give up after this many seconds (default 150)")
    p.add_argument("--out", default="episodes", help="folder for episode folders (default ./episodes)")
    p.add_argument("--seed", type=int, default=None, help="object placement seed (default: params file)")
    p.add_argument("--ros-domain", type=int, default=87, help="ROS_DOMAIN_ID for the demo (default 87)")
    p.add_argument("--gif-fps", type=float, default=5.0, help="frames per second kept for camera.gif")
    return p.parse_args(argv)


def _task_success(sim, instruction: str) -> tuple[bool, str]:
    """Ground truth from the simulator: the named cube is in the tray (or lifted, if no tray asked)."""
    from rt2_ros.backends.embedded import InstructionNotUnderstood, parse_instruction

    try:
        task = parse_instruction(instruction)
    except InstructionNotUnderstood as exc:
        return False, f"instruction not understood: {exc}"
    name = f"{task.color}_cube"
    positions = sim.object_positions()
    if name not in positions:
        return False, f"no {name} cube in the scene"
    if task.place_in_tray:
        ok = sim.is_in_tray(name)
        return ok, f"{name} cube {'is' if ok else 'is not'} in the tray"
    z = float(positions[name][2])
    ok = z > 0.08
    return ok, f"{name} cube centre at z={z:.3f} m ({'lifted' if ok else 'not lifted'})"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from rt2_ros.nodes.bringup import ParamsFileError, default_params_file, load_params_file

    params_paths = [Path(p) for p in args.params] or [default_params_file()]
    try:
        for path in params_paths:
            load_params_file(path)
    except ParamsFileError as exc:
        print(f"rt2-demo: {exc}", file=sys.stderr)
        return 2

    os.environ["ROS_DOMAIN_ID"] = str(args.ros_domain)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    run_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    bringup_log = run_dir / "bringup.log"
    cmd = [sys.executable, "-m", "rt2_ros.nodes.bringup"]
    for path in params_paths:
        cmd += ["--params", str(path)]
    if args.backend:
        cmd += ["--backend", args.backend]
    print(f"rt2-demo: starting policy + safety nodes ({', '.join(p.name for p in params_paths)}), simulator in "
          "this process; "
          f"ROS_DOMAIN_ID={args.ros_domain}, localhost only", flush=True)
    with open(bringup_log, "w") as log_fh:
        bringup = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        return _run_episode(args, params_paths, run_dir, bringup, bringup_log)
    finally:
        if bringup.poll() is None:
            bringup.send_signal(2)
            try:
                bringup.wait(10)
            except subprocess.TimeoutExpired:
                bringup.kill()


def _run_episode(args, params_paths: list[Path], run_dir: Path, bringup: subprocess.Popen, bringup_log: Path) -> int:
    import rclpy
    from geometry_msgs.msg import PoseStamped
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import qos_profile_sensor_data
    from std_msgs.msg import String

    from rt2_ros.nodes.common import ACTION_QOS, COMMAND_QOS, LATCHED_QOS
    from rt2_ros.nodes.sim_node import SimNode
    from rt2_ros.params import ConfigError
    from rt2_ros_interfaces.msg import ActionTokens, ArmAction, SafetyStatus

    rclpy.init(args=["--ros-args", *(a for p in params_paths for a in ("--params-file", str(p)))])
    log = EpisodeLog()
    lock = threading.Lock()
    try:
        overrides = [Parameter("sim_node.seed", value=args.seed)] if args.seed is not None else []
        sim_node = SimNode(parameter_overrides=overrides)
    except ConfigError as exc:
        print(f"rt2-demo: configuration error: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    monitor = rclpy.create_node("rt2_demo")

    def rec(bucket: str):
        def cb(msg) -> None:
            with lock:
                getattr(log, bucket).append((time.monotonic(), msg))
        return cb

    def rec_pose(bucket: str):
        def cb(msg: PoseStamped) -> None:
            p = msg.pose.position
            with lock:
                getattr(log, bucket).append((time.monotonic(), (p.x, p.y, p.z)))
        return cb

    monitor.create_subscription(SafetyStatus, "/rt2_safety/status", rec("statuses"), LATCHED_QOS)
    monitor.create_subscription(ActionTokens, "/rt2_policy/action_tokens", rec("tokens"), 50)
    monitor.create_subscription(ArmAction, "/arm_action", rec("actions"), ACTION_QOS)
    monitor.create_subscription(PoseStamped, "/target_pose", rec_pose("targets"), COMMAND_QOS)
    monitor.create_subscription(PoseStamped, "/ee_pose", rec_pose("executed"), qos_profile_sensor_data)
    instruction_pub = monitor.create_publisher(String, "/instruction", LATCHED_QOS)

    executor = MultiThreadedExecutor(num_threads=3)
    executor.add_node(sim_node)
    executor.add_node(monitor)
    spin_thread = threading.Thread(target=executor.spin, daemon=True)
    spin_thread.start()

    def latest_status():
        with lock:
            return log.statuses[-1][1] if log.statuses else None

    def grab_frame(step_text: str) -> None:
        frame = sim_node.latest_frame
        if frame is not None:
            with lock:
                log.frames.append((time.monotonic(), _annotate(frame, step_text)))

    try:
        deadline = time.monotonic() + 60.0
        while not (latest_status() is not None and instruction_pub.get_subscription_count() >= 2):
            if bringup.poll() is not None:
                print(f"rt2-demo: the policy/safety process exited (code {bringup.returncode}):\n"
                      f"{bringup_log.read_text()[-2000:]}", file=sys.stderr)
                return 2
            if time.monotonic() > deadline:
                print(f"rt2-demo: nodes did not come up within 60 s; see {bringup_log}", file=sys.stderr)
                return 2
            time.sleep(0.1)
        time.sleep(1.0)  # let camera frames and poses flow before the episode starts
        log.t0 = time.monotonic()
        instruction_pub.publish(String(data=args.instruction))
        print(f"rt2-demo: instruction {args.instruction!r}", flush=True)

        end_reason = "timeout"
        next_print = next_frame = log.t0
        while time.monotonic() - log.t0 < args.timeout:
            now = time.monotonic()
            s = latest_status()
            with lock:
                n_actions = len(log.actions)
                last_tokens = log.tokens[-1][1] if log.tokens else None
            phase = last_tokens.plan if last_tokens is not None and last_tokens.plan else "-"
            line = (f"t={now - log.t0:5.1f}s step={n_actions:4d} phase={phase[:40]:40s} "
                    f"latency={(last_tokens.latency_s * 1000 if last_tokens else float('nan')):5.0f}ms "
                    f"safety={s.state_name if s else '?'}")
            if now >= next_frame:
                grab_frame(line)
                next_frame += 1.0 / args.gif_fps
            if now >= next_print:
                print(line, flush=True)
                next_print += 1.0
            if s is not None and s.episode_id >= 1 and s.instruction == args.instruction.strip():
                if s.state == SafetyStatus.TERMINATED:
                    end_reason = "terminated"
                    break
                if s.state == SafetyStatus.ESTOPPED:
                    end_reason = "estopped"
                    break
            if bringup.poll() is not None:
                end_reason = f"policy/safety process exited ({bringup.returncode})"
                break
            time.sleep(0.02)
        wall = time.monotonic() - log.t0
        settle_end = time.monotonic() + 1.5  # let a released cube come to rest before judging
        while time.monotonic() < settle_end:
            grab_frame(f"t={time.monotonic() - log.t0:5.1f}s episode ended: {end_reason}")
            time.sleep(1.0 / args.gif_fps)
        success, verdict = _task_success(sim_node.sim, args.instruction)
        success = success and end_reason == "terminated"
        summary = _summary(log, args, params_paths, wall, end_reason, success, verdict, latest_status())
        _write_outputs(run_dir, log, summary, sim_node)
        print(f"rt2-demo: {'SUCCESS' if success else 'FAILED'}: {verdict}; episode {end_reason} after "
              f"{wall:.1f} s, {summary['steps']} steps at {summary['control_rate_hz']:.1f} Hz, latency p50 "
              f"{summary['latency_ms']['p50']:.0f} ms / p95 {summary['latency_ms']['p95']:.0f} ms", flush=True)
        print(f"rt2-demo: wrote {run_dir}/ (camera.gif, path.png, summary.json, bringup.log)", flush=True)
        return 0 if success else 1
    finally:
        executor.shutdown(timeout_sec=2.0)
        sim_node.close()
        sim_node.destroy_node()
        monitor.destroy_node()
        rclpy.try_shutdown()


def _annotate(frame: np.ndarray, text: str) -> np.ndarray:
    import cv2

    scale = max(1, 448 // frame.shape[1])
    img = cv2.resize(frame, (frame.shape[1] * scale, frame.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    img = np.ascontiguousarray(img)
    words = text.split()
    lines = [" ".join(words[:2]), " ".join(w for w in words[2:] if not w.startswith("latency"))[:60],
             " ".join(w for w in words if w.startswith(("latency", "safety")))]
    for i, line in enumerate(lines):
        cv2.putText(img, line, (6, 16 + 16 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(img, line, (6, 16 + 16 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p95": math.nan, "max": math.nan}
    arr = np.asarray(values) * 1000.0
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)), "max": float(arr.max())}


def _summary(log: EpisodeLog, args, params_paths: list[Path], wall: float, end_reason: str, success: bool, verdict: str,
             status) -> dict:
    times = [t for t, _ in log.actions]
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
    latencies = [m.latency_s for _, m in log.tokens if math.isfinite(m.latency_s)]
    return {
        "instruction": args.instruction,
        "success": success,
        "verdict": verdict,
        "end": end_reason,
        "wall_time_s": round(wall, 2),
        "steps": len(log.actions),
        "control_rate_hz": round(rate, 2),
        "replies": len(log.tokens),
        "latency_ms": {k: round(v, 1) for k, v in _percentiles(latencies).items()},
        "safety": None if status is None else {
            "final_state": status.state_name, "actions_accepted": status.actions_accepted,
            "actions_clipped": status.actions_clipped, "actions_rejected": status.actions_rejected,
            "watchdog_trips": status.watchdog_trips, "estops": status.estops},
        "params_files": [str(p) for p in params_paths],
        "backend": log.tokens[-1][1].backend if log.tokens else None,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def _write_outputs(run_dir: Path, log: EpisodeLog, summary: dict, sim_node) -> None:
    import imageio.v2 as imageio

    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if log.frames:
        frames = [f for _, f in log.frames]
        imageio.mimsave(run_dir / "camera.gif", frames, duration=1.0 / 5.0, loop=0)
        imageio.imwrite(run_dir / "frame.png", frames[len(frames) // 2])
    _plot_paths(run_dir / "path.png", log, sim_node)


def _plot_paths(path: Path, log: EpisodeLog, sim_node) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cfg = sim_node.sim.config
    lo, hi = cfg["sim.workspace_min"], cfg["sim.workspace_max"]
    tgt = np.array([p for t, p in log.targets if t >= log.t0]) if log.targets else np.zeros((0, 3))
    exe = np.array([p for t, p in log.executed if t >= log.t0]) if log.executed else np.zeros((0, 3))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, (i, j, name) in zip(axes, [(0, 1, "top view (x, y)"), (0, 2, "side view (x, z)")], strict=True):
        ax.add_patch(Rectangle((lo[i], lo[j]), hi[i] - lo[i], hi[j] - lo[j], fill=False, ec="green", lw=1.5,
                               label="safety workspace"))
        if len(exe):
            ax.plot(exe[:, i], exe[:, j], "-", color="tab:blue", lw=2, label="executed (measured ee_pose)")
        if len(tgt):
            ax.plot(tgt[:, i], tgt[:, j], "--", color="tab:orange", lw=1.2, label="commanded (safe target_pose)")
        for name_obj, pos in sim_node.sim.object_positions().items():
            color = {"red": "red", "green": "green", "blue": "blue", "yellow": "gold"}.get(name_obj.split("_")[0],
                                                                                          "purple")
            ax.plot(pos[i], pos[j], "s", ms=7, color=color)
            ax.annotate(name_obj, (pos[i], pos[j]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("xyz"[i] + " [m]")
        ax.set_ylabel("xyz"[j] + " [m]")
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=7)
    fig.suptitle("rt2-demo: end-effector path (final object positions as squares)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
