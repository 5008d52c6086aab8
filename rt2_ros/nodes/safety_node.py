"""ROS 2 safety node: every arm action passes the pure SafetyFilter before the controller.

In: ``arm_action`` (rt2_ros_interfaces/ArmAction), ``instruction`` (std_msgs/String, latched),
``ee_pose`` (geometry_msgs/PoseStamped, measured end-effector pose, required to start an
episode), ``estop`` (std_msgs/Bool, true latches the e-stop).
Out, re-published at ``safety.command_rate_hz`` and freshly stamped (MoveIt Servo drops commands
older than 0.1 s, and a zero twist is the keep-alive while holding):
``servo_node/delta_twist_cmds`` (geometry_msgs/TwistStamped), ``target_pose``
(geometry_msgs/PoseStamped), ``gripper_command`` (std_msgs/Float64); plus ``~/status``
(rt2_ros_interfaces/SafetyStatus, latched), ``/diagnostics`` and ``~/markers`` (RViz).
Services ``~/estop`` and ``~/reset`` (std_srvs/Trigger).
"""

from __future__ import annotations

import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, PoseStamped, TwistStamped
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from std_msgs.msg import Bool, ColorRGBA, Float64, String
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker, MarkerArray

from rt2_ros.actions import ArmAction
from rt2_ros.nodes.common import (
    ACTION_QOS,
    COMMAND_QOS,
    LATCHED_QOS,
    declare_and_read,
    reject_unknown_overrides,
    run_node,
)
from rt2_ros.params import ParamSpec
from rt2_ros.safety import SAFETY_PARAMS, SafeCommand, SafetyConfig, SafetyFilter, SafetyState
from rt2_ros_interfaces.msg import ArmAction as ArmActionMsg
from rt2_ros_interfaces.msg import SafetyStatus

OUTPUT_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("output.frame_id", "string", "panda_link0", "Frame of published twists, poses and markers (robot base)"),
    ParamSpec("output.twist", "bool", True, "Publish TwistStamped on servo_node/delta_twist_cmds (MoveIt Servo)"),
    ParamSpec("output.pose", "bool", True, "Publish the safe target pose on target_pose (PoseStamped)"),
    ParamSpec("output.gripper_open_value", "double", 0.0,
              "gripper_command value for a fully open gripper (e.g. 0.04 m finger gap for a Panda)", "", -1e3, 1e3),
    ParamSpec("output.gripper_closed_value", "double", 1.0,
              "gripper_command value for a fully closed gripper", "", -1e3, 1e3),
    ParamSpec("output.status_rate_hz", "double", 5.0, "Rate of ~/status and /diagnostics", "Hz", 0.2, 50.0),
    ParamSpec("ee_pose_timeout_s", "double", 0.5,
              "A measured ee_pose older than this is not used; starting an episode needs a fresh one", "s",
              0.01, 10.0),
)


class SafetyNode(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__("rt2_safety", **kwargs)
        params = declare_and_read(self, SAFETY_PARAMS + OUTPUT_PARAMS)
        reject_unknown_overrides(self)
        self.filter = SafetyFilter(SafetyConfig.from_params({k: v for k, v in params.items()
                                                             if k.startswith("safety.")}))
        self.frame_id = params["output.frame_id"]
        self.gripper_open = params["output.gripper_open_value"]
        self.gripper_closed = params["output.gripper_closed_value"]
        self.pose_timeout = params["ee_pose_timeout_s"]
        self.episode_id = 0
        self.instruction = ""
        self.last_seq = 0
        self._pose: tuple[tuple[float, ...], tuple[float, ...], float] | None = None  # p, q(wxyz), monotonic
        self._gripper_cmd = 0.0
        self._last_gripper_pub = (-1.0, 0.0)  # value, monotonic
        self._last_state: SafetyState | None = None
        self._last_tick_reasons: tuple[str, ...] = ()
        self._episode_drops = 0

        self.twist_pub = self.create_publisher(TwistStamped, "servo_node/delta_twist_cmds", COMMAND_QOS) \
            if params["output.twist"] else None
        self.pose_pub = self.create_publisher(PoseStamped, "target_pose", COMMAND_QOS) \
            if params["output.pose"] else None
        self.gripper_pub = self.create_publisher(Float64, "gripper_command", COMMAND_QOS)
        self.status_pub = self.create_publisher(SafetyStatus, "~/status", LATCHED_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.marker_pub = self.create_publisher(MarkerArray, "~/markers", LATCHED_QOS)

        self.create_subscription(ArmActionMsg, "arm_action", self._on_action, ACTION_QOS)
        self.create_subscription(String, "instruction", self._on_instruction, LATCHED_QOS)
        self.create_subscription(PoseStamped, "ee_pose", self._on_pose, qos_profile_sensor_data)
        self.create_subscription(Bool, "estop", self._on_estop_topic, LATCHED_QOS)
        self.create_service(Trigger, "~/estop", self._on_estop_srv)
        self.create_service(Trigger, "~/reset", self._on_reset_srv)

        cfg = self.filter.config
        self.create_timer(1.0 / cfg.command_rate_hz, self._tick)
        self.create_timer(1.0 / params["output.status_rate_hz"], self._publish_status)
        self.create_timer(1.0, self._publish_markers)
        self._publish_status()
        self.get_logger().info(
            f"safety node ready: {cfg.command_rate_hz:.0f} Hz, workspace {list(cfg.workspace_min)}..."
            f"{list(cfg.workspace_max)} m, watchdog {cfg.watchdog_timeout_s} s")

    # -- inputs ---------------------------------------------------------------------------------
    def _fresh_pose(self):
        if self._pose is None or time.monotonic() - self._pose[2] > self.pose_timeout:
            return None
        return self._pose

    def _on_pose(self, msg: PoseStamped) -> None:
        p, q = msg.pose.position, msg.pose.orientation
        self._pose = ((p.x, p.y, p.z), (q.w, q.x, q.y, q.z), time.monotonic())

    def _on_instruction(self, msg: String) -> None:
        self.instruction = msg.data.strip()
        if not self.instruction:
            self.filter.stop_episode("empty instruction")
        else:
            # Stop the motion now; the policy's first action of the new episode (it carries the
            # new episode id) starts it. Not stop_episode(): instruction and actions travel on
            # different topics, so that first action may already be here, and IDLE would make
            # the safety node ignore the whole new episode.
            self.filter.hold("new instruction")
        self._publish_status()

    def _on_action(self, msg: ArmActionMsg) -> None:
        now = time.monotonic()
        if msg.episode_id < self.episode_id:
            self._episode_drops += 1
            return  # an action of a cancelled episode
        if msg.episode_id > self.episode_id:
            pose = self._fresh_pose()
            if pose is None:
                self.filter.fault("no fresh end-effector pose on ee_pose; cannot start the episode")
                self.get_logger().error("cannot start episode: no fresh ee_pose (is the arm driver publishing?)",
                                        throttle_duration_sec=2.0)
                self._publish_status()
                return
            self.episode_id = msg.episode_id
            if not self.filter.start_episode(pose[0], pose[1], self._gripper_cmd, now):
                self.get_logger().error(f"episode {msg.episode_id} refused: {', '.join(self.filter.last_reasons)}")
                self._publish_status()
                return
        action = ArmAction(translation=(msg.translation.x, msg.translation.y, msg.translation.z),
                           rotation=(msg.rotation.x, msg.rotation.y, msg.rotation.z), gripper=msg.gripper,
                           terminate=msg.terminate, gripper_relative=msg.gripper_relative,
                           observation_seq=int(msg.observation_seq))
        verdict = self.filter.on_action(action, now)
        if verdict.accepted:
            self.last_seq = int(msg.observation_seq)
        elif any(r.startswith("rejected") for r in verdict.reasons):
            self.get_logger().warning(f"action {msg.observation_seq} rejected: {', '.join(verdict.reasons)}",
                                      throttle_duration_sec=1.0)
        if msg.terminate:
            self.get_logger().info(f"episode {self.episode_id} terminated by the policy; holding")
        if self.filter.state != self._last_state:
            self._publish_status()

    def _on_estop_topic(self, msg: Bool) -> None:
        if msg.data:
            self._estop("estop topic")

    def _estop(self, why: str) -> None:
        self.filter.estop(why)
        self._publish_hold()
        self.get_logger().error(f"E-STOP latched ({why}); call ~/reset to release")
        self._publish_status()

    def _on_estop_srv(self, request, response):
        self._estop("estop service")
        response.success, response.message = True, "e-stop latched"
        return response

    def _on_reset_srv(self, request, response):
        response.success = self.filter.reset_estop() or self.filter.clear_fault()
        response.message = "released; send a new instruction to move again" if response.success \
            else "nothing to reset (no e-stop or fault latched)"
        self.get_logger().info(f"reset: {response.message}")
        self._publish_status()
        return response

    # -- outputs --------------------------------------------------------------------------------
    def _tick(self) -> None:
        pose = self._fresh_pose()
        cmd = self.filter.tick(time.monotonic(), *(pose[:2] if pose else (None, None)))
        self._last_tick_reasons = cmd.reasons
        self._publish_command(cmd)
        if cmd.state != self._last_state:
            self._publish_status()

    def _publish_command(self, cmd: SafeCommand) -> None:
        stamp = self.get_clock().now().to_msg()
        if self.twist_pub is not None:
            t = TwistStamped()
            t.header.stamp, t.header.frame_id = stamp, self.frame_id
            t.twist.linear.x, t.twist.linear.y, t.twist.linear.z = (float(v) for v in cmd.linear_velocity)
            t.twist.angular.x, t.twist.angular.y, t.twist.angular.z = (float(v) for v in cmd.angular_velocity)
            self.twist_pub.publish(t)
        if self.pose_pub is not None and cmd.state == SafetyState.RUNNING:
            ps = PoseStamped()
            ps.header.stamp, ps.header.frame_id = stamp, self.frame_id
            ps.pose.position.x, ps.pose.position.y, ps.pose.position.z = (float(v) for v in cmd.target_position)
            q = cmd.target_orientation
            ps.pose.orientation.w, ps.pose.orientation.x = float(q[0]), float(q[1])
            ps.pose.orientation.y, ps.pose.orientation.z = float(q[2]), float(q[3])
            self.pose_pub.publish(ps)
        self._gripper_cmd = cmd.gripper
        value = self.gripper_open + cmd.gripper * (self.gripper_closed - self.gripper_open)
        last_value, last_time = self._last_gripper_pub
        now = time.monotonic()
        if abs(value - last_value) > 1e-6 or now - last_time > 1.0:  # on change, and 1 Hz keep-alive
            self.gripper_pub.publish(Float64(data=float(value)))
            self._last_gripper_pub = (value, now)

    def _publish_hold(self) -> None:
        if self.twist_pub is not None:
            t = TwistStamped()
            t.header.stamp, t.header.frame_id = self.get_clock().now().to_msg(), self.frame_id
            self.twist_pub.publish(t)

    def _publish_status(self) -> None:
        state = self.filter.state
        self._last_state = state
        c = self.filter.counters
        s = SafetyStatus()
        s.header.stamp = self.get_clock().now().to_msg()
        s.header.frame_id = self.frame_id
        s.state, s.state_name = int(state), state.name
        hold = self.filter.hold_reason
        s.reasons = ([hold] if hold else []) + list(self.filter.last_reasons) + \
            [r for r in self._last_tick_reasons if not r.startswith("hold:")]
        s.episode_id = self.episode_id
        s.instruction = self.instruction
        s.last_observation_seq = self.last_seq
        last = self.filter.last_action_time
        s.last_action_age_s = float(time.monotonic() - last) if last is not None else float("nan")
        s.actions_accepted = c["actions_accepted"]
        s.actions_rejected = c["actions_rejected"]
        s.actions_clipped = c["actions_clipped"]
        s.watchdog_trips = c["watchdog_trips"]
        s.estops = c["estops"]
        s.terminations = c["terminations"]
        self.status_pub.publish(s)

        d = DiagnosticStatus(name="rt2_safety: safety filter", hardware_id=self.frame_id)
        d.level = {SafetyState.ESTOPPED: DiagnosticStatus.ERROR, SafetyState.FAULT: DiagnosticStatus.ERROR,
                   SafetyState.HOLDING: DiagnosticStatus.WARN}.get(state, DiagnosticStatus.OK)
        d.message = state.name + (f": {hold}" if hold else "")
        d.values = [KeyValue(key=k, value=v) for k, v in self.filter.diagnostics().items()]
        arr = DiagnosticArray(status=[d])
        arr.header.stamp = s.header.stamp
        self.diag_pub.publish(arr)

    def _publish_markers(self) -> None:
        cfg = self.filter.config
        stamp = self.get_clock().now().to_msg()
        markers = [self._box_marker(0, "workspace", cfg.workspace_min, cfg.workspace_max,
                                    ColorRGBA(r=0.1, g=0.8, b=0.1, a=1.0), stamp)]
        for i, box in enumerate(cfg.keep_out_boxes):
            markers.append(self._box_marker(i + 1, "keep_out", box[:3], box[3:],
                                            ColorRGBA(r=0.9, g=0.1, b=0.1, a=1.0), stamp))
        target = Marker(ns="target", id=0, type=Marker.SPHERE, action=Marker.ADD)
        target.header.stamp, target.header.frame_id = stamp, self.frame_id
        p = self.filter.target_position
        target.pose.position = Point(x=float(p[0]), y=float(p[1]), z=float(p[2]))
        target.pose.orientation.w = 1.0
        target.scale.x = target.scale.y = target.scale.z = 0.03
        target.color = ColorRGBA(r=0.2, g=0.4, b=1.0, a=0.8)
        markers.append(target)
        self.marker_pub.publish(MarkerArray(markers=markers))

    def _box_marker(self, mid: int, ns: str, lo, hi, color: ColorRGBA, stamp) -> Marker:
        m = Marker(ns=ns, id=mid, type=Marker.LINE_LIST, action=Marker.ADD)
        m.header.stamp, m.header.frame_id = stamp, self.frame_id
        m.pose.orientation.w = 1.0
        m.scale.x = 0.005
        m.color = color
        corners = [(x, y, z) for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        for i, a in enumerate(corners):
            for b in corners[i + 1:]:
                if sum(u != v for u, v in zip(a, b, strict=True)) == 1:  # the 12 edges
                    m.points += [Point(x=float(a[0]), y=float(a[1]), z=float(a[2])),
                                 Point(x=float(b[0]), y=float(b[1]), z=float(b[2]))]
        return m

    def close(self) -> None:
        """Leave the arm holding: one last zero twist."""
        self._publish_hold()


def main(args: list[str] | None = None) -> int:
    return run_node(SafetyNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
