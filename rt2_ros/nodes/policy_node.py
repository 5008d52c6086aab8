"""ROS 2 policy node: camera + instruction in, validated arm actions out.

Subscribes ``camera/image`` (sensor_msgs/Image) or ``camera/image/compressed``
(sensor_msgs/CompressedImage) with sensor-data QoS, ``instruction`` (std_msgs/String, reliable +
transient-local so a late-joining node still gets the current instruction) and optionally
``ee_pose`` (geometry_msgs/PoseStamped). Publishes ``arm_action`` (rt2_ros_interfaces/ArmAction),
``~/action_tokens`` (rt2_ros_interfaces/ActionTokens), ``~/plan`` (std_msgs/String) and
``/diagnostics``. All timing rules live in :mod:`rt2_ros.policy`; the backend call runs on a worker
thread so the executor never blocks.
"""

from __future__ import annotations

import math
import queue
import time
from concurrent.futures import ThreadPoolExecutor

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from rt2_ros.actions import ArmAction
from rt2_ros.backends import BACKENDS, BackendConfigError, backend_class, create_backend
from rt2_ros.backends.base import Backend
from rt2_ros.nodes.common import (
    ACTION_QOS,
    LATCHED_QOS,
    ImageConversionError,
    compressed_msg_to_rgb,
    declare_and_read,
    image_msg_to_rgb,
    reject_unknown_overrides,
    run_node,
    stamp_to_sec,
)
from rt2_ros.params import ConfigError, ParamSpec
from rt2_ros.policy import POLICY_PARAMS, PolicyConfig, PolicyCore, ReplyOutcome
from rt2_ros.tokens import TOKENIZER_PARAMS, ActionTokenizer
from rt2_ros_interfaces.msg import ActionTokens
from rt2_ros_interfaces.msg import ArmAction as ArmActionMsg

NODE_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("camera.transport", "string", "raw", "Subscribe to camera/image (raw) or camera/image/compressed",
              choices=("raw", "compressed")),
    ParamSpec("camera.qos", "string", "sensor_data",
              "Camera subscription QoS: sensor_data (best effort, matches any publisher) or reliable (only "
              "reliable publishers; large raw frames that best effort loses on FastDDS arrive)",
              choices=("sensor_data", "reliable")),
    ParamSpec("diagnostics_period_s", "double", 1.0, "Period of /diagnostics messages", "s", 0.1, 60.0),
)


class PolicyNode(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__("rt2_policy", **kwargs)
        # backend.type decides which backend's options are declared, so it is read first.
        params = declare_and_read(self, POLICY_PARAMS + TOKENIZER_PARAMS + NODE_PARAMS)
        backend_type = params["backend.type"]
        try:
            params.update(declare_and_read(self, backend_class(backend_type).OPTIONS))
        except BackendConfigError as exc:
            raise ConfigError(str(exc)) from exc
        other_backends = tuple(f"backend.{t}." for t in BACKENDS if t != backend_type)
        reject_unknown_overrides(self, allow_prefixes=other_backends)

        self.config = PolicyConfig.from_params(params)
        self.tokenizer = ActionTokenizer.from_config({k: v for k, v in params.items() if k.startswith("tokenizer.")})
        prefix = f"backend.{backend_type}."
        options = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        try:
            self.backend: Backend = create_backend(backend_type, options, self.tokenizer)
        except BackendConfigError as exc:
            raise ConfigError(str(exc)) from exc
        self.core = PolicyCore(self.config, self.tokenizer, backend_name=backend_type)
        self._workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rt2_backend")
        self._results: queue.Queue[tuple[int, object, BaseException | None, float]] = queue.Queue()
        self._last_outcome: ReplyOutcome | None = None
        self._stamp_warned = False

        self.action_pub = self.create_publisher(ArmActionMsg, "arm_action", ACTION_QOS)
        self.tokens_pub = self.create_publisher(ActionTokens, "~/action_tokens", 10)
        self.plan_pub = self.create_publisher(String, "~/plan", 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

        camera_qos = qos_profile_sensor_data if params["camera.qos"] == "sensor_data" else \
            QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)  # depth 1: only the latest frame matters
        if params["camera.transport"] == "raw":
            self.create_subscription(Image, "camera/image", self._on_image, camera_qos)
        else:
            self.create_subscription(CompressedImage, "camera/image/compressed", self._on_compressed, camera_qos)
        self.create_subscription(String, "instruction", self._on_instruction, LATCHED_QOS)
        self.create_subscription(PoseStamped, "ee_pose", self._on_pose, qos_profile_sensor_data)

        self.create_timer(0.02, self._service_requests)
        self.create_timer(1.0 / self.config.execute_rate_hz, self._execute_step)
        self.create_timer(params["diagnostics_period_s"], self._publish_diagnostics)
        self.get_logger().info(
            f"policy node ready: backend={backend_type} profile={self.tokenizer.profile} "
            f"execute_rate={self.config.execute_rate_hz} Hz timeout={self.config.backend_timeout_s} s")

    # -- subscriptions ----------------------------------------------------------------------------
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _frame(self, msg, convert) -> None:
        try:
            image = convert(msg)
        except ImageConversionError as exc:
            self.core.counters["frames_invalid"] += 1
            self.get_logger().warning(f"dropping camera frame: {exc}", throttle_duration_sec=5.0)
            return
        stamp = stamp_to_sec(msg.header.stamp)
        now = self._now()
        if stamp == 0.0:
            if not self._stamp_warned:
                self.get_logger().warning("camera frames have no header stamp; using arrival time (latency unknown)")
                self._stamp_warned = True
            stamp = now
        self.core.on_frame(image, stamp, time.monotonic(), age_s=now - stamp)

    def _on_image(self, msg: Image) -> None:
        self._frame(msg, image_msg_to_rgb)

    def _on_compressed(self, msg: CompressedImage) -> None:
        self._frame(msg, compressed_msg_to_rgb)

    def _on_pose(self, msg: PoseStamped) -> None:
        p, q = msg.pose.position, msg.pose.orientation
        self.core.on_state(ee_position=(p.x, p.y, p.z), ee_orientation=(q.w, q.x, q.y, q.z))

    def _on_instruction(self, msg: String) -> None:
        episode = self.core.set_instruction(msg.data)
        self.backend.reset()
        if self.core.instruction:
            self.get_logger().info(f"episode {episode}: {self.core.instruction!r}")
        else:
            self.get_logger().info(f"episode {episode}: empty instruction, idle")

    # -- backend requests -------------------------------------------------------------------------
    def _service_requests(self) -> None:
        now = time.monotonic()
        for seq in self.core.abandon_overdue(now):
            self.get_logger().warning(f"request {seq} abandoned: no reply within {self.config.backend_timeout_s} s")
        while True:
            try:
                seq, reply, error, done_at = self._results.get_nowait()
            except queue.Empty:
                break
            self._handle_outcome(self.core.on_reply(seq, reply, error, done_at))
        request = self.core.next_request(now)
        if request is not None:
            future = self._workers.submit(self.backend.infer, request.observation, self.config.backend_timeout_s)
            seq = request.observation.seq
            future.add_done_callback(lambda f, seq=seq: self._results.put(
                (seq, None if f.exception() else f.result(), f.exception(), time.monotonic())))

    def _handle_outcome(self, outcome: ReplyOutcome) -> None:
        self._last_outcome = outcome
        msg = ActionTokens()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.observation_seq = max(0, outcome.seq)
        if outcome.bins is not None:
            msg.tokens = [int(b) for b in outcome.bins]
        msg.text = outcome.text
        msg.plan = outcome.plan
        msg.backend = outcome.backend
        msg.profile = self.tokenizer.profile
        msg.latency_s = float(outcome.latency_s)
        msg.server_time_s = float(outcome.server_time_s)
        self.tokens_pub.publish(msg)
        if outcome.plan:
            self.plan_pub.publish(String(data=outcome.plan))
        if not outcome.accepted:
            self.get_logger().warning(f"reply {outcome.seq} not executed ({outcome.reason}): {outcome.detail}",
                                      throttle_duration_sec=1.0)

    # -- execution --------------------------------------------------------------------------------
    def _execute_step(self) -> None:
        action = self.core.pop_action()
        if action is None:
            return
        self.action_pub.publish(self._to_msg(action))
        if action.terminate:
            self.get_logger().info(f"episode {self.core.episode_id}: terminate token, episode finished")

    def _to_msg(self, action: ArmAction) -> ArmActionMsg:
        msg = ArmActionMsg()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self.config.base_frame
        msg.observation_seq = max(0, action.observation_seq)
        msg.episode_id = self.core.episode_id
        msg.translation.x, msg.translation.y, msg.translation.z = (float(v) for v in action.translation)
        msg.rotation.x, msg.rotation.y, msg.rotation.z = (float(v) for v in action.rotation)
        msg.gripper = float(action.gripper)
        msg.gripper_relative = action.gripper_relative
        msg.terminate = action.terminate
        return msg

    # -- diagnostics ------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        c = self.core.counters
        errors = c["backend_errors"] + c["replies_invalid"]
        status = DiagnosticStatus(name="rt2_policy: backend", hardware_id=self.core.backend_name)
        last = self._last_outcome
        if last is not None and not last.accepted and last.reason in ("backend_error", "invalid_tokens"):
            status.level, status.message = DiagnosticStatus.ERROR, f"{last.reason}: {last.detail}"[:200]
        elif self.core.active and not math.isnan(self.core.last_latency_s) and \
                self.core.last_latency_s > self.config.backend_timeout_s:
            status.level, status.message = DiagnosticStatus.WARN, "backend slower than its timeout"
        else:
            status.level, status.message = DiagnosticStatus.OK, "running" if self.core.active else "idle"
        values = {"episode_id": self.core.episode_id, "instruction": self.core.instruction,
                  "last_latency_s": f"{self.core.last_latency_s:.3f}", "errors": errors, "queued": self.core.queued,
                  **{k: v for k, v in sorted(c.items())}}
        status.values = [KeyValue(key=str(k), value=str(v)) for k, v in values.items()]
        arr = DiagnosticArray(status=[status])
        arr.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(arr)

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)
        self.backend.close()


def main(args: list[str] | None = None) -> int:
    return run_node(PolicyNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
