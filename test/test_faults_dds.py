"""Faults injected into a running stack over real DDS and real sockets: the arm holds within a
measured bound, nothing stale moves it, the stack stays up and recovers, the counters say why.

Covered elsewhere (not repeated here): ee_pose loss, stale / future / unstamped actions and bursts
(test_safety_freshness_dds.py); a node killed and restarted, e-stop, instruction change and
straggler, cancel (test_episode_dds.py); a backend that stalls, a late reply, terminate
(test_nodes_dds.py); every fault of every network backend at the socket level against its budget
(test_backend_budgets.py). Here: the gRPC server process killed and restarted mid-episode, the
camera stopping and resuming, and the camera's resolution changing mid-episode.
Measured bounds are printed and appended to /tmp/rt2_episode_measurements.txt.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import TwistStamped  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from rt2_ros.nodes.common import ACTION_QOS, COMMAND_QOS, EVENT_QOS, LATCHED_QOS, rgb_to_image_msg  # noqa: E402
from rt2_ros_interfaces.msg import ArmAction, SafetyStatus  # noqa: E402
from test import test_episode_dds  # noqa: E402
from test.ros_helpers import REPO, MatchedPublisher, Probe, isolate_ros_domain, uid, write_params  # noqa: E402
from test.test_episode_dds import (  # noqa: E402
    MOVE_X,
    WATCHDOG_S,
    begin,
    free_closed_port,
    is_zero,
    latest_status,
    measure,
    say,
    timed,
    wait_motion,
)

stack = test_episode_dds.stack  # its Stack fixture, on this module's probe

EXECUTE_PERIOD_S = 0.1  # policy.execute_rate_hz 10
COMMAND_PERIOD_S = 1.0 / 30.0
SLACK_S = 0.15  # DDS delivery and scheduling on a loaded 2-core machine


class Camera:
    """The probe's /camera/image at 20 Hz, which a test can pause and resize."""

    def __init__(self, probe: Probe) -> None:
        self.size = (64, 64)
        self.running = True
        self.sent = 0
        self.last_sent_at = 0.0
        self._lock = threading.Lock()
        probe.image_pub = self.pub = MatchedPublisher(probe, Image, "/camera/image", 10)
        self._probe = probe
        probe.node.create_timer(0.05, self._tick)

    def _tick(self) -> None:
        with self._lock:
            if not self.running:
                return
            h, w = self.size
        frame = np.full((h, w, 3), 40, dtype=np.uint8)
        self.pub.publish(rgb_to_image_msg(frame, self._probe.node.get_clock().now().to_msg(), "camera"))
        self.sent += 1
        self.last_sent_at = time.monotonic()

    def pause(self) -> float:
        with self._lock:
            self.running = False
        time.sleep(0.06)  # a tick in progress finishes
        return self.last_sent_at

    def resume(self, size: tuple[int, int] | None = None) -> None:
        with self._lock:
            if size is not None:
                self.size = size
            self.running = True


@pytest.fixture(scope="module")
def probe():
    isolate_ros_domain()
    p = Probe("rt2_faults_probe")
    p.record(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS, "twist")
    p.record(ArmAction, "/arm_action", ACTION_QOS, "action")
    p.record(SafetyStatus, "/rt2_safety/status", LATCHED_QOS, "status")
    p.publish_fake_sensors(cameras={})  # the arm driver (ee_pose); the camera is ours
    p.camera = Camera(p)
    p.instruction = p.publisher(String, "/instruction", EVENT_QOS)
    yield p
    p.close()


def motion_stops(probe: Probe, t0: float, bound: float) -> float:
    """Arrival time of the first zero twist after the last non-zero one, watching ``bound`` + 1 s after
    ``t0`` (a transient hold before the end, e.g. a late ee_pose, does not count as the stop)."""
    probe.wait_for(lambda: time.monotonic() > t0 + bound + 1.0, bound + 2.0, "the hold window")
    twists = timed(probe, "twist", t0)
    last_move = max((t for t, m in twists if not is_zero(m)), default=t0)
    return next(t for t, m in twists if t > last_move and is_zero(m))


# -- the gRPC server process dies mid-episode ------------------------------------------------------
def start_server(tmp_path, port: int) -> subprocess.Popen:
    params = write_params(tmp_path / "serve.yaml", policy={
        "backend.type": "scripted", "backend.scripted.answers": [MOVE_X], "backend.scripted.repeat": True})
    path = tmp_path / f"serve-{time.monotonic_ns()}.log"
    with open(path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rt2_ros.serve", "--params", str(params), "--host",
                                 "127.0.0.1", "--port", str(port)], cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if re.search(r"serving", path.read_text()):
            return proc
        assert proc.poll() is None, path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"rt2-serve did not start: {path.read_text()}")


def test_grpc_server_killed_mid_episode_holds_then_recovers(probe, stack, tmp_path):
    port = free_closed_port()
    server = start_server(tmp_path, port)
    try:
        s = stack(policy={"backend.type": "grpc", "backend.timeout_s": 0.5, "policy.max_reply_age_s": 1.0,
                          "policy.max_action_age_s": 1.0, "backend.grpc.target": f"127.0.0.1:{port}",
                          "backend.grpc.tls": False, "backend.grpc.max_backoff_s": 0.5})
        s.start("both")
        _, t0, _ = begin(probe, lambda: say(probe, "push the block forward"))
        wait_motion(probe, t0)
        t_kill = time.monotonic()
        server.send_signal(signal.SIGKILL)
        server.wait(5)
        # No reply can come: the last released action keeps the arm moving until the watchdog.
        bound = WATCHDOG_S + EXECUTE_PERIOD_S + COMMAND_PERIOD_S + SLACK_S
        t_zero = motion_stops(probe, t_kill, bound)
        measure("grpc server SIGKILLed mid-episode -> first zero twist", t_zero - t_kill,
                f"bound {bound:.3f} s = watchdog {WATCHDOG_S} s + one execute and one command period + slack")
        assert t_zero - t_kill <= bound
        assert s.alive("both")
        st = latest_status(probe)
        assert st.state_name == "HOLDING" and (st.watchdog_trips >= 1 or "hold:stale_action" in list(st.drop_causes))

        server = start_server(tmp_path, port)  # same port: the client reconnects by itself
        t_back = time.monotonic()
        _, t1, _ = begin(probe, lambda: say(probe, "push the block forward again"))
        t_move = wait_motion(probe, t1, 10.0)
        measure("grpc server restarted -> motion on a fresh instruction", t_move - t_back)
        assert "Traceback" not in s.log("both"), s.log("both")
    finally:
        server.kill()
        server.wait(5)


# -- the camera stops, then resumes; its resolution changes --------------------------------------
def test_camera_stop_holds_and_resume_moves_again(probe, stack):
    s = stack(policy={"backend.timeout_s": 0.5, "policy.max_reply_age_s": 1.0, "policy.max_action_age_s": 1.0,
                      "policy.max_frame_age_s": 0.3})
    s.start("both")
    _, t0, ep = begin(probe, lambda: say(probe, "push the block forward"))
    wait_motion(probe, t0)
    t_last_frame = probe.camera.pause()
    try:
        # The last frame can still be answered; after that no request goes out (no new frame) and
        # what was queued is dropped once the frame is 0.3 s old: the watchdog holds the arm.
        bound = EXECUTE_PERIOD_S + WATCHDOG_S + COMMAND_PERIOD_S + SLACK_S
        t_zero = motion_stops(probe, t_last_frame, bound)
        measure("camera stops -> first zero twist", t_zero - t_last_frame,
                f"bound {bound:.3f} s = one execute period + watchdog {WATCHDOG_S} s + one command period + slack")
        assert t_zero - t_last_frame <= bound
        actions = [m for t, m in timed(probe, "action", t_last_frame + EXECUTE_PERIOD_S + SLACK_S)]
        assert actions == [], f"{len(actions)} actions released from old frames"
        st = latest_status(probe)  # why: the watchdog (no fresh action) or the stale-target rule
        assert st.state_name == "HOLDING" and (st.watchdog_trips >= 1 or "hold:stale_action" in list(st.drop_causes))
        assert uid(latest_status(probe).episode_id) == ep  # the episode waits, it did not end
    finally:
        probe.camera.resume()
    t_resume = time.monotonic()
    t_move = wait_motion(probe, t_resume, 5.0)  # same episode: fresh frames, fresh requests
    measure("camera resumes -> motion (same episode)", t_move - t_resume)
    assert s.alive("both")


def test_camera_resolution_change_mid_episode_keeps_working(probe, stack):
    s = stack(policy={"backend.timeout_s": 0.5, "policy.max_reply_age_s": 1.0, "policy.max_action_age_s": 1.0})
    s.start("both")
    _, t0, _ = begin(probe, lambda: say(probe, "push the block forward"))
    probe.wait_for(lambda: len(timed(probe, "action", t0)) >= 3, 10.0, "actions at 64x64")
    probe.camera.resume(size=(96, 128))  # the driver switches mode mid-episode
    t_change = time.monotonic() + 0.1
    probe.wait_for(lambda: len(timed(probe, "action", t_change)) >= 3, 10.0, "actions after the change to 96x128")
    probe.camera.resume(size=(64, 64))
    assert s.alive("both")
    assert "Traceback" not in s.log("both"), s.log("both")
