"""``rt2-status``: a live one-line view of rt2_ros (backend, rate, latency, last action, safety).

Reads ``/rt2_safety/status`` (SafetyStatus), ``/rt2_policy/action_tokens`` (ActionTokens) and
``/arm_action``; prints one line per period (``--once`` prints one line and exits, for scripts).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from typing import Any

from rt2_ros.episode import short_id, uuid_bytes


def format_line(status, tokens, action, rate_hz: float) -> str:
    """One status line from the latest messages (any may be None)."""
    parts = []
    if status is not None:
        parts.append(f"safety={status.state_name}")
        parts.append(f"ep={short_id(uuid_bytes(status.episode_id))}")
        if status.instruction:
            parts.append(f"{status.instruction!r}")
        parts.append(f"ok={status.actions_accepted} clip={status.actions_clipped} rej={status.actions_rejected} "
                     f"wd={status.watchdog_trips}")
        if status.reasons:
            parts.append("[" + ",".join(status.reasons[:3]) + "]")
    else:
        parts.append("safety=?")
    if tokens is not None:
        lat = f"{tokens.latency_s * 1000:.0f}ms" if math.isfinite(tokens.latency_s) else "?"
        parts.append(f"backend={tokens.backend} lat={lat} tokens={' '.join(str(t) for t in tokens.tokens) or '-'}")
    parts.append(f"rate={rate_hz:.1f}Hz")
    if action is not None:
        t = action.translation
        parts.append(f"last=({t.x * 1000:+.0f},{t.y * 1000:+.0f},{t.z * 1000:+.0f})mm grip={action.gripper:.2f}"
                     + (" TERMINATE" if action.terminate else ""))
    return " ".join(parts)


def _domain() -> str:
    return os.environ.get("ROS_DOMAIN_ID") or "0"


_stop = threading.Event()


def _interrupt(signum: int, frame: Any) -> None:
    # A flag, not an exception: a KeyboardInterrupt raised inside spin_once can leave rclpy's wait
    # set mid-use before the node is destroyed; once in make test rt2-status then died with SIGSEGV
    # on SIGINT (Fast DDS: "You need to create a Writer with this History"), the likely cause.
    _stop.set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rt2-status", description="Live one-line status of rt2_ros.")
    p.add_argument("--once", action="store_true",
                   help="print one line as soon as the safety status arrived (at most --wait seconds) and exit; "
                        "exit 1 when no status came")
    p.add_argument("--wait", type=float, default=5.0, help="longest wait for --once (default 5 s)")
    p.add_argument("--period", type=float, default=1.0, help="seconds between lines (default 1)")
    args = p.parse_args(argv)

    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from rt2_ros.nodes.common import ACTION_QOS, LATCHED_QOS
    from rt2_ros_interfaces.msg import ActionTokens, ArmAction, SafetyStatus

    # Our own handlers: rclpy's would raise ExternalShutdownException out of spin_once (a traceback, exit 1).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("rt2_status")
    latest: dict[str, object] = {}
    action_times: deque[float] = deque(maxlen=50)

    def on_action(msg) -> None:
        latest["action"] = msg
        action_times.append(time.monotonic())

    node.create_subscription(SafetyStatus, "/rt2_safety/status", lambda m: latest.__setitem__("status", m),
                             LATCHED_QOS)
    node.create_subscription(ActionTokens, "/rt2_policy/action_tokens", lambda m: latest.__setitem__("tokens", m),
                             10)
    node.create_subscription(ArmAction, "/arm_action", on_action, ACTION_QOS)

    def rate() -> float:
        now = time.monotonic()
        recent = [t for t in action_times if now - t < 5.0]
        return (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0

    try:
        start = time.monotonic()
        next_print = start + (args.wait if args.once else args.period)
        while not _stop.is_set():  # set by SIGINT / SIGTERM: seen within one 50 ms spin
            rclpy.spin_once(node, timeout_sec=0.05)
            if args.once and "status" in latest and time.monotonic() - start > 0.5:
                next_print = 0.0  # status is in; the extra 0.5 s lets the other topics arrive too
            if time.monotonic() >= next_print:
                line = format_line(latest.get("status"), latest.get("tokens"), latest.get("action"), rate())
                print(line, flush=True)
                if args.once:
                    if "status" not in latest:
                        print(f"rt2-status: no /rt2_safety/status within {args.wait:g} s; is rt2-bringup (or the "
                              f"launch file) running, on this ROS_DOMAIN_ID ({_domain()})?", file=sys.stderr)
                        return 1
                    return 0
                next_print += args.period
        return 0
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
