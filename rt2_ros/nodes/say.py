"""``rt2-say "pick up the red block"``: send a language instruction, optionally wait for the outcome.

Without ``--wait`` it publishes on ``instruction`` (std_msgs/String, the teleop path: each message
starts a new episode; ``rt2-say ""`` stops the current one and the arm holds).
With ``--wait`` it sends an ``ExecuteInstruction`` goal to ``/rt2_policy/execute_instruction``,
prints the feedback as the phase changes and the result: exit 0 when the model terminated the
episode, 1 on any other outcome (time limit, preempted, e-stop, fault) or no server, 130 on
Ctrl-C or SIGTERM, which cancel the goal first (the arm holds).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from typing import Any

# Discovery of a running policy node takes up to about a second (an action server has five
# endpoints); after this long without it, say what rt2-say is waiting for.
_ANNOUNCE_WAIT_S = 2.0


def _domain() -> str:
    return os.environ.get("ROS_DOMAIN_ID") or "0"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rt2-say", description="Send a language instruction to rt2_ros.")
    p.add_argument("instruction", help='e.g. "pick up the red cube and put it in the tray"; "" stops')
    p.add_argument("--topic", default="/instruction", help="instruction topic (default /instruction)")
    p.add_argument("--action", default="/rt2_policy/execute_instruction",
                   help="ExecuteInstruction action used with --wait (default /rt2_policy/execute_instruction)")
    p.add_argument("--wait", action="store_true",
                   help="run the instruction as an action goal: print feedback, wait for the outcome")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="with --wait: the episode's time limit in seconds, also how long to wait (default 120)")
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to wait for the policy node before giving up (default 10)")
    args = p.parse_args(argv)
    if args.wait and not args.instruction.strip():
        p.error("--wait needs a non-empty instruction (an empty one only stops the current episode)")

    import rclpy
    from rclpy.signals import SignalHandlerOptions

    # Our own handlers: rclpy's would raise ExternalShutdownException from inside spin (a traceback).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("rt2_say")
    try:
        return _send_goal(node, args) if args.wait else _publish(node, args)
    except KeyboardInterrupt:
        return 130
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def _publish(node: Any, args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.duration import Duration
    from std_msgs.msg import String

    from rt2_ros.nodes.common import EVENT_QOS

    pub = node.create_publisher(String, args.topic, EVENT_QOS)
    start = time.monotonic()
    deadline = start + args.connect_timeout
    announced = False
    while pub.get_subscription_count() == 0:
        if not announced and time.monotonic() - start >= _ANNOUNCE_WAIT_S:
            print(f"rt2-say: waiting for the policy node to subscribe to {args.topic} (up to "
                  f"{args.connect_timeout:g} s) ...", file=sys.stderr, flush=True)
            announced = True
        if time.monotonic() > deadline:
            print(f"rt2-say: nobody subscribes to {args.topic} after {args.connect_timeout:.0f} s; "
                  f"is rt2-bringup (or the launch file) running, on this ROS_DOMAIN_ID ({_domain()})?", file=sys.stderr)
            return 1
        rclpy.spin_once(node, timeout_sec=0.1)
    rclpy.spin_once(node, timeout_sec=0.2)  # let the subscriber match our writer too (volatile topic)
    pub.publish(String(data=args.instruction))
    print(f"rt2-say: sent {args.instruction!r} on {args.topic}", flush=True)
    if not pub.wait_for_all_acked(Duration(seconds=2.0)):
        print("rt2-say: the instruction was not acknowledged by every subscriber within 2 s", file=sys.stderr)
        return 1
    return 0


def _send_goal(node: Any, args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.action import ActionClient

    from rt2_ros.episode import short_id, uuid_bytes
    from rt2_ros_interfaces.action import ExecuteInstruction

    client = ActionClient(node, ExecuteInstruction, args.action)
    first = min(_ANNOUNCE_WAIT_S, args.connect_timeout)
    if not client.wait_for_server(timeout_sec=first) and args.connect_timeout > first:
        print(f"rt2-say: waiting for the ExecuteInstruction server {args.action} (up to "
              f"{args.connect_timeout:g} s) ...", file=sys.stderr, flush=True)
        client.wait_for_server(timeout_sec=args.connect_timeout - first)
    if not client.server_is_ready():
        print(f"rt2-say: no ExecuteInstruction server on {args.action} after {args.connect_timeout:.0f} s; "
              f"is rt2-bringup (or the launch file) running, on this ROS_DOMAIN_ID ({_domain()})?", file=sys.stderr)
        return 1
    last = {"phase": "", "printed": 0.0}

    def on_feedback(msg: Any) -> None:
        fb = msg.feedback
        now = time.monotonic()
        if fb.phase != last["phase"] or now - last["printed"] >= 2.0:
            latency = "" if math.isnan(fb.backend_latency_s) else f", backend {fb.backend_latency_s * 1e3:.0f} ms"
            plan = f", plan: {fb.plan}" if fb.plan else ""
            print(f"rt2-say: [{short_id(uuid_bytes(fb.episode_id))}] {fb.phase}: step {fb.step}, "
                  f"safety {fb.safety_state or '?'}{latency}{plan}", flush=True)
            last["phase"], last["printed"] = fb.phase, now

    goal = ExecuteInstruction.Goal(instruction=args.instruction, time_limit_s=float(max(0.0, args.timeout)))
    send = client.send_goal_async(goal, feedback_callback=on_feedback)
    rclpy.spin_until_future_complete(node, send, timeout_sec=args.connect_timeout)
    handle = send.result() if send.done() else None
    if handle is None or not handle.accepted:
        print("rt2-say: goal rejected (is the policy node active? see its log)", file=sys.stderr)
        return 1
    print(f"rt2-say: executing {args.instruction!r}", flush=True)
    result_future = handle.get_result_async()
    try:
        # The time limit ends the episode on the node; wait a little longer for that result.
        rclpy.spin_until_future_complete(node, result_future, timeout_sec=args.timeout + 10.0)
    except KeyboardInterrupt:
        cancel = handle.cancel_goal_async()
        rclpy.spin_until_future_complete(node, cancel, timeout_sec=2.0)
        print("rt2-say: cancelled", file=sys.stderr)
        raise
    if not result_future.done():
        handle.cancel_goal_async()
        print(f"rt2-say: no result within {args.timeout + 10.0:.0f} s; cancelled the goal", file=sys.stderr)
        return 1
    r = result_future.result().result
    print(f"rt2-say: episode {short_id(uuid_bytes(r.episode_id))} {r.outcome_name}"
          f"{': ' + r.message if r.message else ''}; {r.steps} steps in {r.duration_s:.1f} s, "
          f"{r.replies_accepted} replies accepted, {r.replies_dropped} dropped", flush=True)
    return 0 if r.outcome == ExecuteInstruction.Result.TERMINATED else 1


if __name__ == "__main__":
    raise SystemExit(main())
