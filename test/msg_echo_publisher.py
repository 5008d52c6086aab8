"""Publishes one of each rt2_ros_interfaces message with known field values (for test_messages_dds).

Runs in its own process so the messages cross a real DDS link, not an intra-process shortcut.
Publishes every 0.1 s until killed; the values are the ones test_messages_dds.py expects.
"""

from __future__ import annotations

import math

import rclpy
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from rt2_ros_interfaces.msg import ActionTokens, ArmAction, SafetyStatus

QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def sample_messages() -> dict[str, object]:
    tokens = ActionTokens(observation_seq=42, tokens=[1, 128, 91, 241, 5, 101, 127, 217],
                          text="Plan: pick the apple. Action: 1 128 91 241 5 101 127 217", plan="pick the apple.",
                          backend="grpc", profile="rt2", latency_s=0.25, server_time_s=math.nan)
    tokens.header.frame_id = "camera"
    action = ArmAction(observation_seq=42, episode_id=3, gripper=0.75, gripper_relative=False, terminate=True)
    action.header.frame_id = "panda_link0"
    action.translation.x, action.translation.y, action.translation.z = 0.01, -0.02, 0.03
    action.rotation.x, action.rotation.y, action.rotation.z = 0.1, -0.2, 0.3
    status = SafetyStatus(state=SafetyStatus.ESTOPPED, state_name="ESTOPPED", reasons=["estop:button", "x"],
                          episode_id=3, instruction="pick up the red cube", last_observation_seq=41,
                          last_action_age_s=0.5, actions_accepted=10, actions_rejected=1, actions_clipped=2,
                          watchdog_trips=3, estops=1, terminations=0)
    return {"/test/action_tokens": tokens, "/test/arm_action": action, "/test/safety_status": status}


def main() -> None:
    rclpy.init()
    node = rclpy.create_node("rt2_msg_echo_publisher")
    pubs = [(node.create_publisher(type(m), topic, QOS), m) for topic, m in sample_messages().items()]

    def publish() -> None:
        for pub, msg in pubs:
            pub.publish(msg)

    node.create_timer(0.1, publish)
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
