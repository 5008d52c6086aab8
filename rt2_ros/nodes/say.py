"""``rt2-say "pick up the red block"``: send a language instruction, optionally wait for the outcome.

Publishes on ``instruction`` (std_msgs/String, reliable + transient-local, like the policy node
subscribes). With ``--wait`` it follows ``/rt2_safety/status`` until the episode for this
instruction ends: exit 0 when the model sent terminate, 1 on e-stop, fault or timeout.
An empty instruction (``rt2-say ""``) stops the current episode: the arm holds.
"""

from __future__ import annotations

import argparse
import sys
import time

TERMINAL_STATES = {"TERMINATED": 0, "ESTOPPED": 1, "FAULT": 1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rt2-say", description="Send a language instruction to rt2_ros.")
    p.add_argument("instruction", help='e.g. "pick up the red cube and put it in the tray"; "" stops')
    p.add_argument("--topic", default="/instruction", help="instruction topic (default /instruction)")
    p.add_argument("--status-topic", default="/rt2_safety/status", help="SafetyStatus topic to follow")
    p.add_argument("--wait", action="store_true", help="wait until the episode ends and print the outcome")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait with --wait (default 120)")
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to wait for a subscriber before giving up (default 10)")
    args = p.parse_args(argv)

    import rclpy
    from std_msgs.msg import String

    from rt2_ros.nodes.common import LATCHED_QOS
    from rt2_ros_interfaces.msg import SafetyStatus

    rclpy.init()
    node = rclpy.create_node("rt2_say")
    latest: list[SafetyStatus] = []
    node.create_subscription(SafetyStatus, args.status_topic, latest.append, LATCHED_QOS)
    pub = node.create_publisher(String, args.topic, LATCHED_QOS)
    try:
        deadline = time.monotonic() + args.connect_timeout
        while pub.get_subscription_count() == 0:
            if time.monotonic() > deadline:
                print(f"rt2-say: nobody subscribes to {args.topic} after {args.connect_timeout:.0f} s; "
                      "is rt2-bringup (or the launch file) running?", file=sys.stderr)
                return 1
            rclpy.spin_once(node, timeout_sec=0.1)
        # Remember the episode before ours so an old TERMINATED for the same text is not taken as ours.
        rclpy.spin_once(node, timeout_sec=0.3)
        before = latest[-1].episode_id if latest else 0
        pub.publish(String(data=args.instruction))
        print(f"rt2-say: sent {args.instruction!r} on {args.topic}", flush=True)
        if not args.wait or not args.instruction.strip():
            # Give DDS a moment to deliver (transient-local also covers late joiners).
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                rclpy.spin_once(node, timeout_sec=0.05)
            return 0
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
            s = latest[-1] if latest else None
            if s is not None and s.episode_id > before and s.state_name in TERMINAL_STATES:
                reasons = f" ({', '.join(s.reasons)})" if s.reasons else ""
                print(f"rt2-say: episode {s.episode_id} {s.state_name}{reasons}; "
                      f"{s.actions_accepted} actions, {s.actions_clipped} clipped, {s.actions_rejected} rejected")
                return TERMINAL_STATES[s.state_name]
        print(f"rt2-say: no outcome within {args.timeout:.0f} s (last state: "
              f"{latest[-1].state_name if latest else 'no status received'})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
