"""ROS 2 policy node: camera + instruction in, validated arm actions out.

A managed (lifecycle) node. Tasks come in two ways that share one code path:
``execute_instruction`` (rt2_ros_interfaces/action/ExecuteInstruction: goal, feedback, result,
cancel; a new goal preempts the running one) and the ``instruction`` topic (std_msgs/String, for
teleop: each message starts a new episode, an empty one stops). Each accepted task is an episode
with a random id, announced on ``episode`` (rt2_ros_interfaces/Episode); actions are published
only once the safety node's ``rt2_safety/status`` names that episode, and the episode ends when
the safety node reports terminate, e-stop, fault, reset or restart (rt2_ros.episode).

Subscribes each configured camera (rt2_ros.cameras: ``cameras.names``, by default one camera on
``camera/image``; sensor_msgs/Image, or CompressedImage on ``<topic>/compressed``) with
sensor-data QoS and optionally ``ee_pose``
(geometry_msgs/PoseStamped) and ``joint_states`` (sensor_msgs/JointState: the gripper's
closedness and the positions of ``joints.arm_names``, rt2_ros.joints); proprioception older
than its age bound is never sent to the backend (rt2_ros.policy). Publishes ``arm_action``
(rt2_ros_interfaces/ArmAction), ``~/action_tokens`` (rt2_ros_interfaces/ActionTokens), ``~/plan``
(std_msgs/String) and ``/diagnostics``. All timing rules live in :mod:`rt2_ros.policy`; backend calls (infer and
reset) run on worker threads so the executor never blocks, and their exceptions become counted
outcomes, never a dead node. A finished call wakes the executor through a guard condition, so a
reply is handled, and its action released, as soon as it arrives (not at the next poll).
"""

from __future__ import annotations

import contextlib
import math
import queue
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.task import Future as RclpyFuture
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String

from rt2_ros.actions import ArmAction
from rt2_ros.backends import BACKENDS, BackendConfigError, backend_class, create_backend
from rt2_ros.backends.base import Backend
from rt2_ros.cameras import CAMERA_NAMES, CameraConfig, camera_specs, cameras_from_params
from rt2_ros.episode import Episode, EpisodeTracker, Outcome, short_id, uuid_bytes
from rt2_ros.joints import JointConfig, JointStateError, map_joint_state
from rt2_ros.nodes.common import (
    ACTION_QOS,
    AUTOSTART_PARAM,
    EVENT_QOS,
    LATCHED_QOS,
    QOS_OVERRIDES,
    ConfiguredEntities,
    ImageConversionError,
    LiveParameters,
    compressed_msg_to_rgb,
    configure_failure,
    declare,
    guarded,
    image_msg_to_rgb,
    read,
    reject_unknown_overrides,
    run_node,
    sec_to_stamp,
    stamp_to_sec,
    uuid_msg,
)
from rt2_ros.params import ConfigError, ParamSpec
from rt2_ros.policy import POLICY_PARAMS, PolicyConfig, PolicyCore, ReplyOutcome
from rt2_ros.text import clean_text
from rt2_ros.tokens import TOKENIZER_PARAMS, ActionTokenizer
from rt2_ros_interfaces.action import ExecuteInstruction
from rt2_ros_interfaces.msg import ActionTokens, SafetyStatus
from rt2_ros_interfaces.msg import ArmAction as ArmActionMsg
from rt2_ros_interfaces.msg import Episode as EpisodeMsg

NODE_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("diagnostics_period_s", "double", 1.0, "Period of /diagnostics messages", "s", 0.1, 60.0),
    ParamSpec("policy.safety_ack_timeout_s", "double", 2.0,
              "An episode the safety node has not taken (its status naming the episode) within this long ends "
              "with FAULT", "s", 0.1, 60.0),
    ParamSpec("policy.feedback_period_s", "double", 0.2, "Period of ExecuteInstruction feedback", "s", 0.02, 10.0),
    ParamSpec("joints.arm_names", "string_array", [],
              "Arm joints whose positions (from joint_states) go into observations, in the order the policy "
              "expects; [] = send no joint positions"),
    ParamSpec("joints.gripper_names", "string_array", ["panda_finger_joint1", "panda_finger_joint2"],
              "Gripper joints in joint_states; the measured closedness sent to the backend is the mean over them "
              "(unknown while joint_states carries none of them)"),
    ParamSpec("joints.gripper_open_position", "double", 0.04,
              "Position of each gripper joint when fully open (closedness 0); Panda finger: 0.04 m", "m or rad",
              -10.0, 10.0),
    ParamSpec("joints.gripper_closed_position", "double", 0.0,
              "Position of each gripper joint when fully closed (closedness 1); Panda finger: 0.0 m", "m or rad",
              -10.0, 10.0),
    ParamSpec("joints.max_age_s", "double", 0.5,
              "Gripper and joint positions older than this (joint_states header stamp) when a request goes out "
              "are not sent", "s", 0.01, 10.0),
)
# Parameters that `ros2 param set` may change on a configured node; backend and model changes
# go through cleanup + configure (a new backend is built there).
LIVE_PARAMS = frozenset({
    "backend.timeout_s", "policy.execute_rate_hz", "policy.max_frame_age_s", "policy.max_reply_age_s",
    "policy.refill_threshold", "policy.chunk_blend", "policy.chunk_blend_weight", "policy.safety_ack_timeout_s",
    "policy.feedback_period_s", "diagnostics_period_s", "policy.max_pose_age_s", "joints.max_age_s",
    "policy.max_action_age_s", "policy.max_chunk_length"})
_REANNOUNCE_PERIOD_S = 0.2


class PolicyNode(LifecycleNode):
    def __init__(self, **kwargs) -> None:
        super().__init__("rt2_policy", **kwargs)
        self._base_specs = (*POLICY_PARAMS, *TOKENIZER_PARAMS, *NODE_PARAMS, CAMERA_NAMES)
        declare(self, (*self._base_specs, AUTOSTART_PARAM))
        self.live_params = LiveParameters(self, self._base_specs, LIVE_PARAMS, self._check_live, self._apply_live)
        self.backend: Backend | None = None
        self.core: PolicyCore | None = None
        self._active = False
        self._owned = ConfiguredEntities(self)
        self.errors: Counter[str] = Counter()
        self.tracker = EpisodeTracker(2.0)
        self._goals: dict[bytes, tuple[ServerGoalHandle | None, RclpyFuture]] = {}  # episode -> goal, result
        self._last_plan = ""
        self._last_action_age = math.nan
        self._steps = 0
        self._announced_at = 0.0
        # Goals are refused unless active; the server exists from the start so clients can wait for it.
        self._action_server = ActionServer(
            self, ExecuteInstruction, "~/execute_instruction", self._execute_goal,
            goal_callback=self._on_goal_request, handle_accepted_callback=self._on_goal_accepted,
            cancel_callback=self._on_cancel_request)

    # -- lifecycle --------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as exc:  # ConfigError names the key; anything else is a bug, reported the same way
            self._teardown()
            return configure_failure(self, exc)
        self.live_params.configured = True
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = True
        self.get_logger().info("policy node active: send a goal to execute_instruction or a message on instruction")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._end_episode(Outcome.ABORTED, "the policy node was deactivated")
        self._active = False
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.live_params.configured = False
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._end_episode(Outcome.ABORTED, "the policy node shut down")
        self._teardown()
        self.live_params.configured = False
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        params = read(self, self._base_specs)
        backend_type = params["backend.type"]
        try:
            options_specs = backend_class(backend_type).OPTIONS
        except BackendConfigError as exc:
            raise ConfigError(str(exc)) from exc
        declare(self, options_specs)  # backend.type decides which backend's options exist
        params.update(read(self, options_specs))
        cam_specs = tuple(spec for name in params["cameras.names"] for spec in camera_specs(name))
        declare(self, cam_specs)  # as cameras.names decides which cameras' options exist
        params.update(read(self, cam_specs))
        self.cameras: tuple[CameraConfig, ...] = cameras_from_params(params)
        other_backends = tuple(f"backend.{t}." for t in BACKENDS if t != backend_type)
        reject_unknown_overrides(self, allow_prefixes=(*other_backends, "qos_overrides."))

        self.config = PolicyConfig.from_params(params)
        self.tokenizer = ActionTokenizer.from_config({k: v for k, v in params.items() if k.startswith("tokenizer.")})
        prefix = f"backend.{backend_type}."
        options = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        try:
            self.backend = create_backend(backend_type, options, self.tokenizer)
        except BackendConfigError as exc:
            raise ConfigError(str(exc)) from exc
        self.joints = JointConfig.from_params(params)
        self.core = PolicyCore(self.config, self.tokenizer, backend_name=backend_type,
                               joint_max_age_s=params["joints.max_age_s"], cameras=self.cameras)
        self.tracker = EpisodeTracker(params["policy.safety_ack_timeout_s"])
        self._params = params
        self._workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rt2_backend")
        self._results: queue.Queue[tuple[int, object, BaseException | None, float]] = queue.Queue()
        self._reset_future: Future | None = None
        self._reset_started = 0.0
        self._last_outcome: ReplyOutcome | None = None
        self._unstamped_warned: set[str] = set()

        on_error = guarded(self, "policy callback", self._stop_on_error, self.errors)
        pub = self._owned.publisher
        self.action_pub = pub(ArmActionMsg, "arm_action", ACTION_QOS, qos_overriding_options=QOS_OVERRIDES)
        self.episode_pub = pub(EpisodeMsg, "episode", EVENT_QOS)
        self.tokens_pub = pub(ActionTokens, "~/action_tokens", 10)
        self.plan_pub = pub(String, "~/plan", 10)
        self.diag_pub = pub(DiagnosticArray, "/diagnostics", 10)

        sub = self._owned.subscription
        for cam in self.cameras:
            camera_qos = qos_profile_sensor_data if cam.qos == "sensor_data" else \
                QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)  # depth 1: only the latest frame matters
            raw = cam.transport == "raw"
            callback = on_error(lambda msg, name=cam.name, raw=raw: self._frame(
                msg, image_msg_to_rgb if raw else compressed_msg_to_rgb, name))
            sub(Image if raw else CompressedImage, cam.subscribed_topic, callback, camera_qos,
                qos_overriding_options=QOS_OVERRIDES)
        sub(String, "instruction", on_error(self._on_instruction), EVENT_QOS)
        sub(PoseStamped, "ee_pose", on_error(self._on_pose), qos_profile_sensor_data,
            qos_overriding_options=QOS_OVERRIDES)
        sub(JointState, "joint_states", on_error(self._on_joint_state), qos_profile_sensor_data,
            qos_overriding_options=QOS_OVERRIDES)
        sub(SafetyStatus, "rt2_safety/status", on_error(self._on_safety_status), LATCHED_QOS)
        reject_unknown_overrides(self, allow_prefixes=other_backends)  # now qos_overrides.* are declared too

        self._owned.timer("service", 0.02, on_error(self._service_requests))
        self._owned.timer("execute", 1.0 / self.config.execute_rate_hz, on_error(self._execute_on_timer))
        self._owned.one_shot("release", on_error(self._execute_step))
        # Worker threads trigger it when a call finishes: the reply is handled at once on the executor.
        self._reply_ready = self._owned.guard_condition(on_error(self._on_reply_ready))
        self._owned.timer("diagnostics", params["diagnostics_period_s"], on_error(self._publish_diagnostics))
        self._owned.timer("feedback", params["policy.feedback_period_s"], on_error(self._publish_feedback))
        self.get_logger().info(
            f"policy node configured: backend={backend_type} profile={self.tokenizer.profile} "
            f"execute_rate={self.config.execute_rate_hz} Hz timeout={self.config.backend_timeout_s} s "
            f"cameras={', '.join(f'{c.name} ({c.subscribed_topic})' for c in self.cameras)}")

    def _teardown(self) -> None:
        self._reply_ready = None
        self._owned.destroy_all()
        workers = getattr(self, "_workers", None)
        if workers is not None:
            workers.shutdown(wait=False, cancel_futures=True)
            self._workers = None
        if self.backend is not None:
            try:
                self.backend.close()
            except Exception as exc:  # a backend that fails to close must not block the shutdown
                self.get_logger().warning(f"backend close failed: {clean_text(exc, 200)}")
            self.backend = None
        self.core = None

    # -- live parameters --------------------------------------------------------------------------
    def _check_live(self, changes: dict) -> str:
        merged = {**self._params, **changes}
        PolicyConfig.from_params(merged)  # raises ConfigError naming the key
        return ""

    def _apply_live(self, changes: dict) -> None:
        self._params.update(changes)
        self.config = PolicyConfig.from_params(self._params)
        if self.core is not None:
            self.core.config = self.config
            self.core.joint_max_age_s = self._params["joints.max_age_s"]
        self.tracker.ack_timeout_s = self._params["policy.safety_ack_timeout_s"]
        on_error = guarded(self, "policy callback", self._stop_on_error, self.errors)
        for key, timer, period, fn in (
                ("policy.execute_rate_hz", "execute", lambda: 1.0 / self.config.execute_rate_hz,
                 self._execute_on_timer),
                ("diagnostics_period_s", "diagnostics", lambda: self._params["diagnostics_period_s"],
                 self._publish_diagnostics),
                ("policy.feedback_period_s", "feedback", lambda: self._params["policy.feedback_period_s"],
                 self._publish_feedback)):
            if key in changes and self._owned.has_timer(timer):
                self._owned.timer(timer, period(), on_error(fn))

    # -- episodes ---------------------------------------------------------------------------------
    def _start_episode(self, instruction: str, goal: ServerGoalHandle | None, time_limit_s: float = 0.0
                       ) -> Episode:
        now = time.monotonic()
        ep, old = self.tracker.start(instruction, now, time_limit_s)
        if old is not None:
            self._finish(old, announce=False)  # the new announcement supersedes it on the safety node
        assert self.core is not None
        self.core.set_instruction(instruction)
        ep.counters = dict(self.core.counters)  # baseline: the result reports this episode's counts
        self._steps = 0
        self._last_plan = ""
        self._last_action_age = math.nan
        ep.stamp = self.get_clock().now().to_msg()
        result: RclpyFuture = RclpyFuture()
        self._goals[ep.episode_id] = (goal, result)
        self._announce(ep, active=True)
        self._reset_backend()
        self.get_logger().info(f"episode {short_id(ep.episode_id)}: {instruction!r}"
                               + (" (goal)" if goal is not None else " (instruction topic)"))
        return ep

    def _end_episode(self, outcome: Outcome, message: str, announce: bool = True) -> None:
        ep = self.tracker.end(outcome, message, time.monotonic())
        if ep is not None:
            self._finish(ep, announce)

    def _finish(self, ep: Episode, announce: bool = True) -> None:
        """The episode is over on this side: stop requesting, clear, resolve the goal, and (``announce``)
        tell the safety node to hold. Not announced when the safety node ended it (its status keeps
        saying why: TERMINATED, ESTOPPED, ...) or when a new episode supersedes it."""
        if self.core is not None:
            ep.counters = {k: v - ep.counters.get(k, 0) for k, v in self.core.counters.items()}
            self.core.stop()
        if announce:
            self._announce(ep, active=False)
        assert ep.outcome is not None
        line = f"episode {short_id(ep.episode_id)} {ep.outcome.name}: {ep.message}"
        # Two separate calls: rclpy refuses one logging call site used at two severities.
        if ep.outcome in (Outcome.TERMINATED, Outcome.PREEMPTED, Outcome.CANCELLED):
            self.get_logger().info(line)
        else:
            self.get_logger().warning(line)
        entry = self._goals.pop(ep.episode_id, None)
        if entry is not None:
            _, result = entry
            if not result.done():
                result.set_result(self._result_msg(ep))

    def _result_msg(self, ep: Episode) -> ExecuteInstruction.Result:
        assert ep.outcome is not None
        r = ExecuteInstruction.Result()
        r.outcome, r.outcome_name, r.message = int(ep.outcome), ep.outcome.name, ep.message[:1000]
        r.episode_id = uuid_msg(ep.episode_id)
        r.duration_s = float(ep.ended_at - ep.started_at)
        r.steps = self._steps
        c = Counter(ep.counters)
        r.requests_sent = int(c["requests_sent"])
        r.replies_accepted = int(c["replies_accepted"])
        r.replies_dropped = int(sum(v for k, v in c.items() if k.startswith("replies_dropped_"))
                                + c["backend_errors"] + c["replies_invalid"])
        return r

    def _announce(self, ep: Episode, active: bool) -> None:
        msg = EpisodeMsg()
        # Stamped with when the episode was accepted (repeats too): a safety node started later
        # ignores it, so a restart never resumes a task issued before it.
        msg.header.stamp = ep.stamp if active else self.get_clock().now().to_msg()
        msg.episode_id = uuid_msg(ep.episode_id)
        msg.active = active
        msg.instruction = ep.instruction
        outcome = ep.outcome.name.lower() if ep.outcome is not None else "ended"
        msg.reason = "" if active else f"{outcome}: {ep.message}"[:500]
        if getattr(self, "episode_pub", None) is not None:
            self.episode_pub.publish(msg)
            self._announced_at = time.monotonic()

    def _reannounce(self, now: float) -> None:
        """Repeat the announcement of an episode the safety node has not taken yet: a just-started
        process may not have discovered the other side when the first one went out (observed up
        to ~3 s with FastDDS), and a lost announcement would end the task with FAULT."""
        ep = self.tracker.current
        if ep is None or ep.acknowledged or now - self._announced_at < _REANNOUNCE_PERIOD_S:
            return
        self._announce(ep, active=True)

    def _reset_backend(self) -> None:
        """backend.reset() off the executor: a down server must neither block nor kill this node."""
        if self.backend is None or self._workers is None:
            return
        self._reset_future = self._workers.submit(self.backend.reset)
        self._reset_started = time.monotonic()

    def _stop_on_error(self, exc: BaseException) -> None:
        self._end_episode(Outcome.FAULT,
                          f"internal error in the policy node: {type(exc).__name__}: {clean_text(exc, 200)}")

    # -- action server ----------------------------------------------------------------------------
    def _on_goal_request(self, goal: ExecuteInstruction.Goal) -> GoalResponse:
        if not self._active:
            self.get_logger().warning("goal rejected: the policy node is not active")
            return GoalResponse.REJECT
        if not goal.instruction.strip() or not math.isfinite(goal.time_limit_s) or goal.time_limit_s < 0:
            self.get_logger().warning(f"goal rejected: empty instruction or bad time limit {goal.time_limit_s}")
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _on_goal_accepted(self, goal_handle: ServerGoalHandle) -> None:
        try:
            req = goal_handle.request
            self._start_episode(req.instruction.strip(), goal_handle, float(req.time_limit_s))
        except Exception as exc:
            self.errors["callback_errors:goal"] += 1
            self.get_logger().error(f"goal could not start: {type(exc).__name__}: {clean_text(exc, 200)}")
        goal_handle.execute()

    def _on_cancel_request(self, goal_handle: ServerGoalHandle) -> CancelResponse:
        try:
            ep = self.tracker.current
            if ep is not None and self._goals.get(ep.episode_id, (None,))[0] is goal_handle:
                # Stop now, not when the execute coroutine next runs: the safety node holds at once.
                self._end_episode(Outcome.CANCELLED, "cancelled by the client")
        except Exception as exc:  # the action server would re-raise it from spin and end the process
            self.errors["callback_errors:cancel"] += 1
            self.get_logger().error(f"cancel: unexpected {type(exc).__name__}: {clean_text(exc, 200)}")
        return CancelResponse.ACCEPT

    async def _execute_goal(self, goal_handle: ServerGoalHandle) -> ExecuteInstruction.Result:
        entry = next(((eid, g, f) for eid, (g, f) in self._goals.items() if g is goal_handle), None)
        if entry is None:  # the episode already ended (preempted or cancelled before we ran) or never started
            result = ExecuteInstruction.Result(outcome=int(Outcome.ABORTED), outcome_name="ABORTED",
                                               message="the episode ended before it started")
            if goal_handle.is_cancel_requested:
                result.outcome, result.outcome_name, result.message = int(Outcome.CANCELLED), "CANCELLED", \
                    "cancelled by the client"
                goal_handle.canceled()
            else:
                goal_handle.abort()
            return result
        result = await entry[2]
        if result.outcome == Outcome.TERMINATED:
            goal_handle.succeed()
        elif result.outcome == Outcome.CANCELLED and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        else:
            goal_handle.abort()
        return result

    def _publish_feedback(self) -> None:
        ep = self.tracker.current
        if ep is None:
            return
        goal = self._goals.get(ep.episode_id, (None,))[0]
        if goal is None or not goal.is_active:
            return
        fb = ExecuteInstruction.Feedback()
        fb.episode_id = uuid_msg(ep.episode_id)
        fb.step = self._steps
        fb.phase = self._phase(ep)
        fb.plan = self._last_plan[:1000]
        fb.safety_state = self.tracker.safety_state
        fb.backend_latency_s = float(self.core.last_latency_s) if self.core is not None else math.nan
        fb.action_age_s = float(self._last_action_age)
        goal.publish_feedback(fb)

    def _phase(self, ep: Episode) -> str:
        if not ep.acknowledged:
            return "waiting for the safety node"
        if self.core is not None and self.core.finished:
            return "terminating"
        if self._steps == 0:
            return "waiting for the first action"
        return "running" if ep.safety_state == "RUNNING" else f"safety {ep.safety_state.lower()}"

    # -- subscriptions ----------------------------------------------------------------------------
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _frame(self, msg, convert, camera: str) -> None:
        if self.core is None:
            return
        try:
            image = convert(msg)
        except ImageConversionError as exc:
            self.core.counters[f"frames_invalid_{camera}"] += 1
            self.get_logger().warning(f"dropping {camera} frame: {exc}", throttle_duration_sec=5.0)
            return
        stamp, age = self._stamp(msg.header, f"camera {camera}")
        now = time.monotonic()
        self.core.on_frame(image, stamp, now, age_s=age, camera=camera)
        # Out at once if a request is due, not at the next service poll (up to 20 ms later; the poll
        # still sends frames that arrived while a call was in flight). Any camera's frame: the one a
        # request waited for may be the second view.
        self._send_next_request(now)

    def _stamp(self, header, topic: str) -> tuple[float, float]:
        """(stamp, age on arrival) of a sensor message; an unstamped one counts as taken on arrival."""
        now = self._now()
        stamp = stamp_to_sec(header.stamp)
        if stamp == 0.0:
            if topic not in self._unstamped_warned:
                self._unstamped_warned.add(topic)
                self.get_logger().warning(f"{topic} messages have no header stamp; using arrival time "
                                          "(latency unknown)")
            return now, 0.0
        return stamp, now - stamp

    def _on_pose(self, msg: PoseStamped) -> None:
        if self.core is None:
            return
        stamp, age = self._stamp(msg.header, "ee_pose")
        p, q = msg.pose.position, msg.pose.orientation
        self.core.on_state(time.monotonic(), ee_position=(p.x, p.y, p.z), ee_orientation=(q.w, q.x, q.y, q.z),
                           stamp=stamp, age_s=age)

    def _on_joint_state(self, msg: JointState) -> None:
        if self.core is None:
            return
        try:
            reading = map_joint_state(msg.name, msg.position, self.joints)
        except JointStateError as exc:
            self.core.counters["joint_states_invalid"] += 1
            self.get_logger().warning(f"ignoring joint_states: {exc}", throttle_duration_sec=5.0)
            return
        if reading.gripper is None and reading.joint_positions is None:
            return  # a message about other joints (drivers may publish one per controller)
        stamp, age = self._stamp(msg.header, "joint_states")
        self.core.on_state(time.monotonic(), gripper=reading.gripper, joint_positions=reading.joint_positions,
                           gripper_positions=reading.gripper_positions, stamp=stamp, age_s=age)

    def _on_instruction(self, msg: String) -> None:
        if not self._active:
            self.get_logger().warning("instruction ignored: the policy node is not active", throttle_duration_sec=2.0)
            return
        text = msg.data.strip()
        if not text:
            self._end_episode(Outcome.PREEMPTED, "stopped by an empty instruction")
            self.get_logger().info("empty instruction: idle")
            return
        self._start_episode(text, None)

    def _on_safety_status(self, msg: SafetyStatus) -> None:
        reasons = ", ".join(msg.reasons)[:300]
        ending = self.tracker.on_safety_status(uuid_bytes(msg.episode_id), msg.state_name, reasons, time.monotonic())
        if ending is not None:
            self._end_episode(ending.outcome, ending.message, announce=False)

    # -- backend requests -------------------------------------------------------------------------
    def _service_requests(self) -> None:
        core = self.core
        if core is None:
            return
        now = time.monotonic()
        ending = self.tracker.check(now)
        if ending is not None:
            self._end_episode(ending.outcome, ending.message)
        self._reannounce(now)
        for seq in core.abandon_overdue(now):
            self.get_logger().warning(f"request {seq} abandoned: no reply within {self.config.backend_timeout_s} s")
        self._on_reply_ready()
        self._send_next_request(now)

    def _send_next_request(self, now: float) -> None:
        """Send the next observation to the backend if one is due (the core paces and picks the frame)."""
        core = self.core
        if core is None or not self._backend_ready(now):
            return
        request = core.next_request(now)
        if request is not None:
            future = self._workers.submit(self.backend.infer, request.observation, self.config.backend_timeout_s)
            seq = request.observation.seq
            future.add_done_callback(lambda f, seq=seq: self._call_done(seq, f))

    def _call_done(self, seq: int, future: Future) -> None:
        """On the worker thread: hand the outcome to the executor and wake it."""
        self._results.put((seq, None if future.exception() else future.result(), future.exception(),
                           time.monotonic()))
        guard = getattr(self, "_reply_ready", None)
        if guard is not None:
            with contextlib.suppress(Exception):  # destroyed by a cleanup meanwhile: the poll picks it up
                guard.trigger()

    def _on_reply_ready(self) -> None:
        """Handle finished calls, then release an action at once if one is due (a reply executes on arrival)."""
        core = self.core
        if core is None:
            return
        was_idle = core.queued == 0
        outcomes = []
        while True:
            try:
                seq, reply, error, done_at = self._results.get_nowait()
            except queue.Empty:
                break
            outcomes.append((self.get_clock().now().to_msg(), core.on_reply(seq, reply, error, done_at)))
        if outcomes:
            self._execute_step(release_when_due=was_idle)  # the action first: tokens and plan are for people
            for arrived, outcome in outcomes:
                self._handle_outcome(outcome, arrived)

    def _backend_ready(self, now: float) -> bool:
        """The backend's reset for this episode finished (or failed, or overran its deadline)."""
        fut = self._reset_future
        if fut is None:
            return True
        if fut.done():
            self._reset_future = None
            if fut.exception() is not None:
                self.errors["backend_reset_errors"] += 1
                self.get_logger().warning(f"backend reset failed: {type(fut.exception()).__name__}: "
                                          f"{clean_text(fut.exception(), 200)}", throttle_duration_sec=2.0)
            return True
        if now - self._reset_started > self.config.backend_timeout_s:
            self._reset_future = None
            self.errors["backend_reset_timeouts"] += 1
            self.get_logger().warning(f"backend reset took over {self.config.backend_timeout_s} s; going on",
                                      throttle_duration_sec=2.0)
            return True
        return False

    def _handle_outcome(self, outcome: ReplyOutcome, arrived) -> None:
        self._last_outcome = outcome
        msg = ActionTokens()
        msg.header.stamp = arrived  # when the reply was taken in, not when this diagnostic went out
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
            self._last_plan = outcome.plan
            self.plan_pub.publish(String(data=outcome.plan))
        if not outcome.accepted:
            self.get_logger().warning(f"reply {outcome.seq} not executed ({outcome.reason}): {outcome.detail}",
                                      throttle_duration_sec=1.0)

    # -- execution --------------------------------------------------------------------------------
    def _execute_on_timer(self) -> None:
        self._execute_step(on_timer=True)

    def _execute_step(self, on_timer: bool = False, release_when_due: bool = False) -> None:
        core = self.core
        if core is None or not self._active or not self.tracker.may_execute:
            return  # actions wait in the queue until the safety node executes this episode
        now = time.monotonic()
        action = core.pop_action(now)
        if action is None:
            if release_when_due and core.queued == 1 and (wait := core.release_due_in(now)) > 0:
                # A one-action reply to an idle queue that came under 3/4 period after the last release
                # goes out when that gate opens, not at the execute timer's next tick: the request
                # pacing and the timer can lock into a phase where every reply waits most of a period
                # (action age p50 92 instead of 24 ms at a 0 ms backend, bench/control.py). A chunk
                # keeps the timer's regular period.
                self._owned.arm("release", wait)
            return
        ep = self.tracker.current
        assert ep is not None
        self.action_pub.publish(self._to_msg(action, ep.episode_id))
        if not on_timer:
            # Released on a reply: the next release one full period after this one. A release on the
            # timer's own tick keeps the timer's grid (re-arming it would add the callback's latency to
            # every period: 9.6 instead of 10 actions/s from a chunk, measured with bench/control.py).
            self._owned.reset_timer("execute")
        self._steps += 1
        self._last_action_age = self._now() - action.observation_stamp
        if action.terminate:
            self.get_logger().info(f"episode {short_id(ep.episode_id)}: terminate token sent to the safety node")

    def _to_msg(self, action: ArmAction, episode_id: bytes) -> ArmActionMsg:
        msg = ArmActionMsg()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self.config.base_frame
        msg.observation_seq = max(0, action.observation_seq)
        msg.observation_stamp = sec_to_stamp(action.observation_stamp)
        msg.episode_id = uuid_msg(episode_id)
        msg.translation.x, msg.translation.y, msg.translation.z = (float(v) for v in action.translation)
        msg.rotation.x, msg.rotation.y, msg.rotation.z = (float(v) for v in action.rotation)
        msg.gripper = float(action.gripper)
        msg.gripper_relative = action.gripper_relative
        msg.terminate = action.terminate
        return msg

    # -- diagnostics ------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        core = self.core
        if core is None:
            return
        c = core.counters
        errors = c["backend_errors"] + c["replies_invalid"]
        status = DiagnosticStatus(name="rt2_policy: backend", hardware_id=core.backend_name)
        last = self._last_outcome
        if last is not None and not last.accepted and last.reason in ("backend_error", "invalid_tokens"):
            status.level, status.message = DiagnosticStatus.ERROR, f"{last.reason}: {last.detail}"[:200]
        elif core.active and not math.isnan(core.last_latency_s) and \
                core.last_latency_s > self.config.backend_timeout_s:
            status.level, status.message = DiagnosticStatus.WARN, "backend slower than its timeout"
        else:
            status.level, status.message = DiagnosticStatus.OK, "running" if core.active else "idle"
        ep = self.tracker.current
        values = {"episode_id": short_id(ep.episode_id) if ep else "none", "instruction": core.instruction,
                  "active": self._active, "last_latency_s": f"{core.last_latency_s:.3f}", "errors": errors,
                  "queued": core.queued, **{k: v for k, v in sorted(c.items())},
                  **{k: v for k, v in sorted(self.errors.items())}}
        status.values = [KeyValue(key=str(k), value=str(v)[:200]) for k, v in values.items()]
        arr = DiagnosticArray(status=[status])
        arr.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(arr)

    def close(self) -> None:
        self._end_episode(Outcome.ABORTED, "the policy node shut down")
        self._teardown()
        self._action_server.destroy()


def main(args: list[str] | None = None) -> int:
    return run_node(PolicyNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
