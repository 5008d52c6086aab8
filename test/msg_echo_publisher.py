"""Publishes one of each rt2_ros_interfaces message with known field values (for test_messages_dds).

The messages of the ExecuteInstruction action (goal, result, feedback) are ordinary message
types too; they go over plain topics here, so every generated type crosses DDS.

Runs in its own process so the messages cross a real DDS link, not an intra-process shortcut.
Publishes every 0.1 s until killed; the values are the ones test_messages_dds.py expects.
"""

from __future__ import annotations

import math

import rclpy
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from unique_identifier_msgs.msg import UUID

from rt2_ros_interfaces.action import ExecuteInstruction
from rt2_ros_interfaces.msg import ActionTokens, ArmAction, Episode, SafetyStatus

QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
# A UUID whose bytes are all different and include 0x00 and 0xff: a swapped or truncated byte shows.
EPISODE = bytes([0x00, 0xFF, *range(0x10, 0x1E)])


def sample_messages() -> dict[str, object]:
    tokens = ActionTokens(observation_seq=42, tokens=[1, 128, 91, 241, 5, 101, 127, 217],
                          text="Plan: pick the apple. Action: 1 128 91 241 5 101 127 217", plan="pick the apple.",
                          backend="grpc", profile="rt2", latency_s=0.25, server_time_s=math.nan)
    tokens.header.frame_id = "camera"
    episode_id = UUID(uuid=list(EPISODE))
    action = ArmAction(observation_seq=42, episode_id=episode_id, gripper=0.75, gripper_relative=False,
                       terminate=True)
    action.header.frame_id = "panda_link0"
    action.translation.x, action.translation.y, action.translation.z = 0.01, -0.02, 0.03
    action.rotation.x, action.rotation.y, action.rotation.z = 0.1, -0.2, 0.3
    status = SafetyStatus(state=SafetyStatus.ESTOPPED, state_name="ESTOPPED", reasons=["estop:button", "x"],
                          episode_id=episode_id, instruction="pick up the red cube", last_observation_seq=41,
                          last_action_age_s=0.5, actions_accepted=10, actions_rejected=1, actions_clipped=2,
                          watchdog_trips=3, estops=1, terminations=0, faults=4,
                          drop_causes=["stale_episode", "unknown_episode", "ignored:estopped"],
                          drop_counts=[1, 2**32 - 1, 5])
    status.header.frame_id = "panda_link0"
    episode = Episode(episode_id=episode_id, active=False, instruction="pick up the red cube",
                      reason="cancelled: cancelled by the client")
    episode.header.frame_id = "episode"
    goal = ExecuteInstruction.Goal(instruction="pick up the red cube", time_limit_s=30.5)
    result = ExecuteInstruction.Result(outcome=ExecuteInstruction.Result.CANCELLED, outcome_name="CANCELLED",
                                       message="cancelled by the client", episode_id=episode_id, duration_s=1.25,
                                       steps=12, requests_sent=14, replies_accepted=12, replies_dropped=2)
    feedback = ExecuteInstruction.Feedback(episode_id=episode_id, step=7, phase="running", plan="grasp",
                                           safety_state="RUNNING", backend_latency_s=0.125,
                                           action_age_s=math.nan)
    return {"/test/action_tokens": tokens, "/test/arm_action": action, "/test/safety_status": status,
            "/test/episode": episode, "/test/execute_instruction/goal": goal,
            "/test/execute_instruction/result": result, "/test/execute_instruction/feedback": feedback}


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
