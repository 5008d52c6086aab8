"""Each custom message crosses a real DDS link between two processes with every field intact.

Covers the episode protocol's types: ``unique_identifier_msgs/UUID`` fields (16 fixed bytes) in
ArmAction, SafetyStatus and Episode, SafetyStatus' drop counters (string[] / uint32[]), and the
ExecuteInstruction goal, result and feedback messages.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("rclpy")

from test.msg_echo_publisher import QOS, sample_messages
from test.ros_helpers import REPO, Probe, isolate_ros_domain


def _fields(msg) -> dict:
    out = {}
    for name in msg.get_fields_and_field_types():
        value = getattr(msg, name)
        if hasattr(value, "get_fields_and_field_types"):
            value = _fields(value)
        elif not isinstance(value, (str, bytes, int, float, bool)):
            value = list(value)
        out[name] = value
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def received():
    isolate_ros_domain()
    probe = Probe("rt2_msg_receiver")
    expected = sample_messages()
    for topic, msg in expected.items():
        probe.record(type(msg), topic, QOS)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "test.msg_echo_publisher"], cwd=REPO, env=env)
    try:
        probe.wait_for(lambda: all(probe.messages[t] for t in expected), 30.0, "all custom messages")
        yield {t: probe.messages[t][-1][1] for t in expected}, expected
    finally:
        proc.terminate()
        proc.wait(10)
        probe.close()


@pytest.mark.parametrize("topic", sorted(sample_messages()))
def test_custom_message_round_trip_over_dds(received, topic):
    got, expected = received
    sent_fields = _fields(expected[topic])
    got_fields = _fields(got[topic])
    if "header" in sent_fields:  # stamps are not set; the frame id must arrive
        assert got_fields.pop("header")["frame_id"] == sent_fields.pop("header")["frame_id"]
    assert _same(got_fields, sent_fields), f"{topic}: sent {sent_fields}, got {got_fields}"


def test_episode_ids_arrive_as_the_same_16_bytes(received):
    from rt2_ros.episode import uuid_bytes
    from test.msg_echo_publisher import EPISODE

    got, _ = received
    for topic in ("/test/arm_action", "/test/safety_status", "/test/episode", "/test/execute_instruction/result",
                  "/test/execute_instruction/feedback"):
        assert uuid_bytes(got[topic].episode_id) == EPISODE, topic
