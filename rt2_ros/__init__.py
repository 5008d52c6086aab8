"""rt2_ros: the robot side of an RT-2 style vision-language-action (VLA) policy.

The pure core (``actions``, ``tokens``, ``safety``, ``imaging``, ``backends``) never imports
rclpy, so it can be unit-tested and reused in a notebook; ``rt2_ros.nodes`` holds the thin
ROS 2 adapters.
"""

__version__ = "0.1.0"
