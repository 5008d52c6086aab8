"""``rt2-demo``: a closed-loop episode on the simulated Panda, over real ROS 2, with a report.

What runs, as on a robot started with ``ros2 launch`` (launch/rt2.launch.py): one process per
node, talking over DDS — the policy node, the safety node and the simulator node (``rt2_sim``:
arm driver and camera) — plus this process, which only watches (a monitor node). Camera and
ee_pose come from the simulator, arm actions from the policy, MoveIt Servo twists and the
gripper command from the safety node. The demo sends the instruction as an ExecuteInstruction
goal (``/rt2_policy/execute_instruction``, as ``rt2-say --wait`` does), prints progress, and the
goal's result ends the episode (the terminate token, or the time limit ``--timeout``); it
judges the episode from the simulator's ground truth
(``/rt2_sim/objects``) and writes an episode folder: ``camera.gif`` (with a status band under
the image), ``frame.png``, ``path.png`` (commanded vs executed end-effector path in the safety
workspace box), ``summary.json``, ``episode.mcap`` (``rt2-record``: open it in Foxglove, replay
it with ``rt2-replay``) and one log per process. When the simulator publishes its wrist camera
(``sim_node.wrist_camera``, on by default), the GIF and PNG show the fixed camera on the left and
the wrist camera on the right, labelled, with the status under the wrist image, and the recording
holds both image topics.

Why one process per node (measured on a 2-core machine, see docs/sim.md):

* the simulator renders with pybullet, which holds the GIL for the whole frame (13-33 ms); in
  the monitor's process it stalled every other callback there, camera frames and poses
  jittered, and the policy (one request per new frame) fell below its execute rate;
* policy and safety node each spin a single-threaded executor (``run_node``); in one
  ``rt2-bringup`` process they share rclpy's MultiThreadedExecutor, which cost 2.7x the CPU
  (46% vs 17% of a core with no episode running), and on a loaded machine the policy then
  missed execute steps (6.8-9.5 Hz instead of 10).

Safety of the demo itself: it runs on its own ROS domain with discovery restricted to this
machine (``--ros-domain``, default 87), so a simulated episode can never command a real arm
that shares the network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_INSTRUCTION = "pick up the red cube and put it in the tray"
SETTLE_S = 1.5  # after the episode, let a released cube come to rest before judging
STARTUP_TIMEOUT_S = 60.0
# rt2-record prints this once it stored the parameters of every node it asks (rt2_policy, rt2_safety).
RECORDER_PARAMS_STORED = "rt2-record: stored the parameters of"
GIF_MAX_FRAMES = 400  # at 5 fps: 80 s of episode; later frames are thinned to keep camera.gif small
BAND_HEIGHT_PX = 58  # the status band under the camera image in camera.gif
PANEL_GAP_PX = 4  # white gap between the fixed and the wrist camera in camera.gif
WRIST_PANEL_PX = 256  # about this wide, the wrist camera right of the camera image in camera.gif
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("reference", "learned")


@dataclass(frozen=True)
class ObjectState:
    """Ground truth of one object from the simulator's ``~/objects`` markers (base frame, m)."""

    position: tuple[float, float, float]
    in_tray: bool


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
    camera: tuple | None = None  # (t, serialized sensor_msgs/Image) latest frame, decoded only when kept
    wrist: tuple | None = None  # (t, serialized sensor_msgs/Image) latest wrist camera frame, likewise
    objects: tuple | None = None  # (t, {name: ObjectState}) latest ground truth


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rt2-demo", description="Run one simulated rt2_ros episode and report it.")
    p.add_argument("--instruction", default=None,
                   help=f"default: the --scene-seed scene's, else {DEFAULT_INSTRUCTION!r}")
    p.add_argument("--params", "--backend-params", dest="params", action="append", default=[],
                   help="ROS 2 params YAML; repeat to layer files (default: the installed config/rt2.yaml), "
                        "e.g. --params config/rt2.yaml --params config/backends/grpc.yaml")
    p.add_argument("--backend", default="", help="override backend.type (e.g. grpc with rt2-serve running)")
    p.add_argument("--policy", choices=POLICIES, default="reference",
                   help="reference: the params files' backend (default: the embedded reference policy); learned: "
                        "the repo-trained checkpoint (models/rt2-tiny, rt2-train) in the local backend with "
                        "constrained decoding, layered as config/backends/learned.yaml over the params files")
    p.add_argument("--model", default="", help="--policy learned: checkpoint directory (default: the shipped one)")
    p.add_argument("--timeout", type=float, default=150.0, help="give up after this many seconds (default 150)")
    p.add_argument("--out", default="episodes", help="folder for episode folders (default ./episodes)")
    p.add_argument("--seed", type=int, default=None, help="object placement seed (default: params file)")
    p.add_argument("--scene-seed", type=int, default=None,
                   help="run the randomised scene of this rt2-collect / rt2-eval seed (cubes and tray anywhere on the "
                        "table, colours, distractors, lighting, camera pose; its instruction unless --instruction) "
                        "instead of the params files' scene; written to scene.yaml in the episode folder")
    p.add_argument("--ros-domain", type=int, default=87, help="ROS_DOMAIN_ID for the demo (default 87)")
    p.add_argument("--gif-fps", type=float, default=5.0, help="frames per second kept for camera.gif")
    p.add_argument("--no-record", action="store_true", help="do not record episode.mcap (rt2-record)")
    return p.parse_args(argv)


def _task_success(objects: dict[str, ObjectState], instruction: str) -> tuple[bool, str]:
    """Ground truth from the simulator: the named cube is in the tray (or lifted, if no tray asked)."""
    from rt2_ros.backends.embedded import InstructionNotUnderstood, parse_instruction

    try:
        task = parse_instruction(instruction)
    except InstructionNotUnderstood as exc:
        return False, f"instruction not understood: {exc}"
    name = f"{task.color}_cube"
    if name not in objects:
        return False, f"no {name} in the scene"
    if task.place_in_tray:
        ok = objects[name].in_tray
        return ok, f"{name} {'is' if ok else 'is not'} in the tray"
    z = float(objects[name].position[2])
    ok = z > 0.08
    return ok, f"{name} centre at z={z:.3f} m ({'lifted' if ok else 'not lifted'})"


def _node_params(args: argparse.Namespace, params_paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Each node's parameters as it will run with them, checked as the nodes check them (rt2-bringup
    --check: a bad file fails here, not in three child logs); ``args.seed`` becomes the simulator's
    seed when not given (summary.json reports the seed that ran, 0 included)."""
    from rt2_ros.nodes.bringup import check_params

    nodes = check_params(params_paths, backend=args.backend, nodes=("rt2_policy", "rt2_safety", "rt2_sim")).nodes
    if args.seed is None:
        args.seed = nodes["rt2_sim"]["sim_node.seed"]
    return nodes


def _learned_policy(args: argparse.Namespace, params_paths: list[Path]) -> tuple[list[Path], list[str]]:
    """--policy learned: the params files with config/backends/learned.yaml on top, and the policy node's
    model_path override pointing at the checkpoint (the shipped one unless --model) with the prompt_template
    it was trained with."""
    from rt2_ros.learn.evaluate import (
        EvalError,
        check_model_dir,
        checkpoint_prompt_template,
        learned_params_file,
        shipped_model_dir,
    )
    from rt2_ros.params import ConfigError

    if args.backend and args.backend != "local":
        raise ConfigError(f"--policy learned runs the local backend; drop --backend {args.backend}")
    try:
        model = check_model_dir(Path(args.model) if args.model else shipped_model_dir())
        template = checkpoint_prompt_template(model)  # as trained (e.g. with the hand state)
    except EvalError as exc:
        raise ConfigError(str(exc)) from None
    return [*params_paths, learned_params_file()], ["-p", f"backend.local.model_path:={model}",
                                                     "-p", f"backend.local.prompt_template:={json.dumps(template)}"]


def _scene_params(args: argparse.Namespace, run_dir: Path) -> Path:
    """--scene-seed: the scene of rt2_ros.learn.collect.make_scene as a params file (the simulator's sim.* and
    seed; for the embedded reference policy also its camera calibration, as rt2-collect gives it), written to
    run_dir/scene.yaml; fills in --seed and --instruction."""
    import yaml

    from rt2_ros.learn.collect import CollectError, make_scene
    from rt2_ros.params import ConfigError

    if args.seed is not None:
        raise ConfigError("--seed and --scene-seed: give one (the scene seed is the simulator's seed)")
    try:
        scene = make_scene(args.scene_seed)
    except CollectError as exc:
        raise ConfigError(f"--scene-seed: {exc}") from None
    args.seed = scene.seed
    args.instruction = args.instruction or scene.instruction

    def nested(flat: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in flat.items():
            *parents, leaf = key.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = list(value) if isinstance(value, (list, tuple)) else value
        return out

    nodes: dict[str, Any] = {"rt2_sim": {"ros__parameters": nested({**scene.sim_config,
                                                                    "sim_node.seed": scene.seed})}}
    if args.policy == "reference" and args.backend in ("", "embedded"):
        embedded = {f"backend.embedded.{k}": v for k, v in scene.reference_options.items()}
        if embedded:
            nodes["rt2_policy"] = {"ros__parameters": nested(embedded)}
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "scene.yaml"
    header = f"# rt2-demo --scene-seed {scene.seed}: {scene.instruction!r} (rt2_ros.learn.collect.make_scene)\n"
    path.write_text(header + yaml.safe_dump(nodes, sort_keys=False))
    return path


def _child_env() -> dict[str, str]:
    # The children import rt2_ros from the same place this process did (installed or source tree).
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONUNBUFFERED="1",
                PYTHONPATH=str(_PACKAGE_ROOT) + (os.pathsep + path if path else ""))


def _stop_all(procs: list[subprocess.Popen], timeout_s: float = 5.0) -> None:
    """SIGINT (the nodes' clean Ctrl-C path: the safety node sends a last zero twist), then SIGTERM
    (a child started from a non-interactive shell may have inherited an ignored SIGINT), then kill."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            return
        for p in alive:
            p.send_signal(sig)
        deadline = time.monotonic() + timeout_s
        for p in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from rt2_ros.nodes.bringup import ParamsFileError, default_params_file
    from rt2_ros.params import ConfigError

    started = time.monotonic()
    params_paths = [Path(p) for p in args.params] or [default_params_file()]
    policy_overrides = ["-p", f"backend.type:={args.backend}"] if args.backend else []
    run_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    try:
        if args.policy == "learned":
            params_paths, model_override = _learned_policy(args, params_paths)
            policy_overrides += model_override
        elif args.model:
            raise ConfigError("--model: only with --policy learned")
        if args.scene_seed is not None:
            params_paths = [*params_paths, _scene_params(args, run_dir)]
        args.instruction = args.instruction or DEFAULT_INSTRUCTION
        node_params = _node_params(args, params_paths)
    except (ParamsFileError, ConfigError) as exc:
        print(f"rt2-demo: {exc}", file=sys.stderr)
        return 2

    os.environ["ROS_DOMAIN_ID"] = str(args.ros_domain)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    run_dir.mkdir(parents=True, exist_ok=True)
    params_args = [a for p in params_paths for a in ("--params-file", str(p))]
    sim_overrides = ["-p", f"sim_node.seed:={args.seed}"] if args.seed is not None else []
    commands = {
        "policy": [sys.executable, "-m", "rt2_ros.nodes.policy_node", "--ros-args", *params_args, *policy_overrides],
        "safety": [sys.executable, "-m", "rt2_ros.nodes.safety_node", "--ros-args", *params_args],
        "sim": [sys.executable, "-m", "rt2_ros.nodes.sim_node", "--ros-args", *params_args, *sim_overrides],
    }
    if not args.no_record:  # the same recorder a real robot run uses; 2 camera frames/s keep the file small
        commands["record"] = [sys.executable, "-m", "rt2_ros.nodes.record", "--out", str(run_dir / "episode.mcap"),
                              "--image-rate", "2"]
    print(f"rt2-demo: starting the policy, safety and simulator nodes ({', '.join(p.name for p in params_paths)}); "
          f"ROS_DOMAIN_ID={args.ros_domain}, localhost only", flush=True)
    children: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        for name, cmd in commands.items():
            log_path = run_dir / f"{name}.log"
            with open(log_path, "w") as log_fh:
                proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=_child_env())
            children[name] = (proc, log_path)
        return _run_episode(args, params_paths, node_params, run_dir, children, started)
    except KeyboardInterrupt:
        print("rt2-demo: interrupted; stopping the nodes", file=sys.stderr)
        return 130
    finally:
        _stop_all([proc for proc, _ in children.values()])


def _run_episode(args, params_paths: list[Path], node_params: dict, run_dir: Path,
                 children: dict[str, tuple[subprocess.Popen, Path]], started: float) -> int:
    import rclpy
    from geometry_msgs.msg import PoseStamped
    from rclpy.action import ActionClient
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from visualization_msgs.msg import MarkerArray

    from rt2_ros.episode import NO_EPISODE, short_id, uuid_bytes
    from rt2_ros.nodes.common import ACTION_QOS, COMMAND_QOS
    from rt2_ros_interfaces.action import ExecuteInstruction
    from rt2_ros_interfaces.msg import ActionTokens, ArmAction, SafetyStatus

    rclpy.init(args=[])
    log = EpisodeLog()
    lock = threading.Lock()
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

    def on_camera(data: bytes) -> None:  # raw: decoded only for the frames the GIF keeps
        with lock:
            log.camera = (time.monotonic(), data)

    def on_wrist(data: bytes) -> None:
        with lock:
            log.wrist = (time.monotonic(), data)

    def on_objects(msg: MarkerArray) -> None:
        objects = {m.ns: ObjectState((m.pose.position.x, m.pose.position.y, m.pose.position.z), m.text == "in_tray")
                   for m in msg.markers}
        with lock:
            log.objects = (time.monotonic(), objects)

    # Latched like the publisher, but deeper: the TERMINATED status of the episode and the IDLE
    # one that follows when the policy ends it arrive back to back, and both are kept.
    status_qos = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)
    monitor.create_subscription(SafetyStatus, "/rt2_safety/status", rec("statuses"), status_qos)
    monitor.create_subscription(ActionTokens, "/rt2_policy/action_tokens", rec("tokens"), 50)
    monitor.create_subscription(ArmAction, "/arm_action", rec("actions"), ACTION_QOS)
    monitor.create_subscription(PoseStamped, "/target_pose", rec_pose("targets"), COMMAND_QOS)
    monitor.create_subscription(PoseStamped, "/ee_pose", rec_pose("executed"), qos_profile_sensor_data)
    monitor.create_subscription(Image, "/camera/image", on_camera, qos_profile_sensor_data, raw=True)
    wrist = bool(node_params["rt2_sim"]["sim_node.wrist_camera"])  # then every GIF frame shows both cameras
    if wrist:
        monitor.create_subscription(Image, "/wrist_camera/image", on_wrist, qos_profile_sensor_data, raw=True)
    monitor.create_subscription(MarkerArray, "/rt2_sim/objects", on_objects, 10)
    client = ActionClient(monitor, ExecuteInstruction, "/rt2_policy/execute_instruction")
    feedback: dict[str, Any] = {}  # the latest ExecuteInstruction feedback

    def on_feedback(msg) -> None:
        with lock:
            feedback["last"] = msg.feedback

    # The monitor's callbacks are list appends: one thread is plenty (no executor thread pool).
    executor = SingleThreadedExecutor()
    executor.add_node(monitor)
    spin_thread = threading.Thread(target=executor.spin, daemon=True)
    spin_thread.start()

    def latest_status():
        with lock:
            return log.statuses[-1][1] if log.statuses else None

    def episode_status(episode_id: bytes):
        """The safety node's last status naming the episode (its state when the episode ended)."""
        with lock:
            named = [m for _, m in log.statuses if uuid_bytes(m.episode_id) == episode_id]
        return named[-1] if named else None

    def subscribed(topic: str, node_name: str) -> bool:
        return any(i.node_name == node_name for i in monitor.get_subscriptions_info_by_topic(topic))

    def params_recorded() -> bool:
        # rt2-record stored both nodes' parameters: the recording says what produced it.
        return "record" not in children or RECORDER_PARAMS_STORED in children["record"][1].read_text()

    def ready() -> bool:
        # The safety node is active (its latched status says so) and follows the episodes; the
        # policy node is configured (it follows the status) and serves goals (it autostarts to
        # active before it spins, so a goal never meets an inactive node); camera frames, poses and
        # ground truth flow to every node that needs them; the recorder holds the nodes' parameters.
        s = latest_status()
        return (s is not None and s.state != SafetyStatus.INACTIVE and client.server_is_ready() and params_recorded()
                and subscribed("/episode", "rt2_safety") and subscribed("/rt2_safety/status", "rt2_policy")
                and log.camera is not None and (log.wrist is not None or not wrist)
                and log.objects is not None and bool(log.executed)
                and monitor.count_subscribers("/ee_pose") >= 3 and monitor.count_subscribers("/camera/image") >= 2)

    def exited() -> str:
        for name, (proc, log_path) in children.items():
            if proc.poll() is not None:
                return (f"the {name} process exited (code {proc.returncode}); its log {log_path}:\n"
                        f"{log_path.read_text()[-2000:]}")
        return ""

    def grab_frame(status: dict[str, str]) -> None:
        with lock:
            camera, wrist_frame = log.camera, log.wrist
        if camera is not None and (wrist_frame is not None or not wrist):
            frame = _annotate(_decode_image(camera[1]), status,
                              _decode_image(wrist_frame[1]) if wrist_frame is not None else None)
            with lock:
                log.frames.append((time.monotonic(), frame))

    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not ready():
            problem = exited()
            if problem:
                print(f"rt2-demo: {problem}", file=sys.stderr)
                return 2
            if time.monotonic() > deadline:
                what = "rt2-record did not store the nodes' parameters" if latest_status() is not None \
                    and not params_recorded() else "the nodes did not come up"
                print(f"rt2-demo: {what} within {STARTUP_TIMEOUT_S:.0f} s; see "
                      f"{', '.join(str(p) for _, p in children.values())}", file=sys.stderr)
                return 2
            time.sleep(0.05)
        time.sleep(0.3)  # discovery is two-way: let the nodes' subscriptions see the publishers too
        log.t0 = time.monotonic()
        # The node's time limit ends the episode (result TIME_LIMIT); the demo waits a little longer.
        goal = ExecuteInstruction.Goal(instruction=args.instruction, time_limit_s=float(args.timeout))
        send = client.send_goal_async(goal, feedback_callback=on_feedback)
        while not send.done() and time.monotonic() - log.t0 < 10.0:
            time.sleep(0.02)
        handle = send.result() if send.done() else None
        if handle is None or not handle.accepted:
            print(f"rt2-demo: the policy node {'rejected' if handle is not None else 'did not answer'} the goal; "
                  f"see {children['policy'][1]}", file=sys.stderr)
            return 2
        result_future = handle.get_result_async()
        print(f"rt2-demo: instruction {args.instruction!r} (nodes up after {log.t0 - started:.1f} s)", flush=True)

        end_reason, result, fb = "timeout", None, None
        next_print = next_frame = log.t0
        while time.monotonic() - log.t0 < args.timeout + 5.0:
            now = time.monotonic()
            s = latest_status()
            with lock:
                n_actions = len(log.actions)
                last_tokens = log.tokens[-1][1] if log.tokens else None
                fb = feedback.get("last")
            status = {"t": f"{now - log.t0:5.1f} s", "step": f"{n_actions}",
                      "phase": last_tokens.plan if last_tokens is not None and last_tokens.plan else
                      fb.phase if fb is not None else "-",
                      "latency": f"{last_tokens.latency_s * 1000:.0f} ms" if last_tokens else "-",
                      "safety": s.state_name if s else "?"}
            if now >= next_frame:
                grab_frame(status)
                next_frame += 1.0 / args.gif_fps
            if now >= next_print:
                print(f"t={status['t']} step={n_actions:4d} phase={status['phase'][:40]:40s} "
                      f"latency={status['latency']:>7s} safety={status['safety']}", flush=True)
                next_print += 1.0
            if result_future.done():
                result = result_future.result().result
                end_reason = result.outcome_name.lower() or "ended"
                if result.message and result.outcome != ExecuteInstruction.Result.TERMINATED:
                    print(f"rt2-demo: episode {end_reason}: {result.message}", file=sys.stderr)
                break
            problem = exited()
            if problem:
                end_reason = problem.splitlines()[0]
                print(f"rt2-demo: {problem}", file=sys.stderr)
                break
            time.sleep(0.02)
        if result is None and not exited():
            handle.cancel_goal_async()  # the arm holds; the nodes stop right after the report anyway
        wall = time.monotonic() - log.t0
        settle_end = time.monotonic() + SETTLE_S
        while time.monotonic() < settle_end:
            s = latest_status()
            grab_frame({"t": f"{time.monotonic() - log.t0:5.1f} s", "step": f"{len(log.actions)}",
                        "phase": f"episode ended: {end_reason}", "latency": "-", "safety": s.state_name if s else "?"})
            time.sleep(1.0 / args.gif_fps)
        objects = _fresh_objects(log, lock, after=settle_end, timeout_s=3.0)
        if objects is None:
            success, verdict = False, "no ground truth from the simulator (/rt2_sim/objects)"
            objects = {}
        else:
            success, verdict = _task_success(objects, args.instruction)
        success = success and end_reason == "terminated"
        episode_id = uuid_bytes(result.episode_id) if result is not None else \
            uuid_bytes(fb.episode_id) if fb is not None else NO_EPISODE
        summary = _summary(log, args, params_paths, wall, end_reason, success, verdict,
                           episode_status(episode_id) or latest_status())
        summary["episode_id"] = short_id(episode_id)
        summary["outcome_message"] = result.message if result is not None else ""
        _write_outputs(run_dir, log, objects, _workspace(node_params))
        summary["total_wall_time_s"] = round(time.monotonic() - started, 2)  # start-up to outputs written
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"rt2-demo: {'SUCCESS' if success else 'FAILED'}: {verdict}; episode {summary['episode_id']} "
              f"{end_reason} after "
              f"{wall:.1f} s, {summary['steps']} steps at {summary['control_rate_hz']:.1f} Hz, latency p50 "
              f"{summary['latency_ms']['p50']:.0f} ms / p95 {summary['latency_ms']['p95']:.0f} ms, reply -> action "
              f"p50 {summary['reply_to_action_ms']['p50']:.1f} ms / p95 {summary['reply_to_action_ms']['p95']:.1f} ms, "
              f"action age p50 {summary['action_age_ms']['p50']:.0f} ms", flush=True)
        recorded = "" if args.no_record else ", episode.mcap"
        print(f"rt2-demo: wrote {run_dir}/ (camera.gif, path.png, summary.json{recorded}, *.log)", flush=True)
        return 0 if success else 1
    finally:
        executor.shutdown(timeout_sec=2.0)
        spin_thread.join(5.0)  # out of rclpy's wait before the node and context go (tools/soak.py: an abort at exit)
        monitor.destroy_node()
        rclpy.try_shutdown()


def _fresh_objects(log: EpisodeLog, lock: threading.Lock, after: float, timeout_s: float
                   ) -> dict[str, ObjectState] | None:
    """The simulator's ground truth as published after ``after`` (it publishes at 2 Hz)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with lock:
            objects = log.objects
        if objects is not None and objects[0] >= after:
            return objects[1]
        time.sleep(0.05)
    return None


def _workspace(node_params: dict[str, dict[str, Any]]) -> tuple[list[float], list[float]]:
    """The safety workspace box the safety node runs with (checked params: files over the code defaults)."""
    safety = node_params["rt2_safety"]
    return safety["safety.workspace_min"], safety["safety.workspace_max"]


def _decode_image(data: bytes) -> np.ndarray:
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import Image

    from rt2_ros.nodes.common import image_msg_to_rgb

    return image_msg_to_rgb(deserialize_message(data, Image))


def _annotate(frame: np.ndarray, status: dict[str, str], wrist: np.ndarray | None = None) -> np.ndarray:
    """One GIF frame: the camera image scaled to about 448 px wide, and the status (time and step,
    the phase, i.e. the policy's plan text, latency and safety state).

    Without ``wrist``: the status in three lines on a white band under the image. With it: the
    wrist camera (scaled to about 256 px wide, by a whole factor if it is smaller) to the right of
    the camera image, both labelled, and the status in the white space under the wrist image.
    Rejected: the wrist image at the camera image's full height; at 3.5x its 128 px, its moving
    table texture made the GIF 6x larger (1.7 MB instead of 0.3 MB for a 12 s episode) for no
    more detail (now 0.9 MB).
    """
    import cv2

    scale = max(1, round(448 / frame.shape[1]))
    img = cv2.resize(frame, (frame.shape[1] * scale, frame.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    font, size = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    if wrist is None:
        width = img.shape[1]
        band = np.full((BAND_HEIGHT_PX, width, 3), 255, dtype=np.uint8)
        phase = status.get("phase", "-")
        max_chars = max(10, int(width / 8.2) - 7)  # ~8 px per character at this font size
        if len(phase) > max_chars:
            phase = phase[:max_chars - 3] + "..."
        lines = [f"t = {status.get('t', '-').strip()}    step {status.get('step', '-')}",
                 f"phase: {phase}",
                 f"latency {status.get('latency', '-')}    safety {status.get('safety', '?')}"]
        for i, line in enumerate(lines):
            cv2.putText(band, line, (8, 16 + 18 * i), font, size, (0, 0, 0), 1, cv2.LINE_AA)
        return np.ascontiguousarray(np.concatenate([img, band], axis=0))

    import textwrap

    height = img.shape[0]
    wscale = WRIST_PANEL_PX / wrist.shape[1]
    if wscale >= 1.0:  # a whole factor keeps the pixels square and sharp
        wscale = round(wscale)
    wsize = (max(1, round(wrist.shape[1] * wscale)), max(1, round(wrist.shape[0] * wscale)))
    side = cv2.resize(wrist, wsize, interpolation=cv2.INTER_NEAREST if wscale >= 1.0 else cv2.INTER_AREA)
    side = _label(side[:height], "wrist camera")
    column = np.full((height, side.shape[1], 3), 255, dtype=np.uint8)
    column[:side.shape[0]] = side
    max_chars = max(10, int(side.shape[1] / 8.2) - 2)
    lines = [f"t = {status.get('t', '-').strip()}    step {status.get('step', '-')}", "phase:"]
    lines += [f"  {line}" for line in textwrap.wrap(status.get("phase", "-"), max_chars - 2, max_lines=4,
                                                    placeholder="...")]
    lines += [f"latency {status.get('latency', '-')}", f"safety {status.get('safety', '?')}"]
    y = side.shape[0] + 22
    for line in lines:
        if y > height - 4:
            break  # a wrist image almost as tall as the camera image leaves room for fewer lines
        cv2.putText(column, line, (8, y), font, size, (0, 0, 0), 1, cv2.LINE_AA)
        y += 18
    gap = np.full((height, PANEL_GAP_PX, 3), 255, dtype=np.uint8)
    return np.ascontiguousarray(np.concatenate([_label(img, "camera"), gap, column], axis=1))


def _label(img: np.ndarray, text: str) -> np.ndarray:
    """``img`` with ``text`` in white on a dark box in its top-left corner."""
    import cv2

    out = np.ascontiguousarray(img).copy()
    font, size = cv2.FONT_HERSHEY_SIMPLEX, 0.5
    (w, h), base = cv2.getTextSize(text, font, size, 1)
    cv2.rectangle(out, (0, 0), (w + 12, h + base + 10), (40, 40, 40), thickness=-1)
    cv2.putText(out, text, (6, h + 5), font, size, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p95": math.nan, "max": math.nan}
    arr = np.asarray(values) * 1000.0
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)), "max": float(arr.max())}


def _summary(log: EpisodeLog, args, params_paths: list[Path], wall: float, end_reason: str, success: bool, verdict: str,
             status) -> dict:
    # The policy's action rate by the actions' own stamps (set when the policy node publishes), so
    # DDS delivery jitter at this monitor does not count as policy jitter.
    times = [m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for _, m in log.actions]
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
    intervals = np.diff(times).tolist() if len(times) > 1 else []
    latencies = [m.latency_s for _, m in log.tokens if math.isfinite(m.latency_s)]
    # Reply -> execution inside the policy node: ~/action_tokens is published when a reply is handled,
    # arm_action when its action is released; both stamped by the policy node's clock, paired by seq.
    def sec(stamp) -> float:
        return stamp.sec + stamp.nanosec * 1e-9

    replied = {m.observation_seq: sec(m.header.stamp) for _, m in log.tokens}
    reply_to_action = [sec(m.header.stamp) - replied[m.observation_seq] for _, m in log.actions
                       if m.observation_seq in replied]
    action_age = [sec(m.header.stamp) - sec(m.observation_stamp) for _, m in log.actions
                  if sec(m.observation_stamp) > 0]
    return {
        "instruction": args.instruction,
        "seed": args.seed,
        "success": success,
        "verdict": verdict,
        "end": end_reason,
        "wall_time_s": round(wall, 2),
        "steps": len(log.actions),
        "control_rate_hz": round(rate, 2),
        "action_interval_ms": {k: round(v, 1) for k, v in _percentiles(intervals).items()},
        "replies": len(log.tokens),
        "latency_ms": {k: round(v, 1) for k, v in _percentiles(latencies).items()},
        "reply_to_action_ms": {k: round(v, 1) for k, v in _percentiles(reply_to_action).items()},
        "action_age_ms": {k: round(v, 1) for k, v in _percentiles(action_age).items()},
        # The safety node's last status naming the episode: its state when the episode ended
        # (afterwards the node is IDLE again), counters since the node started.
        "safety": None if status is None else {
            "final_state": status.state_name, "actions_accepted": status.actions_accepted,
            "actions_clipped": status.actions_clipped, "actions_rejected": status.actions_rejected,
            "watchdog_trips": status.watchdog_trips, "estops": status.estops, "faults": status.faults,
            "dropped": dict(zip(status.drop_causes, (int(n) for n in status.drop_counts), strict=False))},
        "params_files": [str(p) for p in params_paths],
        "backend": log.tokens[-1][1].backend if log.tokens else None,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def _write_outputs(run_dir: Path, log: EpisodeLog, objects: dict[str, ObjectState],
                   workspace: tuple[list[float], list[float]]) -> None:
    if log.frames:
        frames = [f for _, f in log.frames]
        _write_gif(run_dir / "camera.gif", frames, fps=5.0)
        import imageio.v2 as imageio

        imageio.imwrite(run_dir / "frame.png", frames[len(frames) // 2])
    _plot_paths(run_dir / "path.png", log, objects, workspace)


def _write_gif(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """An animated GIF that stores, per frame, only the pixels that changed.

    All frames share one palette (from a few frames spread over the episode; the scene changes
    little), so a pixel that did not change keeps its palette index exactly; those pixels become
    the transparent index and the frame is drawn over the previous one (disposal 1). Long runs of
    one index are what GIF's LZW compresses well: a few KB a frame instead of ~30 KB, with no further loss
    (every frame decodes to its quantised image exactly).
    """
    from PIL import Image as PILImage

    if len(frames) > GIF_MAX_FRAMES:  # very long episodes: keep the GIF small, play it faster
        keep = np.linspace(0, len(frames) - 1, GIF_MAX_FRAMES).round().astype(int)
        frames = [frames[i] for i in keep]
    colors = 255  # index 255 is reserved for "unchanged"
    picks = np.linspace(0, len(frames) - 1, min(6, len(frames))).astype(int)
    quantizer = PILImage.fromarray(np.concatenate([frames[i] for i in picks])).quantize(
        colors=colors, method=PILImage.Quantize.FASTOCTREE)
    palette = (quantizer.getpalette() or [])[:3 * colors]
    palette += [0] * (3 * colors - len(palette)) + [255, 0, 255]  # the transparent slot (never shown)
    indexed = [np.asarray(PILImage.fromarray(f).quantize(palette=quantizer, dither=PILImage.Dither.NONE))
               for f in frames]
    images = []
    for k, idx in enumerate(indexed):
        out = idx.copy()
        if k:
            out[idx == indexed[k - 1]] = colors
        image = PILImage.fromarray(out.astype(np.uint8), mode="P")
        image.putpalette(palette)
        images.append(image)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000.0 / fps), loop=0,
                   transparency=colors, disposal=1, optimize=False)


def _plot_paths(path: Path, log: EpisodeLog, objects: dict[str, ObjectState],
                workspace: tuple[list[float], list[float]]) -> None:
    import matplotlib.pyplot as plt

    fig = _path_figure(log, objects, workspace)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _path_figure(log: EpisodeLog, objects: dict[str, ObjectState], workspace: tuple[list[float], list[float]]):
    """path.png: top and side view of the commanded and executed end-effector path in the workspace box,
    the final object positions as markers named in a legend under both views."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    lo, hi = workspace
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
        # Objects are named in the legend, not by text next to them: cubes in or next to the tray sit
        # within a centimetre of each other (and at one height in the side view), so labels collided.
        for name_obj, state in sorted(objects.items()):
            pos = state.position
            color = {"red": "red", "green": "green", "blue": "blue", "yellow": "gold"}.get(name_obj.split("_")[0],
                                                                                          "purple")
            tray = not name_obj.endswith("_cube")
            ax.plot(pos[i], pos[j], "D" if tray else "s", ms=11 if tray else 7, color=color,
                    mfc="none" if tray else color, mew=2 if tray else 1, label=name_obj.replace("_", " "),
                    zorder=2 if tray else 3)
        ax.set_xlabel("xyz"[i] + " [m]")
        ax.set_ylabel("xyz"[j] + " [m]")
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("rt2-demo: end-effector path and final object positions")
    fig.tight_layout(rect=(0.0, 0.12, 1.0, 1.0))  # room for the legend under both views
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
