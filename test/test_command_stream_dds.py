"""The safety node's command stream never stops while a controller process is stopped, killed or restarted.

The safety node runs in its own process; the "controller" is a separate process subscribing to
``servo_node/delta_twist_cmds`` (COMMAND_QOS, like the simulator or MoveIt Servo). Each cycle starts a
controller, SIGSTOPs it 0.1-0.55 s after its subscription shows in the ROS graph (the safety node's writer
is matching it then), resumes it 1.2 s later (like the soak's 1.5 s camera gap) and SIGKILLs it. The probe here
records the twists as they arrive, and the safety node (its real main, in a process started
like rt2-safety) the stamp of every twist as its publish() returns: the gap between consecutive stamps
(the safety node's own clock) must stay within :data:`MAX_STAMP_GAP_S`.

With Fast DDS's default synchronous publication, publish() in the command timer blocked for 1.0-1.3 s
(~1 ms CPU and < 1 ms run-queue wait: not CPU starvation) when the controller was stopped just after
it matched; rt2_ros.nodes.common.use_async_publication made it rarer but did not remove it: a Fast DDS
thread still waits ~1 s in the shared-memory transport for the stopped process's port, and the depth-1
writer then blocks or refuses publish() (measured under load: 14 failures in ~90 runs of 3-5 parallel
copies; README "The command stream under a stuck reader", open work). The stall depends on the stop
falling into a short window, so this test catches it in some runs, not all (hence the several stop
delays). The probe's gaps are printed, not asserted: delivery to other readers may still
pause while Fast DDS's sending thread waits (measured up to 1 s with a stopped controller).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import TwistStamped  # noqa: E402

from rt2_ros.nodes.common import COMMAND_QOS  # noqa: E402
from test.ros_helpers import REPO, Probe, isolate_ros_domain, stop  # noqa: E402

TOPIC = "/servo_node/delta_twist_cmds"
RATE_HZ = 30.0  # config/rt2.yaml safety.command_rate_hz
# A few command periods plus scheduling jitter on a loaded 2-core machine (largest gap measured without
# the fault: 74 ms); the blocked publish this guards against is ~1 s.
MAX_STAMP_GAP_S = 0.5
# When to stop each controller after its subscription showed in the graph: the stall needs the stop to
# fall between the writer's first send to the new reader and the reader's answer.
STOP_DELAYS_S = (0.1, 0.25, 0.4, 0.55)
CYCLES = len(STOP_DELAYS_S)
# The real safety node (its main, as rt2-safety runs it), recording the stamp of every twist it publishes
# as publish() returns: the probe's view alone mixes in delivery (a depth-1 writer drops what a stalled
# sending thread has not sent yet).
SAFETY_NODE = """
import sys, time
from rclpy.publisher import Publisher
from rt2_ros.nodes import safety_node
out = open("{published}", "w", buffering=1)
publish = Publisher.publish
def recorded(self, msg):
    publish(self, msg)
    if self.topic_name.endswith("delta_twist_cmds"):
        out.write(f"{{msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9:.6f}} {{time.time():.6f}}\\n")
Publisher.publish = recorded
sys.exit(safety_node.main(sys.argv[1:]))
"""
CONTROLLER = f"""
import rclpy
from geometry_msgs.msg import TwistStamped
from rt2_ros.nodes.common import COMMAND_QOS
rclpy.init()
node = rclpy.create_node("rt2_test_controller")
node.create_subscription(TwistStamped, "{TOPIC}", lambda msg: None, COMMAND_QOS)
rclpy.spin(node)
"""


def _stamp(msg) -> float:
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def test_command_stream_keeps_its_rate_while_the_controller_is_stopped_killed_and_restarted(tmp_path):
    isolate_ros_domain()
    probe = Probe("rt2_command_stream_probe")
    probe.record(TwistStamped, TOPIC, COMMAND_QOS, "twist")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    published = tmp_path / "published.txt"
    safety = subprocess.Popen([sys.executable, "-c", SAFETY_NODE.format(published=published), "--ros-args",
                               "--params-file", str(REPO / "config/rt2.yaml")], cwd=REPO, env=env,
                              stdout=open(tmp_path / "safety.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    controller = None
    try:
        probe.wait_for(lambda: len(probe.messages["twist"]) >= 10 or safety.poll() is not None, 15.0,
                       "the safety node's command stream")
        assert safety.poll() is None, (tmp_path / "safety.log").read_text()
        t0, w0 = time.monotonic(), time.time()
        for delay in STOP_DELAYS_S:
            known = probe.endpoint_gids(TOPIC)
            controller = subprocess.Popen([sys.executable, "-c", CONTROLLER], cwd=REPO, env=env)
            probe.wait_new_endpoint(TOPIC, known, 10.0)
            time.sleep(delay)
            controller.send_signal(signal.SIGSTOP)
            time.sleep(1.2)
            controller.send_signal(signal.SIGCONT)
            controller.kill()
            controller.wait(5)
            controller = None
        t1 = time.time()
        time.sleep(0.5)
        received = np.array([_stamp(m) for m in probe.since("twist", t0)])
    finally:
        if controller is not None:
            controller.kill()
            controller.wait(5)
        code = stop(safety)
        probe.close()
    rows = np.loadtxt(published, ndmin=2)
    stamps = rows[(rows[:, 1] >= w0) & (rows[:, 1] <= t1), 0]
    gaps, seen = np.diff(stamps), np.diff(received)
    for what, g in (("published", gaps), ("received by the probe", seen)):
        print(f"\n[measured] twist stamp gaps {what} over {CYCLES} controller stop/kill cycles: n={len(g)} "
              f"p50={np.median(g) * 1e3:.1f} ms p99={np.percentile(g, 99) * 1e3:.1f} ms max={g.max() * 1e3:.1f} ms",
              flush=True)
    assert code == 0
    assert len(stamps) > CYCLES * 1.2 * RATE_HZ, f"only {len(stamps)} twists published"
    assert gaps.max() <= MAX_STAMP_GAP_S, f"the command timer stalled for {gaps.max():.3f} s"
