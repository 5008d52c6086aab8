"""The shipped openpi setup through the real nodes over DDS: proprioception from joint_states.

``config/rt2.yaml`` + ``config/backends/openpi.yaml`` + an overlay that only points
``backend.openpi.url`` at the openpi-protocol test server (test/servers/openpi_policy_server.py,
which checks the API key as a gateway would). The probe plays camera and arm driver: images,
ee_pose and a Panda's joint_states with the fingers half open. The openpi config sends a state
vector (position, rotation vector, gripper closedness), so a request can only go out once the
policy node knows the gripper from joint_states; the arm moves when the safety node accepts the
chunk's actions.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from std_msgs.msg import String  # noqa: E402

from rt2_ros.nodes.common import EVENT_QOS, LATCHED_QOS  # noqa: E402
from rt2_ros_interfaces.msg import SafetyStatus  # noqa: E402
from test.ros_helpers import (  # noqa: E402
    PANDA_JOINTS,
    REPO,
    Probe,
    isolate_ros_domain,
    start_bringup,
    stop,
    uid,
)
from test.test_compat_backends import start_server  # noqa: E402

KEY = "openpi-dds-test-key"


@pytest.fixture(scope="module")
def probe():
    isolate_ros_domain()
    p = Probe("rt2_openpi_probe")
    p.record(SafetyStatus, "/rt2_safety/status", LATCHED_QOS, "status")
    p.publish_fake_sensors(joints=PANDA_JOINTS)  # camera and arm driver, fingers 0.02 m: closedness 0.5
    p.instruction = p.publisher(String, "/instruction", EVENT_QOS)
    yield p
    p.close()


@pytest.fixture(scope="module")
def openpi_server(tmp_path_factory):
    server = start_server("openpi_policy_server.py", tmp_path_factory.mktemp("openpi_dds"),
                          env={"OPENPI_TEST_API_KEY": KEY})
    yield server
    server.stop()


def test_shipped_openpi_config_moves_the_arm_with_gripper_state(probe, openpi_server, tmp_path, monkeypatch):
    overlay = tmp_path / "server.yaml"
    overlay.write_text(f"rt2_policy:\n  ros__parameters:\n    backend:\n      openpi:\n"
                       f"        url: ws://127.0.0.1:{openpi_server.port}\n")
    monkeypatch.setenv("OPENPI_API_KEY", KEY)  # config/backends/openpi.yaml: api_key_env OPENPI_API_KEY
    log = tmp_path / "bringup.log"
    baselines, t0 = probe.match_baselines("both"), time.monotonic()
    proc = start_bringup(REPO / "config" / "rt2.yaml", "--params", str(REPO / "config" / "backends" / "openpi.yaml"),
                         "--params", str(overlay), log=log)
    try:
        probe.wait_started(proc, "both", baselines, t0, log)
        task = String(data="put the cube in the tray")
        _, _, episode, _ = probe.take_episode(lambda: probe.instruction.publish(task))

        def accepted() -> bool:
            st = probe.latest("status")
            return st is not None and uid(st.episode_id) == episode and st.actions_accepted > 0

        try:
            probe.wait_for(accepted, 20.0, "the safety node to accept actions of the openpi chunk")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nserver saw: {openpi_server.received()[-3:]}\n--- bringup.log ---\n"
                                 f"{log.read_text()}") from None
        requests = [r for r in openpi_server.received() if r["prompt"] == "put the cube in the tray"]
        assert requests, "the server saw no request of the episode"
        state = requests[-1]["state"]
        assert requests[-1]["state_dtype"] == "float32" and len(state) == 7  # pos_axisangle_gripper
        # ee_pose (0.45, 0, 0.3) with identity orientation, and the fingers' closedness from joint_states.
        assert np.allclose(state, [0.45, 0.0, 0.3, 0.0, 0.0, 0.0, 0.5], atol=1e-5), state
        assert "lacks gripper" not in log.read_text()
    finally:
        assert stop(proc) == 0, log.read_text()
