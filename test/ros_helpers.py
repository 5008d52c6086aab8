"""Test helpers for real ROS 2 over DDS: an isolated domain per test run, a probe node, processes.

No mocks of rclpy: the nodes under test run in their own processes (``rt2-bringup``), and the
probe node in the test process talks to them over DDS on a private ROS_DOMAIN_ID restricted to
localhost, so parallel test runs on one machine never see each other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def isolate_ros_domain() -> int:
    """Pick a domain id from the pid (0..101 valid for FastDDS) and keep discovery on localhost.

    ``RT2_TEST_ROS_DOMAIN`` pins it instead: concurrent test runs on one machine (several checkouts)
    then cannot meet by a pid collision.
    """
    pinned = os.environ.get("RT2_TEST_ROS_DOMAIN", "")
    domain = int(pinned) if pinned else 1 + os.getpid() % 100
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    return domain


def write_params(path: Path, policy: dict | None = None, safety: dict | None = None, sim: dict | None = None) -> Path:
    """A ROS 2 params file from flat dotted dicts (only the nodes given)."""
    doc = {}
    for node, flat in (("rt2_policy", policy), ("rt2_safety", safety), ("rt2_sim", sim)):
        if flat is not None:
            doc[node] = {"ros__parameters": dict(flat)}
    path.write_text(yaml.safe_dump(doc))
    return path


NO_EPISODE = bytes(16)
# What each rt2-bringup role subscribes to among the probe's publishers (attribute names): the
# safety node to ee_pose and arm_action, the policy node to ee_pose, joint_states, the camera and
# instruction (publishers the probe has not made are skipped).
SUBSCRIBES = {
    "both": {"pose_pub": 2, "image_pub": 1, "joint_pub": 1, "instruction": 1, "straggler": 1},
    "safety": {"pose_pub": 1, "straggler": 1},
    "policy": {"pose_pub": 1, "image_pub": 1, "joint_pub": 1, "instruction": 1},
}
PERIODIC = ("pose_pub", "image_pub", "joint_pub")
CAMERA_PREFIX = "camera:"  # match_baselines key of a camera topic given by the test
# A Panda at rest with its fingers half open (0.02 m each: gripper closedness 0.5).
PANDA_JOINTS = {"panda_joint1": 0.0, "panda_joint2": -0.785, "panda_joint3": 0.0, "panda_joint4": -2.356,
                "panda_joint5": 0.0, "panda_joint6": 1.571, "panda_joint7": 0.785,
                "panda_finger_joint1": 0.02, "panda_finger_joint2": 0.02}


def uid(msg_uuid) -> bytes:
    """An episode id (unique_identifier_msgs/UUID) as 16 bytes, as the nodes read it."""
    from rt2_ros.episode import uuid_bytes

    return uuid_bytes(msg_uuid)


def start_bringup(params: Path, *extra: str, log: Path) -> subprocess.Popen:
    """``rt2-bringup`` in its own process (same interpreter, repo on sys.path)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    fh = open(log, "w")  # noqa: SIM115 - closed by the OS with the process
    return subprocess.Popen([sys.executable, "-m", "rt2_ros.nodes.bringup", "--params", str(params), *extra],
                            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(2)  # SIGINT: the clean Ctrl-C path
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)
    return proc.returncode


class Probe:
    """A node in the test process that records messages and lets tests wait on conditions."""

    def __init__(self, name: str = "rt2_test_probe") -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        if not rclpy.ok():
            rclpy.init()
        self.node = rclpy.create_node(name)
        self.messages: dict[str, list] = defaultdict(list)
        self._cond = threading.Condition()
        self._executor = SingleThreadedExecutor()
        self._executor.add_node(self.node)
        self._clients: dict = {}
        # Held by the spin thread around each spin_once; entities that rclpy registers half-built take it
        # (ActionClient.__init__ adds itself as a waitable before it has its _lock: a spin_once in between
        # raised AttributeError and killed this thread, failing every later test of the module).
        self.spin_lock = threading.Lock()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._running = True
        self._thread.start()

    def _spin(self) -> None:
        while self._running:
            with self.spin_lock:
                self._executor.spin_once(timeout_sec=0.05)
            time.sleep(0)  # let a thread waiting for spin_lock in

    def record(self, msg_type, topic: str, qos, key: str | None = None) -> str:
        key = key or topic

        def cb(msg) -> None:
            with self._cond:
                self.messages[key].append((time.monotonic(), msg))
                self._cond.notify_all()

        self.node.create_subscription(msg_type, topic, cb, qos)
        return key

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
                self._cond.wait(min(left, 0.1))

    def since(self, key: str, t0: float) -> list:
        with self._cond:
            return [m for t, m in self.messages[key] if t >= t0]

    def publish_fake_sensors(self, period_s: float = 0.05, joints: dict[str, float] | None = None,
                             cameras: dict | None = None) -> Callable[[], None]:
        """Play camera and arm driver: a black 64x64 image on /camera/image and a fixed pose on
        /ee_pose every ``period_s`` (and with ``joints``, {name: position}, e.g. :data:`PANDA_JOINTS`,
        a JointState on /joint_states); returns a function that stops publishing (the timer and the
        publishers are destroyed), for tests that hand these topics to another node afterwards.
        ``self.pose_pub``, ``self.image_pub`` (and ``self.joint_pub``) (:class:`MatchedPublisher`) tell
        when a (re)started node subscribed and got a sample.

        ``cameras``, {topic: uint8 HxWx3 RGB frame}, replaces the black frame: every camera's frame on
        its topic, all with the same stamp (a topic ending in ``/compressed`` gets the frame as a JPEG
        sensor_msgs/CompressedImage). ``self.camera_pubs`` maps each topic to its publisher (that of
        /camera/image, if listed, is also ``self.image_pub``); pass the topics a node subscribes to
        :meth:`match_baselines` to wait for them."""
        import numpy as np
        from geometry_msgs.msg import PoseStamped
        from sensor_msgs.msg import CompressedImage, Image, JointState

        from rt2_ros.imaging import encode_jpeg
        from rt2_ros.nodes.common import rgb_to_image_msg

        if cameras is None:
            cameras = {"/camera/image": np.zeros((64, 64, 3), dtype=np.uint8)}
        camera_pubs = self.camera_pubs = {
            topic: MatchedPublisher(self, CompressedImage if topic.endswith("/compressed") else Image, topic, 10)
            for topic in cameras}
        if "/camera/image" in camera_pubs:
            self.image_pub = camera_pubs["/camera/image"]
        jpegs = {topic: encode_jpeg(frame) for topic, frame in cameras.items() if topic.endswith("/compressed")}
        pose_pub = self.pose_pub = MatchedPublisher(self, PoseStamped, "/ee_pose", 10)
        joint_pub = None
        if joints is not None:
            joint_pub = self.joint_pub = MatchedPublisher(self, JointState, "/joint_states", 10)

        def publish() -> None:
            now = self.node.get_clock().now().to_msg()
            for topic, frame in cameras.items():
                frame_id = topic.strip("/").split("/")[0]
                if topic in jpegs:
                    msg = CompressedImage(format="jpeg", data=jpegs[topic])
                    msg.header.stamp, msg.header.frame_id = now, frame_id
                else:
                    msg = rgb_to_image_msg(frame, now, frame_id)
                camera_pubs[topic].publish(msg)
            pose = PoseStamped()
            pose.header.stamp, pose.header.frame_id = now, "panda_link0"
            pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = 0.45, 0.0, 0.3
            pose.pose.orientation.w = 1.0
            pose_pub.publish(pose)
            if joint_pub is not None:
                js = JointState(name=list(joints), position=[float(v) for v in joints.values()])
                js.header.stamp = now
                joint_pub.publish(js)

        timer = self.node.create_timer(period_s, publish)

        def stop_publishing() -> None:
            self.node.destroy_timer(timer)
            for pub in camera_pubs.values():
                self.node.destroy_publisher(pub.pub)
            self.node.destroy_publisher(pose_pub.pub)
            if joint_pub is not None:
                self.node.destroy_publisher(joint_pub.pub)

        return stop_publishing

    def latest(self, key: str):
        """The last message recorded under ``key``, or None."""
        with self._cond:
            msgs = self.messages[key]
            return msgs[-1][1] if msgs else None

    def match_baselines(self, role: str, camera_topics: Iterable[str] | None = None) -> dict[str, int]:
        """The match totals of the probe's publishers that ``role`` subscribes to (take before starting it).

        ``camera_topics``: the camera topics (keys of ``self.camera_pubs``) the policy node of this start
        subscribes to, instead of /camera/image alone (configs with several cameras)."""
        names = [n for n in SUBSCRIBES[role] if camera_topics is None or n != "image_pub"]
        totals = {name: getattr(self, name).total for name in names if hasattr(self, name)}
        if camera_topics is not None and role in ("both", "policy"):
            totals.update({CAMERA_PREFIX + topic: self.camera_pubs[topic].total for topic in camera_topics})
        return totals

    def wait_started(self, proc: subprocess.Popen, role: str, baselines: dict[str, int], t0: float,
                     log: Path | None = None, timeout: float = 20.0) -> None:
        """Until the rt2-bringup ``role`` started at ``t0`` is up: the safety node's status (recorded under
        "status") arrived, and every probe publisher matched each new subscription (and the sensors kept
        publishing after that). AssertionError with the log if not, or if the process exited."""
        try:
            if role in ("both", "safety"):
                self.wait_for(lambda: proc.poll() is not None or bool(self.since("status", t0)), timeout,
                              f"the {role} process's safety status")
                assert proc.poll() is None, f"the {role} process exited with {proc.returncode}"
            for name, baseline in baselines.items():
                if name.startswith(CAMERA_PREFIX):  # a camera topic of match_baselines(camera_topics=...)
                    self.camera_pubs[name[len(CAMERA_PREFIX):]].wait_delivered(baseline, timeout, proc, 1)
                    continue
                pub, n = getattr(self, name), SUBSCRIBES[role][name]
                if name in PERIODIC:
                    pub.wait_delivered(baseline, timeout, proc, n)
                else:
                    pub.wait_new_match(baseline, timeout, proc, n)
        except AssertionError as exc:
            text = log.read_text() if log is not None and log.exists() else ""
            raise AssertionError(f"{exc}\n--- {log.name if log else 'log'} ---\n{text}") from None

    def take_episode(self, send: Callable[[], object], attempts: int = 3) -> tuple[object, float, bytes, int]:
        """Start an episode with ``send()`` (an instruction or a goal) until the safety node takes it.

        :meth:`wait_started` waits for every match the probe can see, but not for those it cannot: a
        best-effort ee_pose reader that matched the probe's writer a moment after the writer matched
        it, or (safety and policy node in two processes) the policy's episode publisher and the
        safety node's subscription; DDS discovery of a fresh process now and then takes seconds.
        The episode then fails as designed (no fresh ee_pose: FAULT; announcement lost: FAULT after
        policy.safety_ack_timeout_s) and, like an operator, this sends again. Returns (what
        ``send`` returned, its send time, the episode id, the attempts used).
        """
        for attempt in range(1, attempts + 1):
            with self._cond:
                known = {uid(m.episode_id) for _, m in self.messages["status"]} | {NO_EPISODE}
            t = time.monotonic()
            sent = send()
            try:
                self.wait_for(lambda known=known: (st := self.latest("status")) is not None
                              and uid(st.episode_id) not in known, 2.5, "the safety node to take the episode")
            except AssertionError:
                if attempt == attempts:
                    raise
                continue
            st = self.latest("status")
            if st.state_name in ("RUNNING", "HOLDING"):
                return sent, t, uid(st.episode_id), attempt
            if attempt == attempts:
                raise AssertionError(f"the safety node refused the episode: {st.state_name} {list(st.reasons)}")
        raise AssertionError("unreachable")

    def publisher(self, msg_type, topic: str, qos) -> MatchedPublisher:
        """A publisher that counts its matched subscriptions (see :class:`MatchedPublisher`)."""
        return MatchedPublisher(self, msg_type, topic, qos)

    def call(self, srv_type, name: str, request, timeout: float = 5.0, retry: bool = False):
        """Call service ``name`` and return the response; AssertionError if it is absent or silent.

        ``wait_for_service`` is also satisfied by a server of a SIGKILLed process, which DDS keeps in
        the graph until its lease ends (~20 s): a request sent then reaches only the dead server if
        the new one has not matched yet. With ``retry`` (idempotent services only) an unanswered
        request is sent again every second until ``timeout``.
        """
        key = (srv_type, name)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = self.node.create_client(srv_type, name)
        deadline = time.monotonic() + timeout
        if not client.wait_for_service(timeout_sec=timeout):
            raise AssertionError(f"service {name} not available within {timeout:.1f} s")
        while True:
            future = client.call_async(request)
            left = deadline - time.monotonic()
            try:
                self.wait_for(future.done, max(0.0, min(left, 1.0) if retry else left), f"the reply of {name}")
                return future.result()
            except AssertionError:
                client.remove_pending_request(future)
                if not retry or time.monotonic() >= deadline:
                    raise AssertionError(f"no reply of {name} within {timeout:.1f} s") from None

    def wait_answering(self, node: str, timeout: float = 10.0) -> None:
        """Until ``node`` answers a parameter query: the live process, not a dead one's leftovers, is
        matched both ways. Call before a service that must not be sent twice (estop, change_state)."""
        from rcl_interfaces.srv import GetParameters

        self.call(GetParameters, f"/{node}/get_parameters", GetParameters.Request(names=[]), timeout, retry=True)

    def set_parameters(self, node: str, values: dict, timeout: float = 5.0) -> list:
        """``ros2 param set``: one SetParametersResult per value (each set on its own, like the CLI)."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        self.wait_answering(node, timeout)
        results = []
        for name, value in values.items():
            req = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
            results += list(self.call(SetParameters, f"/{node}/set_parameters", req, timeout).results)
        return results

    def get_parameters(self, node: str, names: list[str], timeout: float = 5.0) -> list:
        """The values of ``names`` on ``node`` (Python values; None for an unset one)."""
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        resp = self.call(GetParameters, f"/{node}/get_parameters", GetParameters.Request(names=names), timeout,
                         retry=True)
        return [parameter_value_to_python(v) for v in resp.values]

    def lifecycle_state(self, node: str, timeout: float = 5.0) -> str:
        """The lifecycle state label of ``node`` (e.g. "unconfigured", "active")."""
        from lifecycle_msgs.srv import GetState

        return self.call(GetState, f"/{node}/get_state", GetState.Request(), timeout, retry=True).current_state.label

    def change_state(self, node: str, transition: str, timeout: float = 10.0) -> bool:
        """``ros2 lifecycle set <node> <transition>`` (configure, activate, deactivate, cleanup); its success."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        req = ChangeState.Request()
        req.transition.id = getattr(Transition, f"TRANSITION_{transition.upper()}")
        self.wait_answering(node, timeout)
        return bool(self.call(ChangeState, f"/{node}/change_state", req, timeout).success)

    def endpoint_gids(self, topic: str, kind: str = "subscriptions") -> set[bytes]:
        """GIDs of the publishers or subscriptions on ``topic`` in the ROS graph (stale ones included)."""
        info = (self.node.get_subscriptions_info_by_topic if kind == "subscriptions"
                else self.node.get_publishers_info_by_topic)(topic)
        return {bytes(e.endpoint_gid) for e in info}

    def wait_new_endpoint(self, topic: str, known: set[bytes], timeout: float, kind: str = "subscriptions") -> None:
        """Until the graph shows an endpoint on ``topic`` that is not in ``known`` (a restarted node's)."""
        self.wait_for(lambda: bool(self.endpoint_gids(topic, kind) - known), timeout,
                      f"a new {kind[:-1]} on {topic}")

    def close(self) -> None:
        self._running = False
        self._thread.join(2.0)
        self._executor.remove_node(self.node)
        self.node.destroy_node()


class MatchedPublisher:
    """A publisher that counts the subscriptions it matched, in the writer's own view.

    On a volatile topic a message published before the subscriber's reader matched is lost, and
    ``get_subscription_count()`` cannot tell a restarted node's subscription from the one of the
    SIGKILLed process it replaces (DDS keeps a dead participant's endpoints until its lease runs
    out). The matched event's running total can: take ``total`` before (re)starting a node and
    :meth:`wait_new_match` for it to grow.
    """

    def __init__(self, probe: Probe, msg_type, topic: str, qos) -> None:
        from rclpy.event_handler import PublisherEventCallbacks

        self._probe = probe
        self.topic = topic
        self.total = 0  # subscriptions matched so far (never decreases)
        self.current = 0  # matched now, dead-but-not-expired ones included
        self.matched_at = 0.0  # monotonic time of the last match event
        self.published_at = 0.0  # monotonic time of the last publish
        self.pub = probe.node.create_publisher(msg_type, topic, qos,
                                               event_callbacks=PublisherEventCallbacks(matched=self._on_matched))

    def _on_matched(self, info) -> None:
        with self._probe._cond:
            self.total, self.current = info.total_count, info.current_count
            self.matched_at = time.monotonic()
            self._probe._cond.notify_all()

    def wait_new_match(self, baseline: int, timeout: float, proc: subprocess.Popen | None = None, n: int = 1) -> None:
        """Until ``n`` subscriptions beyond the first ``baseline`` matched (or ``proc`` exited).

        Count every subscriber a start brings: DDS discovery of a fresh process matches endpoints
        piecemeal and now and then only after its next periodic announcement (seconds later).
        """
        self._probe.wait_for(lambda: self.total >= baseline + n or (proc is not None and proc.poll() is not None),
                             timeout, f"{n} new subscription(s) on {self.topic} to match")
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited with {proc.returncode} before it subscribed to {self.topic}")

    def wait_delivered(self, baseline: int, timeout: float, proc: subprocess.Popen | None = None, n: int = 1,
                       flow_s: float = 0.15) -> None:
        """:meth:`wait_new_match`, then until this periodic publisher kept publishing for ``flow_s`` after
        the last match: the writer matches first, and a best-effort reader drops what arrives before
        it matched the writer in turn (usually within milliseconds)."""
        self.wait_new_match(baseline, timeout, proc, n)
        self._probe.wait_for(lambda: self.published_at > self.matched_at + flow_s, timeout,
                             f"{flow_s} s of publishing on {self.topic}")

    def publish(self, msg) -> float:
        """Publish ``msg``; returns the monotonic time just before."""
        t = time.monotonic()
        self.pub.publish(msg)
        self.published_at = t
        return t


class GoalClient:
    """An ExecuteInstruction action client on the probe node: send, cancel, wait for results."""

    def __init__(self, probe: Probe, action: str = "/rt2_policy/execute_instruction") -> None:
        from rclpy.action import ActionClient

        from rt2_ros_interfaces.action import ExecuteInstruction

        self._probe = probe
        self.Goal = ExecuteInstruction.Goal
        self.Result = ExecuteInstruction.Result
        with probe.spin_lock:  # never spun while half-built (see Probe.spin_lock)
            self.client = ActionClient(probe.node, ExecuteInstruction, action)
        self.feedback: list = []

    def _on_feedback(self, msg) -> None:
        with self._probe._cond:
            self.feedback.append((time.monotonic(), msg.feedback))
            self._probe._cond.notify_all()

    def send(self, instruction: str, time_limit_s: float = 0.0, timeout: float = 15.0):
        """Send a goal; returns (goal handle, monotonic send time). AssertionError unless accepted."""
        if not self.client.wait_for_server(timeout_sec=timeout):
            raise AssertionError(f"no ExecuteInstruction server within {timeout:.1f} s")
        t = time.monotonic()
        future = self.client.send_goal_async(self.Goal(instruction=instruction, time_limit_s=float(time_limit_s)),
                                             feedback_callback=self._on_feedback)
        self._probe.wait_for(future.done, timeout, f"goal {instruction!r} to be accepted or rejected")
        handle = future.result()
        assert handle is not None and handle.accepted, f"goal {instruction!r} was rejected"
        return handle, t

    def result(self, handle, timeout: float):
        """(GoalStatus code, ExecuteInstruction.Result) of ``handle`` once it ended."""
        future = handle.get_result_async()
        self._probe.wait_for(future.done, timeout, "the goal's result")
        wrapped = future.result()
        return wrapped.status, wrapped.result

    def destroy(self) -> None:
        with self._probe.spin_lock:
            self.client.destroy()
