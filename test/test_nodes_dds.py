"""The policy and safety nodes over real DDS: rt2-bringup in its own process, a probe node here.

The probe plays camera, arm driver and operator: it publishes images, the end-effector pose and
instructions, and records what rt2_ros sends to the controller. The ``scripted`` backend
supplies known model answers (and delays) so each scenario is exact.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import TwistStamped  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from rt2_ros.nodes.common import ACTION_QOS, COMMAND_QOS, EVENT_QOS, LATCHED_QOS  # noqa: E402
from rt2_ros_interfaces.msg import ActionTokens, ArmAction, SafetyStatus  # noqa: E402
from test.ros_helpers import (  # noqa: E402
    NO_EPISODE,
    REPO,
    Probe,
    isolate_ros_domain,
    start_bringup,
    stop,
    uid,
    write_params,
)

MOVE_X = "0 160 128 128 128 128 128 0"  # +x, gripper open (rt2 profile)
TERMINATE = "1 128 128 128 128 128 128 0"
SAFETY = {"safety.watchdog_timeout_s": 0.6, "safety.command_rate_hz": 30.0}


@pytest.fixture(scope="module")
def probe():
    isolate_ros_domain()
    p = Probe()
    p.record(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS, "twist")
    p.record(ArmAction, "/arm_action", ACTION_QOS, "action")
    p.record(SafetyStatus, "/rt2_safety/status", LATCHED_QOS, "status")
    p.record(ActionTokens, "/rt2_policy/action_tokens", 10, "tokens")
    p.publish_fake_sensors()  # the probe is the camera and the arm driver
    # Instructions are volatile: publish only once the policy's subscription matched (wait_ready).
    p.instruction = p.publisher(String, "/instruction", EVENT_QOS)
    p.straggler = p.publisher(ArmAction, "/arm_action", ACTION_QOS)  # plays a policy that did not stop
    yield p
    p.close()


def start_stack(probe, tmp_path, answers, delays=(0.0,), policy_extra=None, safety_extra=None):
    """rt2-bringup with the scripted backend; remembers the probe's match totals before the start."""
    policy = {"backend.type": "scripted", "backend.timeout_s": 3.0, "policy.max_reply_age_s": 3.5,
              "policy.max_action_age_s": 4.0, "backend.scripted.answers": list(answers),
              "backend.scripted.delays_s": list(delays), "backend.scripted.repeat": False,
              "policy.execute_rate_hz": 10.0, **(policy_extra or {})}
    params = write_params(tmp_path / "params.yaml", policy=policy, safety={**SAFETY, **(safety_extra or {})})
    baselines, started_at = probe.match_baselines("both"), time.monotonic()
    proc = start_bringup(params, log=tmp_path / "bringup.log")
    proc.baselines, proc.started_at = baselines, started_at
    return proc


def latest_status(probe):
    return probe.latest("status")


def wait_ready(probe, proc, tmp_path):
    """Until the safety node's latched status arrived and both nodes' subscriptions to the probe's
    publishers (ee_pose, camera, instruction, arm_action) matched."""
    probe.wait_started(proc, "both", proc.baselines, proc.started_at, tmp_path / "bringup.log")


def say(probe, text: str) -> float:
    """Publish an instruction; returns the monotonic time just before."""
    return probe.instruction.publish(String(data=text))


def begin(probe, text: str) -> tuple[float, bytes]:
    """Send ``text`` until the safety node takes its episode (Probe.take_episode); (send time, episode id)."""
    _, t0, ep, _ = probe.take_episode(lambda: say(probe, text))
    return t0, ep


def linear(tw) -> np.ndarray:
    return np.array([tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z])


def test_actions_move_the_arm_then_terminate_holds(probe, tmp_path):
    proc = start_stack(probe, tmp_path, [MOVE_X] * 5 + [TERMINATE])
    try:
        wait_ready(probe, proc, tmp_path)
        t0, ep = begin(probe, "push the block forward")
        probe.wait_for(lambda: any(a.terminate for a in probe.since("action", t0)), 20.0, "the terminate action")
        actions = probe.since("action", t0)
        moves = [a for a in actions if not a.terminate]
        assert len(moves) == 5
        assert all(uid(a.episode_id) == ep for a in actions)
        # bin 128 is not exactly zero in the RT-1 discretisation (zero lies at 127.5): 0.6 mm
        assert all(a.translation.x > 0.005 and abs(a.translation.y) < 1e-3 for a in moves)
        # The controller saw motion in +x, freshly stamped ...
        twists = probe.since("twist", t0)
        assert any(linear(t)[0] > 1e-3 for t in twists), "no +x twist reached the controller"
        # ... and after terminate: status TERMINATED and only zero twists.
        probe.wait_for(lambda: (s := latest_status(probe)) is not None and s.state == SafetyStatus.TERMINATED
                       and uid(s.episode_id) == ep, 5.0, "TERMINATED status of the episode")
        t_term = time.monotonic()
        probe.wait_for(lambda: len(probe.since("twist", t_term)) >= 10, 5.0, "keep-alive twists after terminate")
        after = probe.since("twist", t_term)
        assert all(np.allclose(linear(t), 0.0) for t in after)
        now_ros = probe.node.get_clock().now().nanoseconds * 1e-9
        last = after[-1].header.stamp
        assert now_ros - (last.sec + last.nanosec * 1e-9) < 0.5, "twists must be freshly stamped"
        tokens = probe.since("tokens", t0)
        assert list(tokens[0].tokens) == [int(x) for x in MOVE_X.split()]
    finally:
        assert stop(proc) == 0, (tmp_path / "bringup.log").read_text()


def test_late_reply_is_not_executed(probe, tmp_path):
    # Every answer takes the whole timeout (1.0 s), and a frame may be at most 1.0 s old when its reply
    # arrives: the frame was already a little old when it was sent, so every reply is late.
    proc = start_stack(probe, tmp_path, [MOVE_X], delays=[1.0], policy_extra={
        "backend.timeout_s": 1.0, "policy.max_reply_age_s": 1.0, "policy.max_action_age_s": 1.0})
    try:
        wait_ready(probe, proc, tmp_path)
        t0, _ = begin(probe, "move")
        probe.wait_for(lambda: len(probe.since("tokens", t0)) >= 2, 10.0, "two (late) replies")
        assert probe.since("action", t0) == [], "a late reply was executed"
        assert all(np.allclose(linear(t), 0.0) for t in probe.since("twist", t0))
        assert "late" in (tmp_path / "bringup.log").read_text()
    finally:
        stop(proc)


def test_watchdog_halts_when_backend_stalls(probe, tmp_path):
    # Three quick answers, then the backend stalls (10 s > timeout 3 s).
    proc = start_stack(probe, tmp_path, [MOVE_X] * 3 + [MOVE_X], delays=[0.0, 0.0, 0.0, 10.0])
    try:
        wait_ready(probe, proc, tmp_path)
        t0, _ = begin(probe, "move and stall")
        probe.wait_for(lambda: len(probe.since("action", t0)) >= 3, 10.0, "three actions")
        t_last = probe.messages["action"][-1][0]
        probe.wait_for(lambda: (s := latest_status(probe)) is not None and s.state == SafetyStatus.HOLDING,
                       5.0, "HOLDING after the watchdog")
        # Twists are zero from watchdog_timeout (+ one tick + DDS) after the last action on, until the
        # stalled request is abandoned (timeout 3 s + 0.5 s grace) and a new answer may arrive.
        start, end = t_last + SAFETY["safety.watchdog_timeout_s"] + 0.15, t_last + 3.0
        probe.wait_for(lambda: len([1 for t, _ in probe.messages["twist"] if t > t_last + 1.0]) >= 5, 5.0,
                       "twists after the stall")
        held = [m for t, m in probe.messages["twist"] if start < t < end]
        assert held and all(np.allclose(linear(m), 0.0) for m in held)
        assert latest_status(probe).watchdog_trips >= 1
    finally:
        stop(proc)


def test_estop_wins_until_reset(probe, tmp_path):
    proc = start_stack(probe, tmp_path, [MOVE_X] * 200, policy_extra={"policy.execute_rate_hz": 10.0})
    try:
        wait_ready(probe, proc, tmp_path)
        t0, ep = begin(probe, "keep moving")
        probe.wait_for(lambda: any(linear(m)[0] > 1e-3 for m in probe.since("twist", t0)), 10.0, "motion")
        client = probe.node.create_client(Trigger, "/rt2_safety/estop")
        assert client.wait_for_service(timeout_sec=5.0)
        future = client.call_async(Trigger.Request())
        probe.wait_for(future.done, 5.0, "e-stop service reply")
        assert future.result().success
        t_stop = time.monotonic()
        probe.wait_for(lambda: latest_status(probe).state == SafetyStatus.ESTOPPED, 5.0, "ESTOPPED")
        # The policy ends its episode on the e-stop; actions of it that keep coming (a policy that has
        # not heard yet, played by the probe) are ignored, and every twist after the e-stop is zero.
        for i in range(5):
            action = ArmAction(observation_seq=10**6 + i)
            action.header.frame_id = "panda_link0"
            action.episode_id.uuid = list(ep)
            action.translation.x = 0.02
            probe.straggler.publish(action)
        probe.wait_for(lambda: dict(zip(latest_status(probe).drop_causes, latest_status(probe).drop_counts,
                                        strict=True)).get("ignored:estopped", 0) >= 5, 5.0, "5 ignored actions")
        probe.wait_for(lambda: len(probe.since("twist", t_stop + 0.1)) >= 10, 5.0, "twists during the e-stop")
        assert all(np.allclose(linear(m), 0.0) for m in probe.since("twist", t_stop + 0.1))
        assert [a for a in probe.since("action", t_stop + 0.3) if a.observation_seq < 10**6] == [], \
            "the policy kept publishing after the e-stop"
        reset = probe.node.create_client(Trigger, "/rt2_safety/reset")
        assert reset.wait_for_service(timeout_sec=5.0)
        f2 = reset.call_async(Trigger.Request())
        probe.wait_for(f2.done, 5.0, "reset reply")
        assert f2.result().success
        probe.wait_for(lambda: latest_status(probe).state == SafetyStatus.IDLE, 5.0, "IDLE after reset")
        assert uid(latest_status(probe).episode_id) == NO_EPISODE
        # Still no motion until a new instruction.
        t_reset = time.monotonic()
        time.sleep(0.5)  # a window of twists to inspect: absence of motion can only be observed over time
        assert all(np.allclose(linear(m), 0.0) for m in probe.since("twist", t_reset))
    finally:
        stop(proc)


@pytest.mark.parametrize("safety_params, policy_params, expected", [
    ({"safety.max_linear_speed_m_s": -1.0}, {}, "safety.max_linear_speed_m_s"),
    ({"safety.max_lineer_speed_m_s": 0.1}, {}, "safety.max_lineer_speed_m_s"),
    ({}, {"backend.type": "telepathy"}, "backend.type"),
    ({}, {"tokenizer.profile": "rt9"}, "tokenizer.profile"),
])
def test_bad_params_fail_with_the_key_named(tmp_path, safety_params, policy_params, expected):
    isolate_ros_domain()
    params = write_params(tmp_path / "bad.yaml", policy={"backend.type": "scripted", **policy_params},
                          safety={**SAFETY, **safety_params})
    proc = start_bringup(params, log=tmp_path / "bringup.log")
    rc = proc.wait(30)
    out = (tmp_path / "bringup.log").read_text()
    assert rc == 2, out
    assert expected in out


def test_broken_yaml_is_reported(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("rt2_policy:\n  ros__parameters:\n    backend: {type: [unclosed\n")
    proc = start_bringup(bad, log=tmp_path / "bringup.log")
    assert proc.wait(30) == 2
    assert "not valid YAML" in (tmp_path / "bringup.log").read_text()


def test_new_instruction_cancels_episode(probe, tmp_path):
    proc = start_stack(probe, tmp_path, [MOVE_X] * 100)
    try:
        wait_ready(probe, proc, tmp_path)
        t0, first_ep = begin(probe, "first task")
        probe.wait_for(lambda: len(probe.since("action", t0)) >= 2, 10.0, "first episode actions")
        assert {uid(a.episode_id) for a in probe.since("action", t0)} == {first_ep}
        t1 = say(probe, "second task")
        probe.wait_for(lambda: len(probe.since("action", t1 + 0.3)) >= 3, 10.0, "second episode actions")
        later = probe.since("action", t1 + 0.3)
        second_ep = uid(later[0].episode_id)
        assert second_ep not in (first_ep, NO_EPISODE)
        assert all(uid(a.episode_id) == second_ep for a in later)
        s = latest_status(probe)
        assert s.instruction == "second task" and uid(s.episode_id) == second_ep
        assert not math.isnan(s.last_action_age_s)
    finally:
        stop(proc)


def _cli(module: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_rt2_say_waits_for_the_outcome_and_rt2_status_reports(probe, tmp_path):
    proc = start_stack(probe, tmp_path, [MOVE_X] * 3 + [TERMINATE])
    try:
        wait_ready(probe, proc, tmp_path)
        said = _cli("rt2_ros.nodes.say", "push it", "--wait", "--timeout", "30")
        assert said.returncode == 0, said.stdout + said.stderr
        assert re.search(r"episode [0-9a-f]{8} TERMINATED", said.stdout), said.stdout
        status = _cli("rt2_ros.nodes.status", "--once", "--wait", "15")
        assert status.returncode == 0, status.stderr
        assert "safety=TERMINATED" in status.stdout and "'push it'" in status.stdout
    finally:
        stop(proc)


def test_rt2_say_without_nodes_fails_clearly():
    said = _cli("rt2_ros.nodes.say", "anyone?", "--connect-timeout", "1")
    assert said.returncode == 1
    assert "nobody subscribes to /instruction" in said.stderr
