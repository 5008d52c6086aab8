"""ROS 2 safety node: every arm action passes the pure SafetyFilter before the controller.

A managed (lifecycle) node. In: ``arm_action`` (rt2_ros_interfaces/ArmAction), ``episode``
(rt2_ros_interfaces/Episode: the policy node announces each episode; only actions of the episode
last announced are executed), ``ee_pose`` (geometry_msgs/PoseStamped, measured end-effector pose,
required to start an episode and to move), ``estop`` (std_msgs/Bool, true latches the e-stop).

Freshness (the rules are in rt2_ros.safety): the age of an ArmAction is the age of its
``observation_stamp`` (the camera frame it answers) and the age of a pose is the age of its
header stamp, both on this node's ROS clock. Each is converted once, at arrival, into a time on
the monotonic clock the filter runs on (``monotonic_now - (ros_now - stamp)``) and then ages in
real time: the filter refuses the action or holds the arm when a bound is passed, however long
ago the message arrived. A zero stamp (an old publisher, or one that forgot) is unknown age:
actions are refused (``no_observation_stamp``), poses are not used.
Out, re-published at ``safety.command_rate_hz`` and freshly stamped (MoveIt Servo drops commands
older than 0.1 s, and a zero twist is the keep-alive while holding):
``servo_node/delta_twist_cmds`` (geometry_msgs/TwistStamped), ``target_pose``
(geometry_msgs/PoseStamped), ``gripper_command`` (std_msgs/Float64, only once an episode's action
set it: a restarted node never commands the open value on its own); plus ``~/status``
(rt2_ros_interfaces/SafetyStatus, latched), ``/diagnostics`` and ``~/markers`` (RViz).
Services ``~/estop`` and ``~/reset`` (std_srvs/Trigger).

Lifecycle: configure validates the parameters and creates the topics; from then on the command
stream runs (zero twists unless active and RUNNING); activate lets episodes start; deactivate
ends the episode and holds. Every callback is guarded: an exception holds the arm, is counted and
logged once, and the command stream goes on.
"""

from __future__ import annotations

import time
from collections import Counter, deque

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, PoseStamped, TwistStamped
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import qos_profile_sensor_data
from std_msgs.msg import Bool, ColorRGBA, Float64
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker, MarkerArray

from rt2_ros.actions import ArmAction
from rt2_ros.episode import NO_EPISODE, short_id, uuid_bytes
from rt2_ros.nodes.common import (
    ACTION_QOS,
    AUTOSTART_PARAM,
    COMMAND_QOS,
    ESTOP_QOS,
    EVENT_QOS,
    LATCHED_QOS,
    QOS_OVERRIDES,
    ConfiguredEntities,
    LiveParameters,
    configure_failure,
    declare,
    guarded,
    read,
    reject_unknown_overrides,
    run_node,
    stamp_to_sec,
    use_async_publication,
    uuid_msg,
)
from rt2_ros.params import ParamSpec
from rt2_ros.safety import SAFETY_PARAMS, SafeCommand, SafetyConfig, SafetyFilter, SafetyState
from rt2_ros_interfaces.msg import ArmAction as ArmActionMsg
from rt2_ros_interfaces.msg import Episode as EpisodeMsg
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
    ParamSpec("output.frame_aliases", "string_array", [],
              "Other names of output.frame_id accepted in ee_pose and arm_action headers (e.g. base_link); any "
              "other frame is a fault naming both frames"),
)


# Parameters that `ros2 param set` may change on a configured node (checked like at start-up).
LIVE_PARAMS = frozenset(spec.name for spec in SAFETY_PARAMS) | {"output.frame_aliases"}
# Freshness and rate refusals of the filter (SafetyFilter.drop_counts causes) worth a log line.
_FRESHNESS_CAUSES = ("no_observation_stamp", "future_action", "stale_action", "no_fresh_pose", "burst")
_ENDED_EPISODES_KEPT = 64  # ids remembered to tell a straggler ("stale_episode") from a stranger
CLOSE_HOLD_RETRY_S = 2.0  # the last zero twist at shutdown: ~1 s Fast DDS refusals behind a stopped reader, twice


class SafetyNode(LifecycleNode):
    def __init__(self, **kwargs) -> None:
        super().__init__("rt2_safety", **kwargs)
        declare(self, SAFETY_PARAMS + OUTPUT_PARAMS + (AUTOSTART_PARAM,))
        self.live_params = LiveParameters(self, SAFETY_PARAMS + OUTPUT_PARAMS, LIVE_PARAMS,
                                          self._check_live, self._apply_live)
        self.filter: SafetyFilter | None = None
        self._active = False
        self._activated_stamp = 0.0  # ROS time of the last activation: older episodes are not started
        self._owned = ConfiguredEntities(self)
        self.drops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._drops_logged: set[str] = set()

    # -- lifecycle --------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            params = read(self, SAFETY_PARAMS + OUTPUT_PARAMS)
            self.filter = SafetyFilter(SafetyConfig.from_params({k: v for k, v in params.items()
                                                                 if k.startswith("safety.")}))
            self._create_entities(params)
            reject_unknown_overrides(self)
        except Exception as exc:  # ConfigError names the key; anything else is a bug, reported the same way
            self._destroy_entities()
            self.filter = None
            return configure_failure(self, exc)
        self.live_params.configured = True
        cfg = self.filter.config
        self.get_logger().info(
            f"safety node configured: {cfg.command_rate_hz:.0f} Hz, workspace {list(cfg.workspace_min)}..."
            f"{list(cfg.workspace_max)} m, watchdog {cfg.watchdog_timeout_s} s")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._activated_stamp = self.get_clock().now().nanoseconds * 1e-9
        self._active = True
        self._publish_status()
        self.get_logger().info("safety node active: waiting for an episode (send an instruction)")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._end_episode("node deactivated")
        self._active = False
        self._publish_hold()
        self._publish_status()
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _release(self) -> None:
        """Back to unconfigured: a last zero twist (when configured), then no topics, timers or filter."""
        self._publish_hold()
        self._destroy_entities()
        self.filter = None
        self.live_params.configured = False

    def _create_entities(self, params: dict) -> None:
        self.frame_id = params["output.frame_id"]
        self.frame_ids = {self.frame_id, *params["output.frame_aliases"]}
        self.gripper_open = params["output.gripper_open_value"]
        self.gripper_closed = params["output.gripper_closed_value"]
        self.episode_id = NO_EPISODE
        self.instruction = ""
        self.ended_episodes: deque[bytes] = deque(maxlen=_ENDED_EPISODES_KEPT)
        self.last_seq = 0
        # The last usable ee_pose: position, quaternion (w, x, y, z), and when it was measured (on the
        # monotonic clock, from its header stamp: see _monotonic_time_of).
        self._pose: tuple[tuple[float, ...], tuple[float, ...], float] | None = None
        self._last_gripper_pub: tuple[float, float] | None = None  # value, monotonic
        self._last_state: int | None = None
        self._last_tick_reasons: tuple[str, ...] = ()

        hold_on_error = guarded(self, "safety callback", self._hold_on_error, self.errors)
        pub = self._owned.publisher
        self.twist_pub = pub(TwistStamped, "servo_node/delta_twist_cmds", COMMAND_QOS,
                             qos_overriding_options=QOS_OVERRIDES) if params["output.twist"] else None
        self.pose_pub = pub(PoseStamped, "target_pose", COMMAND_QOS, qos_overriding_options=QOS_OVERRIDES) \
            if params["output.pose"] else None
        self.gripper_pub = pub(Float64, "gripper_command", COMMAND_QOS, qos_overriding_options=QOS_OVERRIDES)
        self.status_pub = pub(SafetyStatus, "~/status", LATCHED_QOS)
        self.diag_pub = pub(DiagnosticArray, "/diagnostics", 10)
        self.marker_pub = pub(MarkerArray, "~/markers", LATCHED_QOS)

        sub = self._owned.subscription
        sub(ArmActionMsg, "arm_action", hold_on_error(self._on_action), ACTION_QOS,
            qos_overriding_options=QOS_OVERRIDES)
        sub(EpisodeMsg, "episode", hold_on_error(self._on_episode), EVENT_QOS)
        sub(PoseStamped, "ee_pose", hold_on_error(self._on_pose), qos_profile_sensor_data,
            qos_overriding_options=QOS_OVERRIDES)
        on_estop = guarded(self, "estop", self._estop_on_error, self.errors)(self._on_estop_topic)
        # A writer is incompatible with some of the readers by design: no warning for that.
        quiet = SubscriptionEventCallbacks(incompatible_qos=lambda event: None)
        for qos in ESTOP_QOS:
            sub(Bool, "estop", on_estop, qos, event_callbacks=quiet)
        srv = self._owned.service
        srv(Trigger, "~/estop", guarded(self, "estop service", self._estop_on_error, self.errors)(self._on_estop_srv))
        srv(Trigger, "~/reset", hold_on_error(self._on_reset_srv))

        self._guarded_tick = guarded(self, "tick", self._hold_on_error, self.errors)(self._tick)
        self._owned.timer("tick", 1.0 / self.filter.config.command_rate_hz, self._guarded_tick)
        self._owned.timer("status", 1.0 / params["output.status_rate_hz"], hold_on_error(self._publish_status))
        self._owned.timer("markers", 1.0, guarded(self, "markers", None, self.errors)(self._publish_markers))
        self._publish_status()

    def _destroy_entities(self) -> None:
        self._owned.destroy_all()
        self.twist_pub = self.pose_pub = self.gripper_pub = self.status_pub = None

    # -- live parameters --------------------------------------------------------------------------
    def _changed_config(self, changes: dict) -> SafetyConfig:
        assert self.filter is not None
        current = self.filter.config.to_params()
        current.update({k: v for k, v in changes.items() if k.startswith("safety.")})
        return SafetyConfig.from_params(current)

    def _check_live(self, changes: dict) -> str:
        if self.filter is None:
            return ""
        return self.filter.check_config(self._changed_config(changes))

    def _apply_live(self, changes: dict) -> None:
        assert self.filter is not None
        if any(k.startswith("safety.") for k in changes):
            old_rate = self.filter.config.command_rate_hz
            self.filter.update_config(self._changed_config(changes))
            if self.filter.config.command_rate_hz != old_rate:
                self._owned.timer("tick", 1.0 / self.filter.config.command_rate_hz, self._guarded_tick)
        if "output.frame_aliases" in changes:
            self.frame_ids = {self.frame_id, *changes["output.frame_aliases"]}

    # -- errors -----------------------------------------------------------------------------------
    def _hold_on_error(self, exc: BaseException) -> None:
        self._publish_hold()  # first: the zero twist goes out even if latching the fault fails too
        if self.filter is not None:
            self.filter.fault(f"internal error: {type(exc).__name__}", latch=True)

    def _estop_on_error(self, exc: BaseException) -> None:
        # An e-stop request that failed half-way still latches the e-stop.
        if self.filter is not None:
            self.filter.estop(f"estop request failed: {type(exc).__name__}")
        self._publish_hold()

    def _drop(self, cause: str, detail: str) -> None:
        """Count an arm action that is not executed; the first of each cause is logged."""
        self.drops[cause] += 1
        if cause not in self._drops_logged:
            self._drops_logged.add(cause)
            self.get_logger().warning(f"arm action not executed ({cause}): {detail} (logged once per cause; "
                                      f"counts in ~/status and /diagnostics)")

    def _log_once(self, cause: str, detail: str) -> None:
        if cause not in self._drops_logged:
            self._drops_logged.add(cause)
            self.get_logger().warning(f"{detail} (logged once per cause; counts in ~/status and /diagnostics)")

    # -- inputs ---------------------------------------------------------------------------------
    def _ros_now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _monotonic_time_of(self, stamp) -> float | None:
        """The monotonic time at which ROS ``stamp`` was taken (None for a zero, i.e. unset, stamp).

        Both clocks are read together, so the age at arrival is measured on the ROS clock (the
        one the publisher stamped with), and from then on ages on the monotonic clock."""
        sec = stamp_to_sec(stamp)
        if sec <= 0.0:
            return None
        mono, ros = time.monotonic(), self._ros_now()
        return mono - (ros - sec)

    def _fresh_pose(self):
        assert self.filter is not None
        if self._pose is None or time.monotonic() - self._pose[2] > self.filter.config.max_pose_age_s:
            return None
        return self._pose

    def _frame_ok(self, frame: str, topic: str) -> bool:
        if frame in self.frame_ids:
            return True
        assert self.filter is not None
        why = f"{topic} frame {frame!r} is not output.frame_id {self.frame_id!r} (or an output.frame_aliases entry)"
        if self.filter.state not in (SafetyState.FAULT, SafetyState.ESTOPPED):
            self.get_logger().error(f"fault: {why}")
        self.filter.fault(why, latch=True)
        self._publish_hold()
        self._publish_status()
        return False

    def _on_pose(self, msg: PoseStamped) -> None:
        assert self.filter is not None
        if not self._frame_ok(msg.header.frame_id, "ee_pose"):
            self._pose = None
            return
        t = self._monotonic_time_of(msg.header.stamp)
        if t is None:
            self._log_once("pose_no_stamp", "ee_pose ignored: its header stamp is zero (unknown age); the arm "
                                            "holds until a stamped pose arrives")
            return
        ahead = t - time.monotonic()
        if ahead > self.filter.config.max_future_stamp_s:
            self._log_once("pose_future", f"ee_pose ignored: stamped {ahead:.3f} s ahead of this node's clock "
                                          f"(> safety.max_future_stamp_s); are the clocks of the machines synced?")
            return
        if self._pose is not None and t < self._pose[2]:
            return  # an older pose than the one held (reordered delivery)
        p, q = msg.pose.position, msg.pose.orientation
        self._pose = ((p.x, p.y, p.z), (q.w, q.x, q.y, q.z), t)

    def _on_episode(self, msg: EpisodeMsg) -> None:
        assert self.filter is not None
        episode_id = uuid_bytes(msg.episode_id)
        if not self._active:
            self.get_logger().warning(f"episode {short_id(episode_id)} ignored: node not active",
                                      throttle_duration_sec=2.0)
            return
        if msg.active and (episode_id == self.episode_id or episode_id in self.ended_episodes):
            return  # a repeat (the policy repeats until it sees the episode in ~/status), or one that ended
        if msg.active and stamp_to_sec(msg.header.stamp) < self._activated_stamp:
            self.get_logger().warning(f"episode {short_id(episode_id)} ignored: issued before this node became "
                                      "active (a restarted safety node waits for a fresh instruction)",
                                      throttle_duration_sec=2.0)
            return
        if not msg.active:
            if episode_id == self.episode_id:
                self._end_episode(msg.reason or "ended by the policy node")
                self.get_logger().info(f"episode {short_id(episode_id)} ended by the policy node: {msg.reason}")
            return
        if self.episode_id != NO_EPISODE:
            self.ended_episodes.append(self.episode_id)
        self.episode_id = episode_id
        self.instruction = msg.instruction.strip()
        pose = self._fresh_pose()
        if self.filter.state == SafetyState.ESTOPPED:
            self.get_logger().error(f"episode {short_id(episode_id)} not started: e-stop latched; call ~/reset first")
        elif pose is None:
            self.filter.fault("no fresh end-effector pose on ee_pose; cannot start the episode", latch=True)
            self._publish_hold()
            self.get_logger().error(f"episode {short_id(episode_id)} not started: no fresh ee_pose "
                                    f"(is the arm driver publishing?)")
        elif self.filter.start_episode(pose[0], pose[1], None, time.monotonic(), pose_time=pose[2]):
            # Hold until the first action: the model may take longer than the watchdog to answer.
            self.filter.hold("waiting for the first action")
            self.get_logger().info(f"episode {short_id(episode_id)}: {self.instruction!r}")
        else:
            self._publish_hold()
            self.get_logger().error(f"episode {short_id(episode_id)} refused: {', '.join(self.filter.last_reasons)}")
        self._publish_status()

    def _end_episode(self, reason: str) -> None:
        """The current episode is over: hold now (not at the next tick) and forget it."""
        if self.filter is None:
            return
        if self.episode_id != NO_EPISODE:
            self.ended_episodes.append(self.episode_id)
        self.episode_id = NO_EPISODE
        self.instruction = ""
        self.filter.stop_episode(reason)
        self._publish_hold()
        self._publish_status()

    def _on_action(self, msg: ArmActionMsg) -> None:
        assert self.filter is not None
        episode_id = uuid_bytes(msg.episode_id)
        if not self._active:
            return self._drop("inactive", "the safety node is not active")
        if episode_id != self.episode_id or episode_id == NO_EPISODE:
            if episode_id in self.ended_episodes:
                return self._drop("stale_episode", f"action of the ended episode {short_id(episode_id)}")
            return self._drop("unknown_episode", f"action of episode {short_id(episode_id)}, which this node was "
                                                 f"never told about (current: {short_id(self.episode_id)}); "
                                                 "a (re)started safety node waits for a fresh instruction")
        if not self._frame_ok(msg.header.frame_id, "arm_action"):
            return self._drop("wrong_frame", f"frame {msg.header.frame_id!r}")
        action = ArmAction(translation=(msg.translation.x, msg.translation.y, msg.translation.z),
                           rotation=(msg.rotation.x, msg.rotation.y, msg.rotation.z), gripper=msg.gripper,
                           terminate=msg.terminate, gripper_relative=msg.gripper_relative,
                           observation_seq=int(msg.observation_seq))
        observed = self._monotonic_time_of(msg.observation_stamp)
        verdict = self.filter.on_action(action, time.monotonic(), observation_time=observed)
        if verdict.accepted:
            self.last_seq = int(msg.observation_seq)
        else:
            for reason in verdict.reasons:
                if reason.startswith("ignored:"):
                    self._drop(reason, f"action {msg.observation_seq} in state {self.filter.state.name}")
                cause = reason.split(":", 1)[-1]
                if cause in _FRESHNESS_CAUSES:
                    self._log_once(cause, f"arm action {msg.observation_seq} not executed ({cause}): "
                                          f"{self.filter.last_refusal or reason}")
            if any(r.startswith("rejected") for r in verdict.reasons):
                self.get_logger().warning(f"action {msg.observation_seq} rejected: {', '.join(verdict.reasons)}",
                                          throttle_duration_sec=1.0)
        if msg.terminate and verdict.accepted:
            self.get_logger().info(f"episode {short_id(self.episode_id)} terminated by the policy; holding")
        if self._status_changed():
            self._publish_status()

    def _on_estop_topic(self, msg: Bool) -> None:
        if msg.data:
            self._estop("estop topic")

    def _estop(self, why: str) -> None:
        assert self.filter is not None
        already = self.filter.state is SafetyState.ESTOPPED
        self.filter.estop(why)
        self._publish_hold()
        if not already:  # one press reaches several estop readers (ESTOP_QOS): log the latch once
            self.get_logger().error(f"E-STOP latched ({why}); call ~/reset to release")
            self._publish_status()

    def _on_estop_srv(self, request, response):
        self._estop("estop service")
        response.success, response.message = True, "e-stop latched"
        return response

    def _on_reset_srv(self, request, response):
        assert self.filter is not None
        response.success = self.filter.reset_estop() or self.filter.clear_fault()
        if response.success:
            # Whatever ran before the reset is over: only an instruction issued after it moves the arm.
            self._end_episode("reset")
        response.message = "released; send a new instruction to move again" if response.success \
            else "nothing to reset (no e-stop or fault latched)"
        self.get_logger().info(f"reset: {response.message}")
        self._publish_status()
        return response

    def _status_changed(self) -> bool:
        return self._state_code() != self._last_state

    def _state_code(self) -> int:
        assert self.filter is not None
        return int(self.filter.state) if self._active else SafetyStatus.INACTIVE

    # -- outputs --------------------------------------------------------------------------------
    def _tick(self) -> None:
        """The command stream: one freshly stamped command per period (guarded: a failure sends a hold)."""
        assert self.filter is not None
        # The last pose goes in with the time it was measured, fresh or not: the filter holds the
        # arm once it is older than safety.max_pose_age_s (and never dead-reckons past that).
        pose = self._pose
        if pose is None:
            cmd = self.filter.tick(time.monotonic())
        else:
            cmd = self.filter.tick(time.monotonic(), pose[0], pose[1], pose_time=pose[2])
        self._last_tick_reasons = cmd.reasons
        if "fault:arm_outside_workspace" in cmd.reasons:  # every time: each one is a safety event
            self.get_logger().error(self.filter.hold_reason)
        elif "hold:no_fresh_pose" in cmd.reasons:
            self._log_once("hold:no_fresh_pose", f"holding: {self.filter.hold_reason} (is the arm driver "
                                                 "publishing ee_pose, with current stamps?)")
        elif "hold:stale_action" in cmd.reasons:
            self._log_once("hold:stale_action", f"holding: {self.filter.hold_reason}")
        if not self._active and cmd.state == SafetyState.RUNNING:  # cannot happen; never move inactive
            self._publish_hold()
        else:
            self._publish_command(cmd)
        if self._status_changed():
            self._publish_status()

    def _publish_command(self, cmd: SafeCommand) -> None:
        stamp = self.get_clock().now().to_msg()
        if self.twist_pub is not None:
            t = TwistStamped()
            t.header.stamp, t.header.frame_id = stamp, self.frame_id
            t.twist.linear.x, t.twist.linear.y, t.twist.linear.z = (float(v) for v in cmd.linear_velocity)
            t.twist.angular.x, t.twist.angular.y, t.twist.angular.z = (float(v) for v in cmd.angular_velocity)
            self._send(self.twist_pub, t)
        if self.pose_pub is not None and cmd.state == SafetyState.RUNNING:
            ps = PoseStamped()
            ps.header.stamp, ps.header.frame_id = stamp, self.frame_id
            ps.pose.position.x, ps.pose.position.y, ps.pose.position.z = (float(v) for v in cmd.target_position)
            q = cmd.target_orientation
            ps.pose.orientation.w, ps.pose.orientation.x = float(q[0]), float(q[1])
            ps.pose.orientation.y, ps.pose.orientation.z = float(q[2]), float(q[3])
            self._send(self.pose_pub, ps)
        if cmd.gripper is None:
            return  # gripper state unknown (no action set it yet): command nothing, never "open"
        value = self.gripper_open + cmd.gripper * (self.gripper_closed - self.gripper_open)
        now = time.monotonic()
        last = self._last_gripper_pub
        due = last is None or abs(value - last[0]) > 1e-6 or now - last[1] > 1.0  # on change, and 1 Hz keep-alive
        if due and self._send(self.gripper_pub, Float64(data=float(value))):
            self._last_gripper_pub = (value, now)

    def _zero_twist(self) -> TwistStamped:
        t = TwistStamped()
        t.header.stamp, t.header.frame_id = self.get_clock().now().to_msg(), self.frame_id
        return t

    def _publish_hold(self) -> bool:
        """A zero twist now (the tick keeps sending them); False if it was not sent."""
        return self._send(getattr(self, "twist_pub", None), self._zero_twist())

    def _send(self, pub, msg) -> bool:
        """Publish; a refusal by the middleware is counted and logged, not a fault of this node.

        Fast DDS refuses publishes ("cannot publish data") for about a second behind a reader that was
        just stopped or killed (a controller, rt2-status). Latching an "internal error" fault for that
        ended the episode: instead the next tick sends a fresh command, and until one gets through the
        controller's own command timeout stops the arm.
        """
        if pub is None:
            return False
        try:
            pub.publish(msg)
            return True
        except _rclpy.RCLError as exc:
            self.errors["publish_refused"] += 1
            self.get_logger().warning(f"the middleware refused a publish ({exc!s:.200}); the next one is sent as "
                                      "usual (publish_refused in /diagnostics)", throttle_duration_sec=5.0)
            return False

    def _publish_status(self) -> None:
        if self.filter is None:
            return
        state = self.filter.state
        code = self._state_code()
        self._last_state = code
        c = self.filter.counters
        s = SafetyStatus()
        s.header.stamp = self.get_clock().now().to_msg()
        s.header.frame_id = self.frame_id
        s.state, s.state_name = code, state.name if self._active else "INACTIVE"
        hold = self.filter.hold_reason
        s.reasons = ([hold] if hold else []) + list(self.filter.last_reasons) + \
            [r for r in self._last_tick_reasons if not r.startswith("hold:")]
        s.episode_id = uuid_msg(self.episode_id)
        s.instruction = self.instruction
        s.last_observation_seq = self.last_seq
        mono = time.monotonic()
        last = self.filter.last_action_time
        s.last_action_age_s = float(mono - last) if last is not None else float("nan")
        observed = self.filter.target_observation_time
        s.last_observation_age_s = float(mono - observed) if observed is not None else float("nan")
        s.pose_age_s = float(mono - self._pose[2]) if self._pose is not None else float("nan")
        s.actions_accepted = c["actions_accepted"]
        s.actions_rejected = c["actions_rejected"]
        s.actions_clipped = c["actions_clipped"]
        s.watchdog_trips = c["watchdog_trips"]
        s.estops = c["estops"]
        s.terminations = c["terminations"]
        s.faults = c["faults"]
        drops = sorted((self.drops + Counter(self.filter.drop_counts)).items())
        s.drop_causes = [k for k, _ in drops]
        s.drop_counts = [int(v) for _, v in drops]
        self._send(self.status_pub, s)

        d = DiagnosticStatus(name="rt2_safety: safety filter", hardware_id=self.frame_id)
        d.level = {SafetyState.ESTOPPED: DiagnosticStatus.ERROR, SafetyState.FAULT: DiagnosticStatus.ERROR,
                   SafetyState.HOLDING: DiagnosticStatus.WARN}.get(state, DiagnosticStatus.OK)
        d.message = s.state_name + (f": {hold}" if hold else "")
        values = {**self.filter.diagnostics(), "episode_id": short_id(self.episode_id),
                  **{f"dropped:{k}": str(v) for k, v in drops}, **{k: str(v) for k, v in self.errors.items()}}
        d.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        arr = DiagnosticArray(status=[d])
        arr.header.stamp = s.header.stamp
        self._send(self.diag_pub, arr)

    def _publish_markers(self) -> None:
        assert self.filter is not None
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
        self._send(self.marker_pub, MarkerArray(markers=markers))

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
        """Leave the arm holding: one last zero twist, retried for up to CLOSE_HOLD_RETRY_S in total.

        Fast DDS can refuse a publish ("cannot publish data") for about a second behind a controller
        that was just stopped or killed (README: the command stream under a stuck reader). If it is still
        refused, the controller's own command timeout (MoveIt Servo: 0.1 s) stops the arm; that is logged.
        """
        if getattr(self, "twist_pub", None) is None:
            return
        deadline = time.monotonic() + CLOSE_HOLD_RETRY_S
        while not self._publish_hold():
            if time.monotonic() >= deadline:
                self.get_logger().error(f"the last zero twist was not sent within {CLOSE_HOLD_RETRY_S} s")
                return
            time.sleep(0.05)


def main(args: list[str] | None = None) -> int:
    use_async_publication()  # the command stream must not stop while a controller is stopped or restarts
    return run_node(SafetyNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
