"""``launch/rt2.launch.py`` under ROS 2's launch machinery, its nodes talking real DDS to a probe here.

Runs where ``launch`` and ``launch_ros`` are importable and rt2_ros is installed in an ament
prefix (``make setup``, or ``colcon build`` and a sourced workspace), i.e. on a ROS 2 install.
ROS 2 from PyPI wheels has no launch tools: there the module is skipped, and test_nodes_dds.py
covers the same nodes started by rt2-bringup.

The shape of ros2/examples' launch_testing_examples, without launch_testing's pytest plugin:
launch_testing up to 3.7 registers a collection hook with pytest's removed ``path`` argument,
so under this project's pytest 9 the plugin cannot even load (ros2/launch#979; where it is
installed, run pytest with ``-p no:launch_testing -p no:launch_ros``). Instead, the launch file runs under
``launch.LaunchService`` in its own process (it must own its signals, as ``ros2 launch`` does)
and this same file, run as a script, prints the exit code of every process it started. The
probe waits until the nodes are up and their topics flow (ReadyToTest, WaitForTopics), drives
a scenario, stops the launch with SIGINT as Ctrl-C does, then checks every exit code
(assertExitCodes). The nodes run the working tree's code (PYTHONPATH), the executables and the
ament index entry are the installed ones.

rt2_safety and rt2_policy are managed (lifecycle) nodes: the probe asks their state with
lifecycle_msgs/srv/GetState and, with ``autostart:=false``, takes them to active itself with
ChangeState, as ``ros2 lifecycle set`` or a lifecycle manager does. Tasks go in as
ExecuteInstruction goals to /rt2_policy/execute_instruction, or (the teleop path) on the volatile
``instruction`` topic once the policy node's subscription matched the probe's publisher.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# launch_ros brings launch; a bare ``import launch`` would also find this repo's launch/ folder.
pytest.importorskip("launch_ros", reason="launch_ros is not installed (PyPI's ROS 2 wheels have no launch tools; "
                                         "test_nodes_dds.py covers the nodes through rt2-bringup)")

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "rt2.launch.py"
EXIT_PREFIX = "rt2-launch-test: exit"  # "<prefix> <executable> <return code>", one line per process
STOP_TIMEOUT_S = 20.0  # launch sends SIGINT, SIGTERM 5 s later, SIGKILL 5 s after that


def run_launch_file(argv: list[str]) -> int:
    """Script mode: ``python test_launch.py <launch file> [name:=value ...]`` (what ``ros2 launch`` does)."""
    from launch import LaunchDescription, LaunchService
    from launch.actions import IncludeLaunchDescription, RegisterEventHandler
    from launch.event_handlers import OnProcessExit
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    # A shell that starts us in the background may have set SIGINT to ignored, and an ignored
    # signal stays ignored across exec: restore it so the launch and its nodes can be stopped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    path, *arguments = argv
    launch_arguments = [tuple(a.split(":=", 1)) for a in arguments]

    def report(event, context) -> None:
        executable = event.process_name.rsplit("-", 1)[0]  # "policy_node-2" -> "policy_node"
        print(f"{EXIT_PREFIX} {executable} {event.returncode}", flush=True)

    # noninteractive: our SIGINT reaches only this process (its own session), so the launch must pass
    # it on to the nodes, as ros2 launch does when stdin is not a terminal.
    service = LaunchService(noninteractive=True)
    service.include_launch_description(LaunchDescription([
        RegisterEventHandler(OnProcessExit(on_exit=report)),
        IncludeLaunchDescription(PythonLaunchDescriptionSource(path), launch_arguments=launch_arguments),
    ]))
    return service.run()


if __name__ == "__main__":
    raise SystemExit(run_launch_file(sys.argv[1:]))


rclpy = pytest.importorskip("rclpy")

import numpy as np  # noqa: E402
from action_msgs.msg import GoalStatus  # noqa: E402
from geometry_msgs.msg import PoseStamped, TwistStamped  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from rt2_ros.nodes.common import ACTION_QOS, COMMAND_QOS, EVENT_QOS, LATCHED_QOS  # noqa: E402
from rt2_ros_interfaces.msg import ActionTokens, ArmAction, Episode, SafetyStatus  # noqa: E402
from test.ros_helpers import (  # noqa: E402
    GoalClient,
    MatchedPublisher,
    Probe,
    isolate_ros_domain,
    uid,
    write_params,
)

MOVE_X = "0 160 128 128 128 128 128 0"  # +x, gripper open (rt2 profile)
TERMINATE = "1 128 128 128 128 128 128 0"
SAFETY = {"safety.watchdog_timeout_s": 0.6, "safety.command_rate_hz": 30.0}
EXECUTABLES = ("policy_node", "safety_node", "sim_node")
MANAGED = ("rt2_safety", "rt2_policy")
NO_EPISODE = bytes(16)


def installed_prefix() -> Path | None:
    """The ament prefix holding rt2_ros: AMENT_PREFIX_PATH's, else this venv (a pip venv is a ROS prefix)."""
    prefixes = [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    for prefix in [*prefixes, Path(sys.prefix)]:
        if (prefix / "share" / "ament_index" / "resource_index" / "packages" / "rt2_ros").is_file():
            return prefix
    return None


PREFIX = installed_prefix()
if PREFIX is None:
    pytest.skip("rt2_ros is not installed in an ament prefix (run `make setup`, or colcon build and source the "
                "workspace), so ros2 launch cannot find it", allow_module_level=True)


@contextlib.contextmanager
def launched(tmp_path: Path, *arguments: str):
    """The launch file in its own process group (only it gets our SIGINT, as from ``ros2 launch``).

    Leaving the block stops it with SIGINT like Ctrl-C (the launch forwards it to every node and
    must end by itself; ``returncode`` is set afterwards); a failure inside carries the launch log.
    """
    prefixes = os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
               AMENT_PREFIX_PATH=os.pathsep.join([str(PREFIX)] + [p for p in prefixes if p and p != str(PREFIX)]))
    with open(tmp_path / "launch.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, str(LAUNCH_FILE), *arguments], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    except AssertionError as exc:
        _stop(proc, tmp_path)  # first, so that the log is complete
        raise AssertionError(f"{exc}\n--- launch log ---\n{launch_log(tmp_path)}") from None
    finally:
        _stop(proc, tmp_path)  # returns at once when stopped already


def _stop(proc: subprocess.Popen, tmp_path: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launch and every node it started
        proc.wait(5)
        raise AssertionError(f"the launch did not stop within {STOP_TIMEOUT_S} s of SIGINT:\n"
                             f"{launch_log(tmp_path)}") from None


def launch_log(tmp_path: Path) -> str:
    return (tmp_path / "launch.log").read_text()


def exit_codes(tmp_path: Path) -> dict[str, int]:
    codes = {}
    for line in launch_log(tmp_path).splitlines():
        if line.startswith(EXIT_PREFIX):
            executable, code = line[len(EXIT_PREFIX):].split()
            codes[executable] = int(code)
    return codes


@pytest.fixture(scope="module")
def probe():
    isolate_ros_domain()
    p = Probe("rt2_launch_probe")
    p.record(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS, "twist")
    p.record(ArmAction, "/arm_action", ACTION_QOS, "action")
    p.record(SafetyStatus, "/rt2_safety/status", LATCHED_QOS, "status")
    p.record(Episode, "/episode", EVENT_QOS, "episode")
    p.record(ActionTokens, "/rt2_policy/action_tokens", 10, "tokens")
    p.record(Image, "/camera/image", qos_profile_sensor_data, "image")
    p.record(PoseStamped, "/ee_pose", qos_profile_sensor_data, "ee_pose")
    yield p
    p.close()


@pytest.fixture
def operator(probe):
    """The instruction publisher, one per test, volatile like the nodes' subscription: a message
    reaches only a policy node whose subscription matched before it was sent (``total`` counts)."""
    pub = probe.publisher(String, "/instruction", EVENT_QOS)
    yield pub
    probe.node.destroy_publisher(pub.pub)


@pytest.fixture
def goals(probe):
    client = GoalClient(probe)
    yield client
    client.destroy()


@pytest.fixture
def sensors(probe):
    """The probe plays camera and arm driver (tests without the simulated arm); fresh publishers per test."""
    stop_publishing = probe.publish_fake_sensors()
    yield
    stop_publishing()


def scripted_params(tmp_path: Path, answers: list[str], repeat: bool = False, policy: dict | None = None,
                    safety: dict | None = None) -> Path:
    # backend.type stays "embedded" here: the tests select the scripted backend with backend:=scripted.
    base = {"backend.type": "embedded", "backend.timeout_s": 3.0, "policy.max_reply_age_s": 3.5,
            "policy.max_action_age_s": 4.0, "backend.scripted.answers": answers,
            "backend.scripted.delays_s": [0.0], "backend.scripted.repeat": repeat, "policy.execute_rate_hz": 10.0}
    return write_params(tmp_path / "params.yaml", policy={**base, **(policy or {})},
                        safety={**SAFETY, **(safety or {})})


def latest_status(probe: Probe) -> SafetyStatus | None:
    msgs = probe.messages["status"]
    return msgs[-1][1] if msgs else None


def states(probe: Probe, timeout: float = 5.0) -> dict[str, str]:
    """GetState of both managed nodes: {node: label}."""
    return {node: probe.lifecycle_state(node, timeout) for node in MANAGED}


def wait_ready(probe: Probe, operator: MatchedPublisher, proc: subprocess.Popen, t0: float, sim: bool = False) -> None:
    """ReadyToTest for ``autostart:=true``: both managed nodes report ``active`` (GetState), the
    safety node's status of this launch arrived, the policy node's instruction subscription
    matched the probe's publisher, and the sensors reach the nodes (the probe's own publishers
    matched every subscriber and published since; with ``sim`` the simulated arm's topics flow)."""
    def up() -> bool:
        return proc.poll() is not None or (bool(probe.since("status", t0)) and operator.total >= 1)

    probe.wait_for(up, 30.0, "the launched nodes to come up")
    assert proc.poll() is None, "the launch exited early"
    if sim:  # WaitForTopics: camera/image and ee_pose from rt2_sim
        probe.wait_for(lambda: bool(probe.since("image", t0)) and bool(probe.since("ee_pose", t0)), 30.0,
                       "camera/image and ee_pose from the simulated arm")
    else:  # the policy node subscribes to camera/image, both nodes to ee_pose
        probe.image_pub.wait_delivered(0, 10.0, proc, n=1)
        probe.pose_pub.wait_delivered(0, 10.0, proc, n=2)
    assert states(probe) == {"rt2_safety": "active", "rt2_policy": "active"}


def linear(tw: TwistStamped) -> np.ndarray:
    return np.array([tw.twist.linear.x, tw.twist.linear.y, tw.twist.linear.z])


def is_zero(tw: TwistStamped) -> bool:
    a = tw.twist.angular
    return bool(np.allclose(linear(tw), 0.0) and np.allclose([a.x, a.y, a.z], 0.0))


def wait(probe: Probe, predicate, timeout: float, what: str, t0: float) -> None:
    """probe.wait_for, and on a timeout what the probe saw since ``t0`` (the launch log is added later)."""
    try:
        probe.wait_for(predicate, timeout, what)
    except AssertionError as exc:
        st = latest_status(probe)
        status = (f"{st.state_name} reasons={list(st.reasons)} accepted={st.actions_accepted} "
                  f"rejected={st.actions_rejected} clipped={st.actions_clipped} watchdog_trips={st.watchdog_trips} "
                  f"drops={dict(zip(st.drop_causes, st.drop_counts, strict=True))}"
                  if st else "none")
        plus_x = sum(1 for t in probe.since("twist", t0) if linear(t)[0] > 1e-3)
        raise AssertionError(
            f"{exc}; since {t0:.2f}: {len(probe.since('episode', t0))} episode announcements, "
            f"{len(probe.since('tokens', t0))} replies, {len(probe.since('action', t0))} actions, "
            f"{len(probe.since('twist', t0))} twists ({plus_x} +x), {len(probe.since('image', t0))} images, "
            f"{len(probe.since('ee_pose', t0))} poses; safety status {status}") from None


def wait_held(probe: Probe, t0: float, n: int, what: str) -> list[TwistStamped]:
    """At least ``n`` keep-alive twists after ``t0``, every one of them zero; returns them."""
    wait(probe, lambda: len(probe.since("twist", t0)) >= n, 5.0, f"{n} twists ({what})", t0)
    window = probe.since("twist", t0)
    moving = [linear(t) for t in window if not is_zero(t)]
    assert not moving, f"{what}: {len(moving)} of {len(window)} twists move, e.g. {moving[0]}"
    return window


def take_episode(probe: Probe, send, attempts: int = 3) -> tuple[object, float, bytes]:
    """Start an episode with ``send()`` until the safety node takes it (its status names a new episode).

    The probe saw its own endpoints match, not the two nodes' with each other: the policy node's
    episode announcement can reach a safety node that has not discovered the publisher yet and be
    lost (the episode then ends in FAULT when nobody acknowledges it); like an operator, send again.
    Returns (what ``send`` returned, its send time, the episode id).
    """
    for attempt in range(1, attempts + 1):
        known = {uid(m.episode_id) for _, m in probe.messages["status"]} | {NO_EPISODE}
        t = time.monotonic()
        sent = send()
        try:
            probe.wait_for(lambda known=known: (st := latest_status(probe)) is not None
                           and uid(st.episode_id) not in known, 3.0, "the safety node to take the episode")
        except AssertionError:
            if attempt == attempts:
                raise
            print(f"\nattempt {attempt}: the safety node did not take the episode; sending again", flush=True)
            continue
        return sent, t, uid(latest_status(probe).episode_id)
    raise AssertionError("unreachable")


def test_install_is_what_ros2_launch_finds():
    share = PREFIX / "share" / "rt2_ros"
    installed = share / "launch" / "rt2.launch.py"
    assert installed.is_file(), f"{installed} missing: ros2 launch rt2_ros rt2.launch.py cannot find the launch file"
    assert installed.read_text() == LAUNCH_FILE.read_text(), \
        f"{installed} differs from {LAUNCH_FILE}: reinstall the package (make setup)"
    for exe in EXECUTABLES:
        path = PREFIX / "lib" / "rt2_ros" / exe
        assert path.is_file() and os.access(path, os.X_OK), f"{path} is not an executable: ros2 run/launch fail"
    configs = {p.relative_to(REPO / "config") for p in (REPO / "config").rglob("*.yaml")}
    assert configs and {p.relative_to(share / "config") for p in (share / "config").rglob("*.yaml")} >= configs


def test_autostart_activates_both_nodes_and_a_goal_moves_the_arm_then_terminate_holds(
        probe, operator, goals, sensors, tmp_path):
    params = scripted_params(tmp_path, [MOVE_X] * 5 + [TERMINATE])
    t_launch = time.monotonic()
    with launched(tmp_path, f"params_file:={params}", "backend:=scripted") as proc:
        wait_ready(probe, operator, proc, t_launch)  # GetState: both nodes active without anybody's help
        (handle, _), t0, episode = take_episode(probe, lambda: goals.send("push the block forward", time_limit_s=20.0))
        status, result = goals.result(handle, 20.0)
        assert (status, result.outcome_name) == (GoalStatus.STATUS_SUCCEEDED, "TERMINATED"), \
            (status, result.outcome_name, result.message)
        assert uid(result.episode_id) == episode and result.steps == 6, (result.steps, result.message)
        # backend:=scripted replaced the params file's embedded backend: the script's tokens came out.
        assert [list(t.tokens) for t in probe.since("tokens", t0)][:1] == [[int(x) for x in MOVE_X.split()]]
        actions = [a for a in probe.since("action", t0) if uid(a.episode_id) == episode]
        moves = [a for a in actions if not a.terminate]
        assert len(moves) == 5 and all(a.translation.x > 0.005 and abs(a.translation.y) < 1e-3 for a in moves)
        assert len(actions) == 6 and actions[-1].terminate
        assert any(linear(t)[0] > 1e-3 for t in probe.since("twist", t0)), "no +x twist reached the controller"
        wait(probe, lambda: (s := latest_status(probe)) is not None and s.state == SafetyStatus.TERMINATED,
             5.0, "TERMINATED status", t0)
        assert uid(latest_status(probe).episode_id) == episode
        assert any(fb.phase == "running" for _, fb in goals.feedback), [fb.phase for _, fb in goals.feedback]
        wait_held(probe, time.monotonic(), 10, "keep-alive twists after terminate")
        assert states(probe) == {"rt2_safety": "active", "rt2_policy": "active"}
    # assertExitCodes: the launch and every node it started ended cleanly on SIGINT.
    assert (proc.returncode, exit_codes(tmp_path)) == (0, {"policy_node": 0, "safety_node": 0}), launch_log(tmp_path)


def test_sim_true_closes_the_loop_with_the_simulated_arm(probe, operator, tmp_path):
    params = scripted_params(tmp_path, [MOVE_X], repeat=True)
    t_launch = time.monotonic()
    with launched(tmp_path, f"params_file:={params}", "backend:=scripted", "sim:=true") as proc:
        wait_ready(probe, operator, proc, t_launch, sim=True)
        x0 = probe.messages["ee_pose"][-1][1].pose.position.x
        # The teleop path: a message on the volatile instruction topic (the subscription matched).
        _, t0, _ = take_episode(probe, lambda: operator.publish(String(data="push the block forward")))
        # The scripted +x actions pass the safety node as twists and move the simulated gripper.
        wait(probe, lambda: any(m.pose.position.x > x0 + 0.01 for m in probe.since("ee_pose", t0)), 15.0,
             "the simulated gripper to move 1 cm in +x", t0)
    assert (proc.returncode, exit_codes(tmp_path)) == (0, {"policy_node": 0, "safety_node": 0, "sim_node": 0}), \
        launch_log(tmp_path)


def test_autostart_false_leaves_both_unconfigured_until_change_state_activates_them(
        probe, operator, goals, sensors, tmp_path):
    params = scripted_params(tmp_path, [MOVE_X] * 3 + [TERMINATE])
    t_launch = time.monotonic()
    with launched(tmp_path, f"params_file:={params}", "backend:=scripted", "autostart:=false") as proc:
        # GetState answers as soon as a node is up (its lifecycle services exist from the start).
        for node in MANAGED:
            assert probe.lifecycle_state(node, timeout=30.0) == "unconfigured", node
        assert proc.poll() is None, "the launch exited early"
        # A goal sent to an unconfigured policy node is refused (its action server exists already).
        assert goals.client.wait_for_server(timeout_sec=10.0), "no ExecuteInstruction server"
        sent = goals.client.send_goal_async(goals.Goal(instruction="too early", time_limit_s=5.0))
        probe.wait_for(sent.done, 10.0, "the goal response")
        assert not sent.result().accepted, "an unconfigured policy node accepted a goal"
        time.sleep(1.0)  # absence can only be observed over time
        assert probe.since("twist", t_launch) == [], "an unconfigured safety node published twists"
        assert probe.since("status", t_launch) == [], "an unconfigured safety node published its status"
        assert operator.total == 0, "an unconfigured policy node subscribes to instructions"
        assert states(probe) == {"rt2_safety": "unconfigured", "rt2_policy": "unconfigured"}

        # ChangeState configure: inactive; the safety node holds with zero twists from now on.
        t_conf = time.monotonic()
        assert probe.change_state("rt2_safety", "configure")
        assert probe.lifecycle_state("rt2_safety") == "inactive"
        wait(probe, lambda: any(s.state_name == "INACTIVE" for s in probe.since("status", t_conf)), 5.0,
             "INACTIVE status after configure", t_conf)
        wait_held(probe, t_conf, 10, "inactive safety node")
        # ChangeState activate: active, IDLE, still zero twists (no episode yet).
        t_act = time.monotonic()
        assert probe.change_state("rt2_safety", "activate")
        wait(probe, lambda: (s := latest_status(probe)) is not None and s.state_name == "IDLE", 5.0,
             "IDLE status after activate", t_act)
        assert probe.change_state("rt2_policy", "configure")
        assert probe.lifecycle_state("rt2_policy") == "inactive"
        assert probe.change_state("rt2_policy", "activate")
        assert states(probe) == {"rt2_safety": "active", "rt2_policy": "active"}
        wait_held(probe, t_act, 10, "active safety node without an episode")
        operator.wait_new_match(0, 10.0, proc)  # the policy node subscribes to instructions once configured
        probe.image_pub.wait_delivered(0, 10.0, proc, n=1)
        probe.pose_pub.wait_delivered(0, 10.0, proc, n=2)

        # The managed system works like an autostarted one: a goal runs to TERMINATED.
        (handle, _), t0, episode = take_episode(probe, lambda: goals.send("push the block forward", time_limit_s=20.0))
        status, result = goals.result(handle, 20.0)
        assert (status, result.outcome_name) == (GoalStatus.STATUS_SUCCEEDED, "TERMINATED"), \
            (status, result.outcome_name, result.message)
        assert uid(result.episode_id) == episode
        assert any(linear(t)[0] > 1e-3 for t in probe.since("twist", t0)), "no +x twist reached the controller"
    assert (proc.returncode, exit_codes(tmp_path)) == (0, {"policy_node": 0, "safety_node": 0}), launch_log(tmp_path)


@pytest.mark.parametrize("arguments, safety, key, codes", [
    (["backend:=telepathy"], {}, "backend.type", {"policy_node": 2, "safety_node": 0}),
    (["backend:=scripted"], {"safety.workspace_min": [0.8, 0.5, 0.6]}, "safety.workspace_min",
     {"policy_node": 0, "safety_node": 2}),
], ids=["policy", "safety"])
def test_a_node_config_error_under_autostart_shuts_the_whole_launch_down(tmp_path, arguments, safety, key, codes):
    isolate_ros_domain()
    params = scripted_params(tmp_path, [MOVE_X], safety=safety)
    with launched(tmp_path, f"params_file:={params}", *arguments) as proc:
        rc = proc.wait(30)  # nobody stops it: the required node's exit ends the launch
    log = launch_log(tmp_path)
    assert "configuration error" in log and key in log, log
    assert "was required: shutting down launched system" in log, log
    assert (rc, exit_codes(tmp_path)) == (0, codes), log


def test_a_config_error_without_autostart_leaves_the_node_unconfigured(probe, tmp_path):
    """Under a lifecycle manager a bad value fails the configure transition; the process stays up."""
    params = scripted_params(tmp_path, [MOVE_X])
    with launched(tmp_path, f"params_file:={params}", "backend:=telepathy", "autostart:=false") as proc:
        assert probe.lifecycle_state("rt2_policy", timeout=30.0) == "unconfigured"
        assert not probe.change_state("rt2_policy", "configure")
        assert probe.lifecycle_state("rt2_policy") == "unconfigured"
        probe.wait_for(lambda: "backend.type" in launch_log(tmp_path), 5.0, "the key in the launch log")
        assert "telepathy" in launch_log(tmp_path)
        assert proc.poll() is None, "the launch ended on a failed configure without autostart"
    assert (proc.returncode, exit_codes(tmp_path)) == (0, {"policy_node": 0, "safety_node": 0}), launch_log(tmp_path)


@pytest.mark.parametrize("arguments, expected", [
    (["params_file:=/nonexistent/rt2.yaml"], "params file not found: /nonexistent/rt2.yaml"),
    (["sim:=ture"], "sim:='ture': expected true or false"),
    (["autostart:=maybe"], "autostart:='maybe': expected true or false"),
    (["extra_params_file:={typo}"], "unknown node 'rt2_polcy'"),
    (["extra_params_file:={broken}"], "not valid YAML"),
])
def test_bad_arguments_fail_before_any_node_starts(tmp_path, arguments, expected):
    isolate_ros_domain()  # should a node start after all, it stays in the test's domain
    typo = write_params(tmp_path / "typo.yaml", policy={"backend.type": "scripted"})
    typo.write_text(typo.read_text().replace("rt2_policy", "rt2_polcy"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("rt2_policy:\n  ros__parameters:\n    backend: {type: [unclosed\n")
    with launched(tmp_path, *(a.format(typo=typo, broken=broken) for a in arguments)) as proc:
        rc = proc.wait(30)
    log = launch_log(tmp_path)
    assert rc == 1 and expected in log, log
    assert "process started" not in log and exit_codes(tmp_path) == {}, log
