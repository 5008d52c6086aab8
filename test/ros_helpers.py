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
from collections.abc import Callable
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
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._running = True
        self._thread.start()

    def _spin(self) -> None:
        while self._running:
            self._executor.spin_once(timeout_sec=0.05)

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

    def publish_fake_sensors(self, period_s: float = 0.05) -> Callable[[], None]:
        """Play camera and arm driver: a black 64x64 image on /camera/image and a fixed pose on
        /ee_pose every ``period_s``; returns a function that stops publishing (the timer and both
        publishers are destroyed), for tests that hand these topics to another node afterwards."""
        import numpy as np
        from geometry_msgs.msg import PoseStamped
        from sensor_msgs.msg import Image

        from rt2_ros.nodes.common import rgb_to_image_msg

        image_pub = self.node.create_publisher(Image, "/camera/image", 10)
        pose_pub = self.node.create_publisher(PoseStamped, "/ee_pose", 10)
        frame = np.zeros((64, 64, 3), dtype=np.uint8)

        def publish() -> None:
            now = self.node.get_clock().now().to_msg()
            image_pub.publish(rgb_to_image_msg(frame, now, "camera"))
            pose = PoseStamped()
            pose.header.stamp, pose.header.frame_id = now, "panda_link0"
            pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = 0.45, 0.0, 0.3
            pose.pose.orientation.w = 1.0
            pose_pub.publish(pose)

        timer = self.node.create_timer(period_s, publish)

        def stop_publishing() -> None:
            self.node.destroy_timer(timer)
            self.node.destroy_publisher(image_pub)
            self.node.destroy_publisher(pose_pub)

        return stop_publishing

    def close(self) -> None:
        self._running = False
        self._thread.join(2.0)
        self._executor.remove_node(self.node)
        self.node.destroy_node()
