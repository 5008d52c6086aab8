"""The episode protocol over real DDS: restarts, e-stop, stragglers, goals, lifecycle, live parameters.

The nodes run in ``rt2-bringup`` processes; where a scenario restarts one node, the safety and
the policy node run in separate processes (``--no-policy`` / ``--no-safety``) so one can be
SIGKILLed and started again. The probe node here plays camera, arm driver and operator and
records what reaches the controller. Every wait is bounded; absence of motion is checked over a
window of keep-alive twists. Measured latencies are printed (``pytest -s``) and written to
:data:`MEASUREMENTS`.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from action_msgs.msg import GoalStatus  # noqa: E402
from geometry_msgs.msg import TwistStamped  # noqa: E402
from std_msgs.msg import Float64, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from rt2_ros.nodes.common import ACTION_QOS, COMMAND_QOS, EVENT_QOS, LATCHED_QOS  # noqa: E402
from rt2_ros_interfaces.msg import ArmAction, Episode, SafetyStatus  # noqa: E402
from test.ros_helpers import (  # noqa: E402
    NO_EPISODE,
    GoalClient,
    Probe,
    isolate_ros_domain,
    start_bringup,
    stop,
    uid,
    write_params,
)

MEASUREMENTS = "/tmp/rt2_episode_measurements.txt"
MOVE_X = "0 160 128 128 128 128 128 0"  # +x 5 mm per step, gripper open (rt2 profile)
RATE_HZ = 30.0
WATCHDOG_S = 0.6
SAFETY = {"safety.watchdog_timeout_s": WATCHDOG_S, "safety.command_rate_hz": RATE_HZ}
POLICY = {"backend.type": "scripted", "backend.timeout_s": 3.0, "policy.max_reply_age_s": 3.5,
          "policy.max_action_age_s": 4.0, "backend.scripted.answers": [MOVE_X],
          "backend.scripted.delays_s": [0.0], "backend.scripted.repeat": True, "policy.execute_rate_hz": 10.0}
# One command period plus DDS and scheduling on a loaded 2-core machine.
STOP_MARGIN_S = 1.0 / RATE_HZ + 0.067
OUTCOME = {"TERMINATED": 0, "TIME_LIMIT": 1, "CANCELLED": 2, "PREEMPTED": 3, "ESTOPPED": 4, "FAULT": 5}


# -- fixtures and helpers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probe():
    isolate_ros_domain()
    with open(MEASUREMENTS, "w") as fh:
        fh.write("# rt2_ros episode protocol over DDS: measured latencies (test/test_episode_dds.py)\n")
    p = Probe("rt2_episode_probe")
    p.record(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS, "twist")
    p.record(ArmAction, "/arm_action", ACTION_QOS, "action")
    p.record(SafetyStatus, "/rt2_safety/status", LATCHED_QOS, "status")
    p.record(Float64, "/gripper_command", COMMAND_QOS, "gripper")
    p.record(Episode, "/episode", EVENT_QOS, "episode")
    p.publish_fake_sensors()  # the probe is the camera and the arm driver
    p.instruction = p.publisher(String, "/instruction", EVENT_QOS)
    p.straggler = p.publisher(ArmAction, "/arm_action", ACTION_QOS)  # plays a stale or misbehaving policy
    yield p
    p.close()


def measure(name: str, seconds: float, note: str = "") -> None:
    line = f"{name}: {seconds * 1e3:.1f} ms{f' ({note})' if note else ''}"
    print(f"\n[measured] {line}", flush=True)
    with open(MEASUREMENTS, "a") as fh:
        fh.write(line + "\n")


class Stack:
    """rt2-bringup processes sharing one params file: ``both`` nodes, or ``safety`` / ``policy`` alone."""

    FLAGS: ClassVar[dict[str, tuple[str, ...]]] = {"both": (), "safety": ("--no-policy",), "policy": ("--no-safety",)}

    def __init__(self, probe: Probe, tmp_path, policy: dict | None = None, safety: dict | None = None) -> None:
        self.probe, self.tmp_path = probe, tmp_path
        self.params = write_params(tmp_path / "params.yaml", policy={**POLICY, **(policy or {})},
                                   safety={**SAFETY, **(safety or {})})
        self.procs: dict = {}
        self.logs: dict = {}
        self._n = 0

    def start(self, role: str = "both", *args: str, ready: bool = True) -> float:
        """Start ``role``; with ``ready`` wait until it is up (:meth:`Probe.wait_started`). Returns the
        monotonic time before the start."""
        self._n += 1
        log = self.tmp_path / f"{role}-{self._n}.log"
        baselines = self.probe.match_baselines(role)
        t0 = time.monotonic()
        proc = start_bringup(self.params, *self.FLAGS[role], *args, log=log)
        self.procs[role], self.logs[role] = proc, log
        if ready:
            self.probe.wait_started(proc, role, baselines, t0, log)
        return t0

    def kill(self, role: str) -> None:
        proc = self.procs[role]
        proc.kill()  # SIGKILL: no close(), no last zero twist, DDS endpoints left behind until their lease ends
        proc.wait(5)

    def log(self, role: str) -> str:
        return self.logs[role].read_text() if role in self.logs else ""

    def alive(self, role: str) -> bool:
        return self.procs[role].poll() is None

    def close(self) -> dict[str, int]:
        return {role: stop(proc) for role, proc in self.procs.items()}


@pytest.fixture()
def stack(probe, tmp_path):
    """A factory of :class:`Stack`; every process still running at the end must exit cleanly (0)."""
    made: list[Stack] = []

    def make(**kwargs) -> Stack:
        s = Stack(probe, tmp_path, **kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        running = {role for role, proc in s.procs.items() if proc.poll() is None}
        codes = s.close()
        bad = {role: rc for role, rc in codes.items() if role in running and rc != 0}
        assert not bad, f"unclean exit {bad}:\n" + "\n".join(f"--- {r} ---\n{s.log(r)}" for r in bad)


def latest_status(probe: Probe):
    return probe.latest("status")


def wait_status(probe: Probe, pred: Callable, timeout: float, what: str):
    """The latest status once it satisfies ``pred``."""
    probe.wait_for(lambda: (s := latest_status(probe)) is not None and pred(s), timeout, what)
    return latest_status(probe)


def drops(status) -> dict[str, int]:
    return dict(zip(status.drop_causes, status.drop_counts, strict=True))


def linear(tw) -> np.ndarray:
    return np.array([tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z])


def is_zero(tw) -> bool:
    a = tw.twist.angular
    return bool(np.allclose(linear(tw), 0.0) and np.allclose([a.x, a.y, a.z], 0.0))


def timed(probe: Probe, key: str, t0: float) -> list[tuple[float, object]]:
    with probe._cond:
        return [(t, m) for t, m in probe.messages[key] if t >= t0]


def first_time(probe: Probe, key: str, t0: float, pred: Callable, timeout: float, what: str) -> float:
    """Arrival time of the first ``key`` message after ``t0`` that satisfies ``pred``."""
    found: list[float] = []

    def check() -> bool:
        found[:] = [t for t, m in timed(probe, key, t0) if pred(m)][:1]
        return bool(found)

    probe.wait_for(check, timeout, what)
    return found[0]


def wait_motion(probe: Probe, t0: float, timeout: float = 10.0) -> float:
    return first_time(probe, "twist", t0, lambda m: linear(m)[0] > 1e-3, timeout, "+x motion at the controller")


def wait_twists(probe: Probe, t0: float, n: int, timeout: float = 5.0) -> list:
    """At least ``n`` twists after ``t0`` (the window to inspect); returns them."""
    probe.wait_for(lambda: len(probe.since("twist", t0)) >= n, timeout, f"{n} twists")
    return probe.since("twist", t0)


def assert_held(probe: Probe, t0: float, n: int = 12) -> None:
    """Over a window of ``n`` keep-alive twists after ``t0``: every one is zero."""
    window = wait_twists(probe, t0, n)
    moving = [linear(m) for m in window if not is_zero(m)]
    assert not moving, f"{len(moving)} of {len(window)} twists move after the stop, e.g. {moving[0]}"


STRAGGLER_SEQ = 10**6  # observation_seq of the probe's own ArmActions (it records /arm_action too)


def policy_actions(probe: Probe, t0: float) -> list:
    """The ArmActions the policy node sent after ``t0`` (not the probe's own)."""
    return [a for a in probe.since("action", t0) if a.observation_seq < STRAGGLER_SEQ]


def say(probe: Probe, text: str) -> float:
    return probe.instruction.publish(String(data=text))


def running_episode(probe: Probe, t0: float, timeout: float = 10.0) -> bytes:
    """The episode the safety node runs once motion started after ``t0``."""
    wait_motion(probe, t0, timeout)
    s = wait_status(probe, lambda s: s.state_name == "RUNNING" and uid(s.episode_id) != NO_EPISODE, 5.0,
                    "a RUNNING status")
    return uid(s.episode_id)


def trigger(probe: Probe, name: str) -> Trigger.Response:
    """Call a std_srvs/Trigger service of the safety node (estop, reset) once."""
    probe.wait_answering("rt2_safety")
    return probe.call(Trigger, name, Trigger.Request())


def arm_action(episode_id: bytes, frame: str = "panda_link0", z: float = 0.0, seq: int = STRAGGLER_SEQ) -> ArmAction:
    msg = ArmAction()
    msg.header.frame_id = frame
    msg.episode_id.uuid = list(episode_id)
    msg.observation_seq = seq
    msg.translation.z = z
    return msg


def begin(probe: Probe, send: Callable[[], object]) -> tuple[object, float, bytes]:
    """:meth:`Probe.take_episode`, then until the arm moves; returns (what ``send`` returned, send time, episode)."""
    sent, t, ep, _ = probe.take_episode(send)
    assert running_episode(probe, t) == ep
    return sent, t, ep


# -- a. restart of the policy node ------------------------------------------------------------------
def test_policy_restart_mid_episode_holds_then_a_fresh_instruction_moves(probe, stack):
    s = stack()
    s.start("safety")
    s.start("policy")
    _, _, old = begin(probe, lambda: say(probe, "push the block forward"))

    t_kill = time.monotonic()
    s.kill("policy")
    st = wait_status(probe, lambda st: st.state_name == "HOLDING" and uid(st.episode_id) == old,
                     WATCHDOG_S + 2.0, "the watchdog hold of the orphaned episode")
    # the watchdog, or (on a loaded machine, a last action whose frame was already old) the
    # stale-target rule: either is the safety node holding the orphaned episode on its own
    assert st.watchdog_trips >= 1 or "hold:stale_action" in list(st.drop_causes), st
    assert_held(probe, t_kill + WATCHDOG_S + STOP_MARGIN_S)
    assert s.alive("safety")

    t_restart = s.start("policy")
    t_ready = time.monotonic()
    _, t_say, new, attempts = probe.take_episode(lambda: say(probe, "push the block forward again"))
    t_taken = first_time(probe, "status", t_say, lambda st: uid(st.episode_id) == new, 1.0, "the status naming it")
    t_action = first_time(probe, "action", t_say, lambda a: uid(a.episode_id) == new, 10.0, "its first action")
    t_move = wait_motion(probe, t_say)
    assert running_episode(probe, t_say) == new and new != old
    assert {uid(a.episode_id) for a in policy_actions(probe, t_say)} == {new}
    measure("policy SIGKILL+restart -> first non-zero twist", t_move - t_restart,
            f"process start -> the probe's subscriptions matched {1e3 * (t_ready - t_restart):.0f} ms; last "
            f"instruction -> episode taken {1e3 * (t_taken - t_say):.0f} ms -> first action seen "
            f"{1e3 * (t_action - t_say):.0f} ms -> first non-zero twist {1e3 * (t_move - t_say):.0f} ms; "
            f"{attempts} instruction(s) sent")


# -- b. restart of the safety node ------------------------------------------------------------------
def test_safety_restart_mid_episode_ends_the_episode_and_never_resumes_it(probe, stack):
    s = stack()
    s.start("safety")
    s.start("policy")
    goals = GoalClient(probe)
    try:
        (handle, t0), _, old = begin(probe, lambda: goals.send("keep pushing"))
        probe.wait_for(lambda: len(probe.since("gripper", t0)) >= 1, 3.0, "a gripper command of the episode")

        s.kill("safety")
        t_restart = s.start("safety")
        # The restarted node knows no episode: the policy ends its goal with FAULT instead of resuming.
        status, result = goals.result(handle, 10.0)
        assert result.outcome == OUTCOME["FAULT"], (result.outcome_name, result.message)
        assert status == GoalStatus.STATUS_ABORTED
        assert uid(result.episode_id) == old and "restarted, reset or deactivated" in result.message
        t_end = time.monotonic()
        policy_actions_after = len([a for a in policy_actions(probe, t_restart) if uid(a.episode_id) == old])

        # A policy that has not noticed yet keeps sending the old episode's actions: none is executed.
        for i in range(10):
            probe.straggler.publish(arm_action(old, z=0.02, seq=STRAGGLER_SEQ + i))
            time.sleep(0.02)  # paced like a policy (not a wait for anything)
        st = wait_status(probe, lambda st: drops(st).get("unknown_episode", 0) >= 10, 5.0,
                         "10 unknown_episode drops")
        assert uid(st.episode_id) == NO_EPISODE and st.state_name == "IDLE"
        assert st.actions_accepted == 0
        assert_held(probe, t_restart, n=20)
        assert probe.since("gripper", t_restart) == [], "the restarted safety node commanded the gripper"
        # Nobody re-announces the old episode to the new safety node: resuming needs a fresh instruction.
        assert not [e for e in probe.since("episode", t_restart) if e.active and uid(e.episode_id) == old]
        print(f"\nold-episode actions the policy itself sent after the safety restart: {policy_actions_after}; "
              f"goal ended {1e3 * (t_end - t_restart):.0f} ms after the restart")

        _, t_say, new = begin(probe, lambda: say(probe, "push again"))
        assert new != old
        probe.wait_for(lambda: len(probe.since("gripper", t_say)) >= 1, 3.0, "the new episode's gripper command")
    finally:
        goals.destroy()


# -- c. e-stop and reset ------------------------------------------------------------------------------
def test_estop_then_reset_holds_until_a_fresh_instruction(probe, stack):
    s = stack()
    s.start("both")
    goals = GoalClient(probe)
    try:
        (handle, _), _, ep = begin(probe, lambda: goals.send("keep moving"))
        assert trigger(probe, "/rt2_safety/estop").success
        t_stop = time.monotonic()
        _, result = goals.result(handle, 5.0)
        assert result.outcome == OUTCOME["ESTOPPED"], (result.outcome_name, result.message)
        wait_status(probe, lambda st: st.state_name == "ESTOPPED", 5.0, "ESTOPPED")
        assert_held(probe, t_stop + STOP_MARGIN_S)
        # The policy stopped with its episode; an action of it that still arrives is ignored.
        probe.straggler.publish(arm_action(ep, z=0.02))
        wait_status(probe, lambda st: drops(st).get("ignored:estopped", 0) >= 1, 5.0, "ignored:estopped drop")
        assert policy_actions(probe, t_stop + 0.3) == [], "the policy kept publishing after the e-stop"

        reset = trigger(probe, "/rt2_safety/reset")
        assert reset.success, reset.message
        t_reset = time.monotonic()
        wait_status(probe, lambda st: st.state_name == "IDLE" and uid(st.episode_id) == NO_EPISODE, 5.0,
                    "IDLE without an episode after the reset")
        assert_held(probe, t_reset, n=15)  # 0.5 s: nothing resumes on its own
        assert policy_actions(probe, t_reset) == []

        assert begin(probe, lambda: say(probe, "move again"))[2] != ep
    finally:
        goals.destroy()


# -- d. a straggler of the previous episode -------------------------------------------------------------
def test_straggler_of_the_previous_episode_is_dropped_as_stale(probe, stack):
    s = stack()
    s.start("both")
    _, _, first = begin(probe, lambda: say(probe, "first task"))
    t1 = say(probe, "second task")
    probe.wait_for(lambda: (st := latest_status(probe)) is not None and st.state_name == "RUNNING"
                   and uid(st.episode_id) not in (first, NO_EPISODE), 5.0, "the second episode RUNNING")
    second = uid(latest_status(probe).episode_id)
    wait_motion(probe, t1)
    before = drops(latest_status(probe)).get("stale_episode", 0)

    t_pub = probe.straggler.publish(arm_action(first, z=0.05))  # a full step up, if it were executed
    st = wait_status(probe, lambda st: drops(st).get("stale_episode", 0) == before + 1, 5.0, "a stale_episode drop")
    assert uid(st.episode_id) == second and st.state_name in ("RUNNING", "HOLDING")
    window = wait_twists(probe, t_pub, 15)
    # Bin 128 is 0.08 mm of z per step, so the episode's own z speed stays a few mm/s; a 5 cm step would
    # drive z at the speed limit.
    vz = max(abs(linear(m)[2]) for m in window)
    assert vz < 0.02, f"the straggler's +z step was executed: z speed {vz:.3f} m/s"
    assert all(uid(a.episode_id) == second for a in policy_actions(probe, t1 + 0.2))


# -- e. preemption -----------------------------------------------------------------------------------------
def test_second_goal_preempts_the_first(probe, stack):
    s = stack()
    s.start("both")
    goals = GoalClient(probe)
    try:
        (first, _), _, ep1 = begin(probe, lambda: goals.send("first goal"))
        second, _ = goals.send("second goal")
        status, result = goals.result(first, 5.0)
        assert result.outcome == OUTCOME["PREEMPTED"] and result.outcome_name == "PREEMPTED", result.message
        assert status == GoalStatus.STATUS_ABORTED and uid(result.episode_id) == ep1
        st = wait_status(probe, lambda st: st.state_name == "RUNNING" and uid(st.episode_id) not in (ep1, NO_EPISODE),
                         5.0, "the second goal's episode RUNNING")
        ep2 = uid(st.episode_id)
        t_check = time.monotonic()
        probe.wait_for(lambda: len(policy_actions(probe, t_check)) >= 3, 5.0, "actions of the second goal")
        assert {uid(a.episode_id) for a in policy_actions(probe, t_check)} == {ep2}
        wait_motion(probe, t_check)
        assert st.instruction == "second goal"
        # Feedback of the running goal: its episode, steps, the safety state, and the age of the
        # camera frame behind the last action (finite, and bounded by the reply-age rule).
        probe.wait_for(lambda: any(uid(fb.episode_id) == ep2 and fb.step > 0 and fb.phase == "running"
                                   for _, fb in goals.feedback), 5.0, "running feedback of the second goal")
        fb = [fb for _, fb in goals.feedback if uid(fb.episode_id) == ep2 and fb.step > 0][-1]
        assert fb.safety_state in ("RUNNING", "HOLDING") and 0.0 <= fb.action_age_s < 2.5, fb
        assert math.isfinite(fb.backend_latency_s)
        second.cancel_goal_async()
        _, result2 = goals.result(second, 5.0)
        assert result2.outcome == OUTCOME["CANCELLED"] and uid(result2.episode_id) == ep2
    finally:
        goals.destroy()


def test_each_goal_gets_its_result_whatever_ended_the_one_before(probe, stack):
    """Outcomes logged at different levels (CANCELLED: info, ESTOPPED: warning) in one process."""
    s = stack()
    s.start("both")
    goals = GoalClient(probe)
    try:
        (first, _), _, _ = begin(probe, lambda: goals.send("first"))
        first.cancel_goal_async()
        assert goals.result(first, 5.0)[1].outcome == OUTCOME["CANCELLED"]
        (second, _), _, _ = begin(probe, lambda: goals.send("second"))
        assert trigger(probe, "/rt2_safety/estop").success
        _, result = goals.result(second, 5.0)
        assert result.outcome == OUTCOME["ESTOPPED"], (result.outcome_name, result.message)
        assert "unexpected" not in s.log("both"), s.log("both")
    finally:
        goals.destroy()


# -- f. cancel ----------------------------------------------------------------------------------------------
def test_cancel_holds_within_one_command_period(probe, stack):
    s = stack()
    s.start("both")
    goals = GoalClient(probe)
    latencies = []
    try:
        for i in range(3):
            (handle, _), t0, _ = begin(probe, lambda i=i: goals.send(f"cancel me {i}"))
            # Steady motion first: the last 5 twists all move, so a zero twist can only be the stop.
            probe.wait_for(lambda t0=t0: len(w := probe.since("twist", t0)) >= 5 and
                           not any(is_zero(m) for m in w[-5:]), 5.0, "steady motion")
            t_cancel = time.monotonic()
            cancel = handle.cancel_goal_async()
            t_zero = first_time(probe, "twist", t_cancel, is_zero, 2.0, "a zero twist after the cancel")
            status, result = goals.result(handle, 5.0)
            assert status == GoalStatus.STATUS_CANCELED
            assert result.outcome == OUTCOME["CANCELLED"], (result.outcome_name, result.message)
            probe.wait_for(cancel.done, 5.0, "the cancel response")
            assert cancel.result().return_code == 0  # ERROR_NONE
            assert_held(probe, t_zero, n=10)
            latencies.append(t_zero - t_cancel)
    finally:
        goals.destroy()
    measure("cancel request -> first zero twist (worst of 3)", max(latencies),
            "all: " + ", ".join(f"{1e3 * x:.1f}" for x in latencies) + " ms")
    assert max(latencies) < STOP_MARGIN_S, latencies


# -- g. lifecycle ---------------------------------------------------------------------------------------------
def test_lifecycle_transitions_and_a_failed_configure(probe, stack):
    s = stack()
    t_start = s.start("both", "--no-autostart", ready=False)
    for node in ("rt2_safety", "rt2_policy"):
        assert probe.lifecycle_state(node, timeout=20.0) == "unconfigured"
    t_up = time.monotonic()
    time.sleep(0.5)  # absence of twists can only be observed over time
    assert probe.since("twist", t_start) == [] and probe.since("status", t_start) == []

    # configure + activate the safety node: the command stream runs (zero twists), then IDLE.
    poses = probe.pose_pub.total
    assert probe.change_state("rt2_safety", "configure")
    wait_status(probe, lambda st: st.state_name == "INACTIVE", 5.0, "INACTIVE after configure")
    assert_held(probe, t_up, n=5)
    assert probe.change_state("rt2_safety", "activate")
    wait_status(probe, lambda st: st.state_name == "IDLE", 5.0, "IDLE after activate")
    instructions, images = probe.instruction.total, probe.image_pub.total
    assert probe.change_state("rt2_policy", "configure") and probe.change_state("rt2_policy", "activate")
    assert probe.lifecycle_state("rt2_policy") == "active"
    probe.instruction.wait_new_match(instructions, 10.0)
    probe.image_pub.wait_delivered(images, 10.0)
    probe.pose_pub.wait_delivered(poses, 10.0, n=2)  # both nodes subscribe to ee_pose once configured

    goals = GoalClient(probe)
    try:
        (handle, _), _, _ = begin(probe, lambda: goals.send("move while active"))
        # deactivate: zero twists at once, status INACTIVE, the goal ends.
        assert probe.change_state("rt2_safety", "deactivate")
        t_deact = time.monotonic()
        wait_status(probe, lambda st: st.state_name == "INACTIVE", 5.0, "INACTIVE after deactivate")
        assert_held(probe, t_deact + STOP_MARGIN_S)
        _, result = goals.result(handle, 5.0)
        assert result.outcome == OUTCOME["FAULT"], (result.outcome_name, result.message)
        print(f"\ngoal result after the safety node's deactivate: {result.outcome_name}: {result.message}")

        # cleanup, then a configure that fails: the node stays unconfigured, with the key in the log.
        assert probe.change_state("rt2_safety", "cleanup")
        assert probe.lifecycle_state("rt2_safety") == "unconfigured"
        bad = probe.set_parameters("rt2_safety", {"safety.workspace_min": [0.8, 0.5, 0.6]})
        assert bad[0].successful, bad[0].reason  # unconfigured: configure checks it
        assert not probe.change_state("rt2_safety", "configure")
        assert probe.lifecycle_state("rt2_safety") == "unconfigured"
        assert "safety.workspace_min" in s.log("both")
        assert s.alive("both")

        fixed = probe.set_parameters("rt2_safety", {"safety.workspace_min": [0.25, -0.35, 0.02]})
        assert fixed[0].successful, fixed[0].reason
        assert probe.change_state("rt2_safety", "configure")
        assert probe.lifecycle_state("rt2_safety") == "inactive"
        assert probe.change_state("rt2_safety", "activate")
        wait_status(probe, lambda st: st.state_name == "IDLE", 5.0, "IDLE after the second activate")
        (handle, _), _, _ = begin(probe, lambda: goals.send("move after the re-configure"))
        handle.cancel_goal_async()
        _, result = goals.result(handle, 5.0)
        assert result.outcome == OUTCOME["CANCELLED"], (result.outcome_name, result.message)
        # Left unconfigured, the process still shuts down cleanly (the fixture checks exit code 0).
        assert probe.change_state("rt2_safety", "deactivate") and probe.change_state("rt2_safety", "cleanup")
        assert probe.lifecycle_state("rt2_safety") == "unconfigured"
    finally:
        goals.destroy()


# -- h. live parameters ------------------------------------------------------------------------------------------
def test_live_parameters_apply_within_bounds_and_refuse_the_rest(probe, stack):
    s = stack()
    s.start("both")
    _, t0, _ = begin(probe, lambda: say(probe, "move fast"))
    probe.wait_for(lambda: any(np.linalg.norm(linear(m)) > 0.1 for m in probe.since("twist", t0)), 5.0,
                   "a twist faster than 0.1 m/s")

    ok = probe.set_parameters("rt2_safety", {"safety.max_linear_speed_m_s": 0.05})[0]
    assert ok.successful, ok.reason
    t_set = time.monotonic()
    window = wait_twists(probe, t_set + STOP_MARGIN_S, 30)
    speeds = [float(np.linalg.norm(linear(m))) for m in window]
    assert max(speeds) <= 0.05 + 1e-6, max(speeds)
    assert max(speeds) > 0.04, "the arm stopped instead of moving at the new limit"
    assert probe.get_parameters("rt2_safety", ["safety.max_linear_speed_m_s"]) == [0.05]

    frame = probe.set_parameters("rt2_safety", {"output.frame_id": "base_link"})[0]
    assert not frame.successful and "output.frame_id" in frame.reason and "not live" in frame.reason, frame.reason
    backend = probe.set_parameters("rt2_policy", {"backend.type": "grpc"})[0]
    assert not backend.successful and "backend.type" in backend.reason, backend.reason
    too_fast = probe.set_parameters("rt2_safety", {"safety.max_linear_speed_m_s": 1e6})[0]
    assert not too_fast.successful and too_fast.reason, too_fast.reason
    negative = probe.set_parameters("rt2_safety", {"safety.max_linear_speed_m_s": -0.1})[0]
    assert not negative.successful and negative.reason
    assert probe.get_parameters("rt2_safety", ["safety.max_linear_speed_m_s", "output.frame_id"]) == \
        [0.05, "panda_link0"]
    print(f"\nrefusals: {frame.reason!r}; {backend.reason!r}; {too_fast.reason!r}")


# -- i. QoS overrides in the params file ----------------------------------------------------------------------
def test_qos_overrides_in_the_params_file_are_accepted(probe, stack):
    s = stack(safety={"qos_overrides": {"/arm_action": {"subscription": {"depth": 5}}}},
              policy={"qos_overrides": {"/arm_action": {"publisher": {"depth": 20}}}})
    s.start("both")
    assert probe.get_parameters("rt2_safety", ["qos_overrides./arm_action.subscription.depth"]) == [5]
    assert probe.get_parameters("rt2_policy", ["qos_overrides./arm_action.publisher.depth"]) == [20]
    begin(probe, lambda: say(probe, "move with overridden QoS"))


@pytest.mark.parametrize("node, entity", [("rt2_safety", "subscription"), ("rt2_policy", "publisher")])
def test_qos_override_for_a_topic_we_do_not_create_exits_2(probe, tmp_path, node, entity):
    flat = {"qos_overrides": {"/no_such_topic": {entity: {"depth": 5}}}}
    params = write_params(tmp_path / "params.yaml", policy={**POLICY, **(flat if node == "rt2_policy" else {})},
                          safety={**SAFETY, **(flat if node == "rt2_safety" else {})})
    proc = start_bringup(params, log=tmp_path / "bringup.log")
    rc = proc.wait(30)
    out = (tmp_path / "bringup.log").read_text()
    assert rc == 2, out
    assert f"qos_overrides./no_such_topic.{entity}.depth" in out and node in out, out


# -- j. the gRPC server is down ----------------------------------------------------------------------------------
def free_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_instruction_while_the_grpc_server_is_down(probe, stack):
    port = free_closed_port()
    s = stack(policy={"backend.type": "grpc", "backend.timeout_s": 0.5,
                      "backend.grpc.target": f"127.0.0.1:{port}", "backend.grpc.tls": False,
                      "backend.grpc.connect_timeout_s": 0.5, "backend.grpc.max_backoff_s": 0.5})
    s.start("both")
    goals = GoalClient(probe)
    try:
        (handle, t0), _, ep, _ = probe.take_episode(lambda: goals.send("pick up the red block", time_limit_s=3.5))
        st = latest_status(probe)
        assert uid(st.episode_id) == ep and st.state_name == "HOLDING"  # waiting for a first action
        t_win = time.monotonic()
        probe.wait_for(lambda: time.monotonic() > t_win + 2.0, 3.0, "a 2 s window")
        window = [m for t, m in timed(probe, "twist", t_win) if t <= t_win + 2.0]
        assert 0.75 * 2 * RATE_HZ <= len(window) <= 1.25 * 2 * RATE_HZ, f"{len(window)} twists in 2 s"
        assert all(is_zero(m) for m in window)
        assert policy_actions(probe, t0) == []
        _, result = goals.result(handle, 10.0)
        assert result.outcome in (OUTCOME["TIME_LIMIT"], OUTCOME["FAULT"]), (result.outcome_name, result.message)
        assert result.replies_accepted == 0 and result.replies_dropped >= 1, result
        assert s.alive("both")
        print(f"\ngrpc down: {len(window)} zero twists in 2 s; goal {result.outcome_name}: {result.message}; "
              f"{result.requests_sent} requests, {result.replies_dropped} failed")
        log = s.log("both")
        assert "unavailable" in log and "Traceback" not in log, log
    finally:
        goals.destroy()


# -- k. frame check --------------------------------------------------------------------------------------------------
def test_action_in_a_wrong_frame_is_a_fault_naming_both_frames(probe, stack):
    s = stack()
    s.start("both")
    goals = GoalClient(probe)
    try:
        (handle, _), _, ep = begin(probe, lambda: goals.send("move"))
        t_bad = probe.straggler.publish(arm_action(ep, frame="base_link"))
        st = wait_status(probe, lambda st: st.state_name == "FAULT", 5.0, "FAULT")
        why = " ".join(st.reasons)
        assert "'base_link'" in why and "'panda_link0'" in why, st.reasons
        wait_status(probe, lambda st: drops(st).get("wrong_frame", 0) == 1, 5.0, "one wrong_frame drop")
        assert_held(probe, t_bad + STOP_MARGIN_S)
        _, result = goals.result(handle, 5.0)
        assert result.outcome == OUTCOME["FAULT"] and "base_link" in result.message, result.message
        assert "fault: arm_action frame 'base_link'" in s.log("both")
    finally:
        goals.destroy()
