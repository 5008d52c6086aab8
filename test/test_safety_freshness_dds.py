"""Freshness at execution over real DDS: the safety node in its own process, a probe node here.

``rt2-bringup --no-policy`` runs the safety node alone; the probe plays the arm driver (``ee_pose``
at 50 Hz, stamped with its own clock, switchable off and to old stamps) and the policy node (episode
announcements and ArmActions with chosen ``observation_stamp``), and records what reaches the
controller. One safety process serves the whole module; each test starts its own episode, and
counters are compared as differences. Measured latencies are printed (``pytest -s``) and written to
:data:`MEASUREMENTS`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from builtin_interfaces.msg import Time  # noqa: E402
from geometry_msgs.msg import PoseStamped, TwistStamped  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from rt2_ros.nodes.common import ACTION_QOS, COMMAND_QOS, EVENT_QOS, LATCHED_QOS  # noqa: E402
from rt2_ros_interfaces.msg import ArmAction, Episode, SafetyStatus  # noqa: E402
from test.ros_helpers import Probe, isolate_ros_domain, start_bringup, stop, write_params  # noqa: E402

MEASUREMENTS = "/tmp/rt2_safety_freshness_measurements.txt"
RATE_HZ = 30.0
PERIOD_S = 1.0 / RATE_HZ
MAX_POSE_AGE_S = 0.25
MAX_ACTION_AGE_S = 1.0
MIN_INTERVAL_S = 0.05
MAX_STEP_M = 0.05
SAFETY = {"safety.command_rate_hz": RATE_HZ, "safety.max_pose_age_s": MAX_POSE_AGE_S,
          "safety.max_action_age_s": MAX_ACTION_AGE_S, "safety.min_action_interval_s": MIN_INTERVAL_S,
          "safety.max_step_translation_m": MAX_STEP_M, "safety.watchdog_timeout_s": 1.0}
# DDS delivery both ways plus scheduling on a loaded 2-core machine (the same margin as the
# episode tests' STOP_MARGIN_S beyond one command period).
DDS_MARGIN_S = 0.067
POSE = (0.45, 0.0, 0.3)
FRAME = "panda_link0"


# -- the probe: arm driver, policy and controller -------------------------------------------------------
class Driver:
    """ee_pose at 50 Hz from the probe's timer thread: ``on`` switches it, ``stamp_age_s`` back-dates
    the stamps (poses that keep arriving but were measured long ago; None: zero stamps, unknown age)."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.on = True
        self.stamp_age_s: float | None = 0.0
        self.position = POSE
        self.pub = probe.pose_pub = probe.publisher(PoseStamped, "/ee_pose", 10)
        self._lock = threading.Lock()
        self.timer = probe.node.create_timer(0.02, self._publish)

    def _publish(self) -> None:
        with self._lock:
            if not self.on:
                return
            msg = PoseStamped()
            msg.header.stamp = Time() if self.stamp_age_s is None else ros_stamp(self.probe, -self.stamp_age_s)
            msg.header.frame_id = FRAME
            msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = self.position
            msg.pose.orientation.w = 1.0
            self.pub.publish(msg)

    def stop(self) -> float:
        """Stop publishing; returns the monotonic time of the last pose sent."""
        with self._lock:
            self.on = False
            return self.pub.published_at

    def start(self, stamp_age_s: float | None = 0.0) -> None:
        with self._lock:
            self.on, self.stamp_age_s = True, stamp_age_s


class Feeder:
    """A 10 Hz policy on the probe's timer thread: fresh +x actions of ``episode`` while ``on``."""

    def __init__(self, probe: Probe, pub) -> None:
        self.probe, self.pub = probe, pub
        self.episode: bytes | None = None
        self.seq = 0
        self.timer = probe.node.create_timer(0.1, self._publish)

    def _publish(self) -> None:
        if self.episode is not None:
            self.seq += 1
            self.pub.publish(action(self.probe, self.episode, self.seq, dx=0.004))


def ros_stamp(probe: Probe, offset_s: float = 0.0) -> Time:
    nanos = probe.node.get_clock().now().nanoseconds + round(offset_s * 1e9)
    return Time(sec=nanos // 1_000_000_000, nanosec=nanos % 1_000_000_000)


def action(probe: Probe, episode: bytes, seq: int, dx: float = 0.0, age_s: float | None = 0.0) -> ArmAction:
    """An ArmAction of ``episode`` whose camera frame is ``age_s`` old now (None: a zero stamp)."""
    msg = ArmAction()
    msg.header.stamp, msg.header.frame_id = ros_stamp(probe), FRAME
    msg.observation_seq = seq
    msg.observation_stamp = Time() if age_s is None else ros_stamp(probe, -age_s)
    msg.episode_id.uuid = list(episode)
    msg.translation.x = dx
    return msg


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """The probe and one ``rt2-bringup --no-policy`` process for the module."""
    isolate_ros_domain()
    with open(MEASUREMENTS, "w") as fh:
        fh.write("# rt2_ros safety freshness over DDS (test/test_safety_freshness_dds.py)\n")
    probe = Probe("rt2_freshness_probe")
    probe.record(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS, "twist")
    probe.record(SafetyStatus, "/rt2_safety/status", LATCHED_QOS, "status")
    probe.record(PoseStamped, "/target_pose", COMMAND_QOS, "target")
    driver = Driver(probe)
    actions = probe.straggler = probe.publisher(ArmAction, "/arm_action", ACTION_QOS)
    episodes = probe.publisher(Episode, "/episode", EVENT_QOS)
    feeder = Feeder(probe, actions)
    tmp = tmp_path_factory.mktemp("freshness")
    log = tmp / "safety.log"
    params = write_params(tmp / "params.yaml", safety=SAFETY)
    baselines = {"pose": driver.pub.total, "actions": actions.total, "episodes": episodes.total}
    t0 = time.monotonic()
    proc = start_bringup(params, "--no-policy", log=log)
    try:
        probe.wait_for(lambda: proc.poll() is not None or bool(probe.since("status", t0)), 20.0, "the safety status")
        assert proc.poll() is None, log.read_text()
        driver.pub.wait_delivered(baselines["pose"], 20.0, proc)
        actions.wait_new_match(baselines["actions"], 20.0, proc)
        episodes.wait_new_match(baselines["episodes"], 20.0, proc)
    except AssertionError as exc:
        stop(proc)
        raise AssertionError(f"{exc}\n--- safety.log ---\n{log.read_text()}") from None
    rig = Rig(probe, proc, log, driver, feeder, actions, episodes)
    yield rig
    probe.node.destroy_timer(feeder.timer)
    probe.node.destroy_timer(driver.timer)
    rc = stop(proc)
    probe.close()
    assert rc == 0, log.read_text()


class Rig:
    def __init__(self, probe: Probe, proc, log, driver: Driver, feeder: Feeder, actions, episodes) -> None:
        self.probe, self.proc, self.log = probe, proc, log
        self.driver, self.feeder, self.actions, self.episodes = driver, feeder, actions, episodes
        self.seq = 10**6  # observation_seq of the test's own actions (above the feeder's)

    def status(self) -> SafetyStatus:
        return self.probe.latest("status")

    def wait_status(self, pred: Callable[[SafetyStatus], bool], timeout: float, what: str) -> SafetyStatus:
        self.probe.wait_for(lambda: (s := self.status()) is not None and pred(s), timeout, what)
        return self.status()

    def begin(self, feed: bool = True) -> bytes:
        """Announce a fresh episode (the pose must be on) and wait until the node holds it; with
        ``feed`` the 10 Hz policy starts, and this waits for steady motion."""
        self.feeder.episode = None
        t = time.monotonic()
        self.driver.start()
        self.probe.wait_for(lambda: self.driver.pub.published_at > t + 0.1, 2.0, "fresh poses")
        ep = uuid.uuid4().bytes
        msg = Episode(active=True, instruction="freshness test")
        msg.header.stamp = ros_stamp(self.probe)
        msg.episode_id.uuid = list(ep)
        self.episodes.publish(msg)
        self.wait_status(lambda s: bytes(s.episode_id.uuid) == ep and s.state_name == "HOLDING", 5.0,
                         "the episode, holding for its first action")
        if feed:
            self.feeder.episode = ep
            t = time.monotonic()
            self.probe.wait_for(lambda: len(w := self.probe.since("twist", t)) >= 5
                                and not any(is_zero(m) for m in w[-5:]), 5.0, "steady motion")
        return ep

    def send(self, episode: bytes, dx: float = 0.0, age_s: float | None = 0.0) -> float:
        self.seq += 1
        return self.actions.publish(action(self.probe, episode, self.seq, dx, age_s))

    def drops(self) -> dict[str, int]:
        s = self.status()
        return dict(zip(s.drop_causes, s.drop_counts, strict=True))


def is_zero(tw: TwistStamped) -> bool:
    lin, ang = tw.twist.linear, tw.twist.angular
    return bool(np.allclose([lin.x, lin.y, lin.z, ang.x, ang.y, ang.z], 0.0))


def timed(probe: Probe, key: str, t0: float) -> list[tuple[float, object]]:
    with probe._cond:
        return [(t, m) for t, m in probe.messages[key] if t >= t0]


def first_time(probe: Probe, key: str, t0: float, pred: Callable, timeout: float, what: str) -> float:
    found: list[float] = []

    def check() -> bool:
        found[:] = [t for t, m in timed(probe, key, t0) if pred(m)][:1]
        return bool(found)

    probe.wait_for(check, timeout, what)
    return found[0]


def assert_held(probe: Probe, t0: float, n: int = 10) -> None:
    """Over a window of ``n`` keep-alive twists after ``t0``: every one is zero."""
    probe.wait_for(lambda: len(probe.since("twist", t0)) >= n, 5.0, f"{n} twists")
    moving = [m for m in probe.since("twist", t0) if not is_zero(m)]
    assert not moving, f"{len(moving)} twists move, e.g. {moving[0].twist.linear}"


def measure(name: str, seconds: float, note: str = "") -> None:
    line = f"{name}: {seconds * 1e3:.1f} ms{f' ({note})' if note else ''}"
    print(f"\n[measured] {line}", flush=True)
    with open(MEASUREMENTS, "a") as fh:
        fh.write(line + "\n")


# -- ee_pose -------------------------------------------------------------------------------------------------------
def test_ee_pose_loss_mid_episode_holds_within_its_age_bound(rig: Rig) -> None:
    rig.begin()
    before = rig.drops()
    t_last_pose = rig.driver.stop()
    t_zero = first_time(rig.probe, "twist", t_last_pose, is_zero, 3.0, "a zero twist after the last ee_pose")
    latency = t_zero - t_last_pose
    measure("ee_pose loss -> first zero twist", latency,
            f"last pose sent -> zero twist at the probe; bound safety.max_pose_age_s {MAX_POSE_AGE_S} s + one "
            f"period {PERIOD_S * 1e3:.0f} ms + {DDS_MARGIN_S * 1e3:.0f} ms")
    # judged from the stamp: not before the pose is max_pose_age_s old, and at the first tick after that
    assert MAX_POSE_AGE_S - 0.02 <= latency <= MAX_POSE_AGE_S + PERIOD_S + DDS_MARGIN_S, latency
    s = rig.wait_status(lambda s: s.state_name == "HOLDING" and any(r.startswith("no_fresh_pose") for r in s.reasons),
                        2.0, "HOLDING with reason no_fresh_pose")
    assert s.pose_age_s >= MAX_POSE_AGE_S
    # the policy keeps sending fresh actions: none moves the arm, each is counted
    assert_held(rig.probe, t_zero, n=15)
    after = rig.wait_status(lambda s: dict(zip(s.drop_causes, s.drop_counts, strict=True)).get("no_fresh_pose", 0)
                            >= before.get("no_fresh_pose", 0) + 3, 3.0, "actions refused for no_fresh_pose")
    drops = dict(zip(after.drop_causes, after.drop_counts, strict=True))
    assert drops["hold:no_fresh_pose"] == before.get("hold:no_fresh_pose", 0) + 1  # one trip (tick or action)
    # the pose returns: motion resumes on the next fresh action only
    accepted = after.actions_accepted
    t_back = time.monotonic()
    rig.driver.start()
    t_move = first_time(rig.probe, "twist", t_back, lambda m: not is_zero(m), 3.0, "motion after the pose returned")
    assert rig.wait_status(lambda s: s.actions_accepted > accepted, 2.0, "a new accepted action").state_name \
        in ("RUNNING", "HOLDING")
    measure("ee_pose back -> motion", t_move - t_back, "waits for the next fresh action of the 10 Hz policy")
    rig.feeder.episode = None


def test_arm_measured_far_outside_the_workspace_latches_a_fault_until_reset(rig: Rig) -> None:
    # The arm driver reports the hand 4 cm past workspace_max x mid-episode (a collision, a controller
    # that did not follow): FAULT, zero twists while the policy keeps sending; after the arm is back,
    # ~/reset ends the episode and a new instruction moves it again.
    ep = rig.begin()
    t_out = time.monotonic()
    with rig.driver._lock:
        rig.driver.position = (0.79, 0.0, 0.3)
    s = rig.wait_status(lambda s: s.state_name == "FAULT", 2.0, "FAULT after the pose left the workspace")
    why = " ".join(s.reasons)
    assert "arm_outside_workspace" in why and "40 mm outside" in why, why
    assert "40 mm outside the workspace" in rig.log.read_text()  # and the operator reads it in the log
    t_zero = first_time(rig.probe, "twist", t_out, is_zero, 2.0, "a zero twist")
    assert_held(rig.probe, t_zero, n=15)  # the 10 Hz policy keeps sending: nothing moves
    with rig.driver._lock:
        rig.driver.position = POSE
    t_back = time.monotonic()  # the node must have the arm's pose back in the box before the reset
    rig.probe.wait_for(lambda: rig.driver.pub.published_at > t_back + 0.2, 2.0, "poses back inside")
    assert rig.probe.call(Trigger, "/rt2_safety/reset", Trigger.Request()).success
    rig.wait_status(lambda s: s.state_name == "IDLE", 2.0, "IDLE: the reset ends the episode")
    assert_held(rig.probe, time.monotonic(), n=5)  # the old episode's actions do not move it
    assert rig.begin() != ep  # a new instruction moves the arm again (begin waits for steady motion)
    rig.feeder.episode = None


@pytest.mark.parametrize("stamp_age_s", [0.4, None])
def test_poses_that_keep_arriving_with_old_or_zero_stamps_hold(rig: Rig, stamp_age_s: float | None) -> None:
    """Arrival is not freshness: poses at 50 Hz, each stamped 0.4 s before it is sent, or unstamped."""
    rig.begin()
    before = rig.drops().get("hold:no_fresh_pose", 0)
    t_switch = time.monotonic()
    rig.driver.start(stamp_age_s=stamp_age_s)
    t_zero = first_time(rig.probe, "twist", t_switch, is_zero, 3.0, "a zero twist")
    what = "0.4 s old" if stamp_age_s else "zero"
    measure(f"ee_pose stamps turn {what} -> first zero twist", t_zero - t_switch,
            "the last fresh pose ages out; the ones arriving meanwhile do not count")
    assert t_zero - t_switch <= MAX_POSE_AGE_S + PERIOD_S + DDS_MARGIN_S
    assert_held(rig.probe, t_zero, n=15)
    rig.wait_status(lambda s: dict(zip(s.drop_causes, s.drop_counts, strict=True)).get("hold:no_fresh_pose", 0)
                    == before + 1, 2.0, "one hold:no_fresh_pose trip")
    if stamp_age_s is None:
        assert "ee_pose ignored: its header stamp is zero" in rig.log.read_text()
    rig.feeder.episode = None
    rig.driver.start()


# -- action age -----------------------------------------------------------------------------------------------------
def test_stale_action_is_not_executed_and_is_counted(rig: Rig) -> None:
    ep = rig.begin(feed=False)
    before = rig.drops().get("stale_action", 0)
    accepted = rig.status().actions_accepted
    t0 = time.monotonic()
    for _ in range(5):  # a 10 Hz policy answering 1.5 s old frames
        rig.send(ep, dx=0.02, age_s=MAX_ACTION_AGE_S + 0.5)
        time.sleep(0.1)  # paced like a policy (not a wait for anything)
    s = rig.wait_status(lambda s: dict(zip(s.drop_causes, s.drop_counts, strict=True)).get("stale_action", 0)
                        == before + 5, 3.0, "5 stale_action drops")
    assert s.actions_accepted == accepted and s.state_name == "HOLDING"
    assert any(r.startswith("rejected:stale_action") for r in s.reasons), list(s.reasons)
    assert_held(rig.probe, t0, n=15)


def test_target_of_an_action_is_not_pursued_once_its_frame_is_too_old(rig: Rig) -> None:
    """An action answering a 0.8 s old frame is executed, and held the moment its frame is 1.0 s old."""
    ep = rig.begin(feed=False)
    before = rig.drops().get("hold:stale_action", 0)
    age = 0.8
    t_sent = rig.send(ep, dx=MAX_STEP_M, age_s=age)  # 5 cm: more than 0.2 s of motion at 0.25 m/s
    t_move = first_time(rig.probe, "twist", t_sent, lambda m: not is_zero(m), 2.0, "motion")
    t_zero = first_time(rig.probe, "twist", t_move, is_zero, 2.0, "the stale-target hold")
    expires = t_sent + (MAX_ACTION_AGE_S - age)  # the frame is max_action_age_s old here (probe clock)
    measure("frame of the target reaches max_action_age_s -> first zero twist", t_zero - expires,
            f"action with a {age} s old frame; moved from {1e3 * (t_move - t_sent):.0f} ms after sending")
    assert expires - 0.02 <= t_zero <= expires + PERIOD_S + DDS_MARGIN_S, (t_zero - expires)
    s = rig.wait_status(lambda s: dict(zip(s.drop_causes, s.drop_counts, strict=True)).get("hold:stale_action", 0)
                        == before + 1, 2.0, "one hold:stale_action trip")
    assert s.state_name == "HOLDING" and any(r.startswith("stale_action") for r in s.reasons), list(s.reasons)
    assert s.watchdog_trips == rig.status().watchdog_trips
    assert_held(rig.probe, t_zero, n=15)


@pytest.mark.parametrize(("age_s", "cause"), [(-0.5, "future_action"), (None, "no_observation_stamp")])
def test_future_or_unstamped_action_is_rejected(rig: Rig, age_s: float | None, cause: str) -> None:
    ep = rig.begin(feed=False)
    before = rig.drops().get(cause, 0)
    t0 = rig.send(ep, dx=0.02, age_s=age_s)
    s = rig.wait_status(lambda s: dict(zip(s.drop_causes, s.drop_counts, strict=True)).get(cause, 0) == before + 1,
                        3.0, f"a {cause} drop")
    assert any(r == f"rejected:{cause}" for r in s.reasons), list(s.reasons)
    assert_held(rig.probe, t0, n=10)
    assert f"not executed ({cause})" in rig.log.read_text()


# -- bursts ------------------------------------------------------------------------------------------------------
def test_burst_of_ten_actions_moves_the_target_one_step(rig: Rig) -> None:
    ep = rig.begin(feed=False)
    before = rig.drops().get("burst", 0)
    accepted = rig.status().actions_accepted
    burst = []
    for _ in range(10):  # a queue flushed at once: without the rule, 10 x 5 cm
        rig.seq += 1
        burst.append(action(rig.probe, ep, rig.seq, dx=MAX_STEP_M))
    t0 = time.monotonic()
    for msg in burst:
        rig.actions.publish(msg)
    span = time.monotonic() - t0
    # "At once" is what the publisher managed; on a loaded machine the 10 may take longer than the interval
    steps = 1 + int(span / MIN_INTERVAL_S)
    s = rig.wait_status(lambda s: s.actions_accepted + dict(zip(s.drop_causes, s.drop_counts, strict=True))
                        .get("burst", 0) >= accepted + before + 10, 3.0, "10 actions accounted for")
    drops = dict(zip(s.drop_causes, s.drop_counts, strict=True))
    executed = s.actions_accepted - accepted
    assert 1 <= executed <= steps and drops["burst"] == before + 10 - executed, (executed, span, drops)
    rig.probe.wait_for(lambda: len(rig.probe.since("target", t0)) >= 5, 3.0, "target poses")
    xs = [m.pose.position.x for m in rig.probe.since("target", t0)]
    assert max(xs) == pytest.approx(POSE[0] + executed * MAX_STEP_M)  # one step per interval, not ten
    measure("burst of 10 ArmActions published", span, f"{executed} executed, {10 - executed} dropped as burst; "
            f"target x {max(xs):.3f} m (start {POSE[0]} m, step limit {MAX_STEP_M} m)")
