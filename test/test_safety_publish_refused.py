"""The safety node when the middleware refuses a publish.

Fast DDS refuses publishes ("cannot publish data") for about a second behind a controller that was just
stopped or killed (seen in the soak and in test_command_stream_dds, not reproducible on demand). Here the
node's real command publisher is wrapped so that its first publishes raise the RCLError rclpy raises
then; everything else is the real node in a real ROS context.
"""

from __future__ import annotations

import time

import pytest

from test.ros_helpers import isolate_ros_domain


class RefusingPublisher:
    """The node's publisher, refusing its first ``refusals`` publishes or until ``until`` (monotonic)."""

    def __init__(self, real, refusals: int = 0, until: float = 0.0):
        from rclpy.impl.implementation_singleton import rclpy_implementation

        self._real, self._refusals, self._until = real, refusals, until
        self._error = rclpy_implementation.RCLError
        self.sent = 0
        self.refused = 0

    def publish(self, msg) -> None:
        if self._refusals > 0 or time.monotonic() < self._until:
            self._refusals -= 1
            self.refused += 1
            raise self._error("Failed to publish: cannot publish data, at ./src/rcl/publisher.c:283")
        self._real.publish(msg)
        self.sent += 1


@pytest.fixture
def safety_node():
    isolate_ros_domain()
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions

    from rt2_ros.nodes.safety_node import SafetyNode

    ctx = Context()
    rclpy.init(context=ctx, signal_handler_options=SignalHandlerOptions.NO)
    node = SafetyNode(context=ctx)
    try:
        node.trigger_configure()
        node.trigger_activate()
        yield node
    finally:
        node.destroy_node()
        rclpy.shutdown(context=ctx)


def test_a_refused_command_publish_is_counted_and_sent_again_without_a_fault(safety_node):
    pub = safety_node.twist_pub = RefusingPublisher(safety_node.twist_pub, refusals=3)
    for _ in range(5):
        safety_node._guarded_tick()
    assert (pub.refused, pub.sent) == (3, 2)
    assert safety_node.errors["publish_refused"] == 3
    assert not any(k.startswith("callback_errors:") for k in safety_node.errors), safety_node.errors
    # Not an "internal error" fault that needs a reset: the node waits for an episode as before.
    assert "fault" not in safety_node.filter.hold_reason, safety_node.filter.hold_reason
    assert safety_node.filter.hold_reason == "no episode"


def test_the_last_zero_twist_at_shutdown_is_retried_through_a_short_refusal(safety_node):
    pub = safety_node.twist_pub = RefusingPublisher(safety_node.twist_pub, until=time.monotonic() + 0.3)
    t0 = time.monotonic()
    safety_node.close()
    assert pub.sent == 1 and pub.refused >= 2
    assert time.monotonic() - t0 < 1.0


def test_a_refusal_that_lasts_ends_close_within_its_bound(safety_node):
    from rt2_ros.nodes.safety_node import CLOSE_HOLD_RETRY_S

    pub = safety_node.twist_pub = RefusingPublisher(safety_node.twist_pub, until=time.monotonic() + 60)
    t0 = time.monotonic()
    safety_node.close()
    elapsed = time.monotonic() - t0
    assert pub.sent == 0
    assert CLOSE_HOLD_RETRY_S <= elapsed < CLOSE_HOLD_RETRY_S + 0.5, elapsed


def test_a_refused_status_or_hold_publish_is_counted_not_raised(safety_node):
    # Before: a refused ~/status publish (its reader, e.g. rt2-status, just killed) raised out of the
    # status timer and latched an "internal error" fault; the operator's hold now also just counts.
    status = safety_node.status_pub = RefusingPublisher(safety_node.status_pub, refusals=1)
    twist = safety_node.twist_pub = RefusingPublisher(safety_node.twist_pub, refusals=1)
    safety_node._publish_status()
    assert safety_node._publish_hold() is False
    assert (status.refused, twist.refused) == (1, 1)
    assert safety_node.errors["publish_refused"] == 2
    safety_node._publish_status()  # the next one goes out, with the count in /diagnostics
    assert status.sent == 1 and safety_node._publish_hold() is True
