"""Simulation: a pybullet tabletop (Franka Panda, coloured cubes, a tray, a fixed camera).

Pure Python (no rclpy): :mod:`rt2_ros.sim.tabletop` is the simulator core and
:mod:`rt2_ros.sim.camera` the pinhole model shared with the ``embedded`` reference policy.
A ROS node wraps the core as a thin adapter. ``tabletop`` imports pybullet, so it is not
imported here: ``from rt2_ros.sim.camera import PinholeCamera`` stays light.
"""
