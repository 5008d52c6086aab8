"""ConfiguredEntities.one_shot / arm: the policy node's release timer fires once per arm, at the delay asked."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("rclpy")


def test_a_one_shot_timer_fires_once_per_arm_at_its_delay():
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from rt2_ros.nodes.common import ConfiguredEntities

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("rt2_test_one_shot", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    fired: list[float] = []
    owned = ConfiguredEntities(node)
    try:
        owned.one_shot("release", lambda: fired.append(time.monotonic()))

        def spin(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                executor.spin_once(timeout_sec=0.005)

        spin(0.2)
        assert fired == []  # created idle
        t0 = time.monotonic()
        owned.arm("release", 0.03)
        spin(0.3)
        assert len(fired) == 1, fired  # once, not periodically
        assert 0.025 <= fired[0] - t0 < 0.1, fired[0] - t0
        owned.arm("release", 0.2)
        t1 = time.monotonic()
        owned.arm("release", 0.05)  # re-arming moves it: fires at the new delay, once
        spin(0.4)
        assert len(fired) == 2, fired
        assert 0.045 <= fired[1] - t1 < 0.15, fired[1] - t1
    finally:
        owned.destroy_all()
        node.destroy_node()
        rclpy.shutdown(context=context)
